"""Vertical LR maths with parties as threads over the real broker, against a plaintext oracle."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from fedps.algorithms.hetero_lr import trainer
from fedps.algorithms.hetero_lr.data import load_party_data
from fedps.algorithms.hetero_lr.local import run_in_threads
from fedps.algorithms.hetero_lr.params import LRParams
from fedps.errors import ConfigError, DataError

DATA = Path(__file__).parents[2] / "data"


def breast(hosts: int) -> dict[str, trainer.PartyData]:
    guest = load_party_data(DATA / "breast_hetero_guest.csv", "id", "y")
    host = load_party_data(DATA / "breast_hetero_host.csv", "id", None)
    parts = np.array_split(np.arange(host.x.shape[1]), hosts)
    out = {"guest": guest}
    for i, cols in enumerate(parts):
        out[f"host{i + 1}"] = trainer.PartyData(host.x[:, cols], host.row_keys)
    return out


def run_parties(job: str, configs: dict, data: dict, params: dict[str, LRParams], tmp: Path,
                ray_address: str, record: bool = False) -> dict:
    results = run_in_threads(job, configs, data, params, tmp, record=record)
    return {
        "results": {n: (r.state, r.weights, None, r.stored_rows) for n, r in results.items() if r.error is None},
        "errors": {n: r.error for n, r in results.items() if r.error is not None},
        "received": {n: r.received for n, r in results.items()},
    }


def oracle(data: dict, params: LRParams) -> tuple[list[np.ndarray], float, list[float]]:
    """The same mini-batch Taylor-gradient descent in plain numpy."""
    names = list(data)
    xs = [data[n].x for n in names]
    y = data["guest"].y
    weights = [np.zeros(x.shape[1]) for x in xs]
    bias = 0.0
    rows = np.flatnonzero(~trainer.validation_rows(data["guest"].row_keys, params.validation_fraction, params.seed))
    losses = []
    for epoch in range(params.epochs):
        batch_losses = []
        for batch in trainer.batches(rows, params, epoch):
            u = sum(x[batch] @ w for x, w in zip(xs, weights)) + bias
            d = 0.25 * u + 0.5 - y[batch]
            batch_losses.append(np.mean(np.log(2) + (0.5 - y[batch]) * u + 0.125 * u ** 2))
            for i, x in enumerate(xs):
                weights[i] = weights[i] - params.learning_rate * (x[batch].T @ d / len(batch) + params.l2 * weights[i])
            bias -= params.learning_rate * float(np.mean(d))
        losses.append(float(np.mean(batch_losses)))
    return weights, bias, losses


@pytest.mark.parametrize("hosts", [1, 2])
def test_federated_weights_and_loss_match_the_plaintext_oracle(hosts, make_parties, job_id, tmp_path, ray_address):
    data = breast(hosts)
    params = LRParams(epochs=2, batch_size=96, learning_rate=0.3, l2=0.01, key_bits=512, validation_fraction=0.3)
    out = run_parties(job_id, make_parties(*data), data, {n: params for n in data}, tmp_path, ray_address)
    assert not out["errors"], out["errors"]
    weights, bias, losses = oracle(data, params)
    state, (w_guest, b_guest) = out["results"]["guest"][:2]
    np.testing.assert_allclose(w_guest, weights[0], atol=1e-5)
    assert abs(b_guest - bias) < 1e-5
    for i, name in enumerate(list(data)[1:], start=1):
        np.testing.assert_allclose(out["results"][name][1][0], weights[i], atol=1e-5)
    np.testing.assert_allclose(state.losses, losses, atol=1e-5)
    assert state.metrics[-1]["auc"] > 0.97


def test_what_hosts_receive_reveals_neither_labels_nor_guest_features(make_parties, job_id, tmp_path, ray_address):
    from fedps.messaging.codec import Blob

    data = breast(1)
    params = LRParams(epochs=1, batch_size=96, key_bits=512, validation_fraction=0.3)
    out = run_parties(job_id, make_parties(*data), data, {n: params for n in data}, tmp_path, ray_address,
                      record=True)
    assert not out["errors"], out["errors"]
    received = [v for _, v in out["received"]["host1"]]
    assert received
    y, xg = data["guest"].y, data["guest"].x
    secrets = [y.astype(np.float64).tobytes(), y.astype(np.int64).tobytes(), xg[:4].tobytes(),
               np.round(xg[:, 0], 6).astype(str)[0].encode()]
    for value in received:
        if isinstance(value, Blob):
            raw = value.data
            # every blob a host receives is a Paillier vector under the guest's key, or masked
            assert value.kind == "paillier.vector/1"
        elif isinstance(value, np.ndarray):
            raw = value.tobytes()
        else:
            raw = repr(value).encode()
        for secret in secrets:
            assert secret not in raw
    # the only plaintext arrays a host gets are none at all; dicts carry keys, shapes and masked integers
    assert not any(isinstance(v, np.ndarray) for v in received)


def test_parties_with_different_rows_or_settings_are_refused(make_parties, job_id, tmp_path, ray_address):
    data = breast(1)
    short = trainer.PartyData(data["host1"].x[:-10], data["host1"].row_keys[:-10])
    params = LRParams(epochs=1, batch_size=96, key_bits=512)
    out = run_parties(job_id, make_parties(*data), {"guest": data["guest"], "host1": short},
                      {n: params for n in data}, tmp_path, ray_address)
    assert isinstance(out["errors"]["guest"], DataError)
    assert "host1 has fewer rows after PSI" in str(out["errors"]["guest"])


def test_batch_below_the_privacy_floor_is_refused(make_parties, job_id, tmp_path, ray_address):
    data = breast(1)
    params = LRParams(epochs=1, batch_size=16, key_bits=512)
    out = run_parties(job_id, make_parties(*data), data, {n: params for n in data}, tmp_path, ray_address)
    assert isinstance(out["errors"]["guest"], ConfigError)
    assert "privacy floor" in str(out["errors"]["guest"])


def test_bad_training_files_name_the_column(tmp_path):
    path = tmp_path / "g.csv"
    path.write_text("id,y,x0,x1\n1,0,0.5,abc\n2,1,0.1,0.2\n")
    with pytest.raises(DataError, match="feature column 'x1'.*not numeric"):
        load_party_data(path, "id", "y")
    path.write_text("id,y,x0\n1,0,0.5\n2,1,\n")
    with pytest.raises(DataError, match="'x0'.*missing values"):
        load_party_data(path, "id", "y")
    with pytest.raises(DataError, match="feature column 'x9' is missing"):
        load_party_data(path, "id", "y", ("x9",))
    with pytest.raises(DataError, match="label column 'label' is missing"):
        load_party_data(path, "id", "label")


def test_sparse_host_with_ten_million_hashed_features_trains_touching_only_its_rows(
        make_parties, job_id, tmp_path, ray_address):
    rng = np.random.default_rng(7)
    rows = 480
    ids = np.arange(rows)
    y = rng.integers(0, 2, rows)
    signal = rng.integers(0, 10**7, 40)           # informative hashed ids, split by class
    guest_lines, host_lines, touched = [], [], set()
    for i in ids:
        guest_lines.append(f"{i},{y[i]},{rng.normal():.5f}")
        picks = [int(rng.choice(signal[:20] if y[i] else signal[20:]))]
        picks += [int(v) for v in rng.integers(0, 10**7, 4)]      # noise features, mostly unique
        touched.update(picks)
        host_lines.append(f"{i} " + " ".join(f"{k}:1" for k in sorted(set(picks))))
    (tmp_path / "g.csv").write_text("id,y,x0\n" + "\n".join(guest_lines) + "\n")
    (tmp_path / "h.libsvm").write_text("\n".join(host_lines) + "\n")
    data = {"guest": load_party_data(tmp_path / "g.csv", "id", "y"),
            "host": load_party_data(tmp_path / "h.libsvm", "id", None)}
    assert data["host"].sparse and data["host"].feature_keys.max() < 10**7
    params = LRParams(epochs=4, batch_size=96, learning_rate=4.0, key_bits=512, d_noise=0.001,
                      validation_fraction=0.3)
    out = run_parties(job_id, make_parties(*data), data, {n: params for n in data}, tmp_path, ray_address)
    assert not out["errors"], out["errors"]
    assert out["results"]["guest"][0].metrics[-1]["auc"] > 0.9
    train = ~trainer.validation_rows(data["host"].row_keys, 0.3, 0)
    touched_in_training = np.unique(data["host"].x[np.flatnonzero(train)].indices).size
    assert out["results"]["host"][3] == touched_in_training     # rows stored == features touched


def test_sparse_features_without_noise_are_refused(make_parties, job_id, tmp_path, ray_address):
    (tmp_path / "h.libsvm").write_text("\n".join(f"{i} {i * 7}:1 5:1" for i in range(569)) + "\n")
    guest = load_party_data(DATA / "breast_hetero_guest.csv", "id", "y")
    host = load_party_data(tmp_path / "h.libsvm", "id", None)
    ids = host.row_keys
    data = {"guest": trainer.PartyData(guest.x[:569], ids, guest.y[:569]), "host": host}
    out = run_parties(job_id, make_parties(*data), data, {n: LRParams(epochs=1, key_bits=512) for n in data},
                      tmp_path, ray_address)
    assert "d_noise" in str(out["errors"].get("guest"))
