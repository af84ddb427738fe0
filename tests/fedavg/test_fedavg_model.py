"""The local models against finite differences, FedProx's pull, and the settings checks."""

from __future__ import annotations

import numpy as np
import pytest

from fedps.algorithms.fedavg import preflight
from fedps.algorithms.fedavg.model import ModelSpec, auc, train
from fedps.algorithms.fedavg.params import FedAvgParams
from fedps.engine.config import from_mapping
from fedps.errors import ConfigError


def _loss(spec: ModelSpec, theta: np.ndarray, x: np.ndarray, y: np.ndarray) -> float:
    p = np.clip(spec.scores(theta, x), 1e-12, 1 - 1e-12)
    return float(-np.mean(y * np.log(p) + (1 - y) * np.log(1 - p)))


@pytest.mark.parametrize("kind", ["lr", "mlp"])
def test_gradient_matches_finite_differences(kind):
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(30, 4)), (rng.random(30) < 0.4).astype(float)
    spec = ModelSpec(kind, 4, hidden=3)
    theta = spec.initial(1) + rng.normal(0, 0.3, spec.size)
    grad = spec.gradient(theta, x, y)
    eps = 1e-6
    numeric = np.array([(_loss(spec, theta + eps * e, x, y) - _loss(spec, theta - eps * e, x, y)) / (2 * eps)
                        for e in np.eye(spec.size)])
    np.testing.assert_allclose(grad, numeric, atol=1e-7)


def test_fedprox_keeps_the_local_model_nearer_the_global_one():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(200, 5))
    y = (x[:, 0] > 0.5).astype(float)          # a skewed party
    spec = ModelSpec("lr", 5)
    start = np.zeros(spec.size)
    plain = train(spec, start, x, y, epochs=5, batch_size=20, learning_rate=0.2)
    prox = train(spec, start, x, y, epochs=5, batch_size=20, learning_rate=0.2, mu=1.0)
    assert np.linalg.norm(prox - start) < 0.7 * np.linalg.norm(plain - start)
    assert auc(spec.scores(prox, x), y) > 0.9


def _config(role: str, peers: dict, **params):
    return from_mapping({"job": {"id": "j1", "algorithm": "fedavg", "params": params},
                         "party": {"name": "me", "role": role}, "peers": peers})


def test_bad_settings_are_named_before_any_channel_opens(tmp_path):
    pinned = {"a": "ed25519:x", "b": "ed25519:y"}
    with pytest.raises(ConfigError, match="fewer than params.min_parties = 3"):
        preflight(_config("coordinator", pinned, min_parties=3), tmp_path)
    with pytest.raises(ConfigError, match="pins exactly one peer, its coordinator"):
        preflight(_config("guest", pinned, data=str(tmp_path)), tmp_path)
    with pytest.raises(ConfigError, match="params.data .* does not exist"):
        preflight(_config("guest", {"c": "ed25519:z"}, data=str(tmp_path / "none.csv")), tmp_path)
    with pytest.raises(ConfigError, match="unknown FedAvg params epochs"):
        FedAvgParams.from_mapping({"epochs": 3})
    with pytest.raises(ConfigError, match="params.min_parties must be an integer >= 2"):
        FedAvgParams(min_parties=1)
