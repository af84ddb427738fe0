"""A party's part of a trained model, as served, and its hot reload.

The model is the party's output folder of a training job: ``model.json``
(its own weights only, written by ``hetero_lr``: dense, or sparse over feature
ids, :mod:`fedps.serving.sparse`; or its part of a ``secureboost`` model,
:mod:`fedps.serving.trees`) and the job's id from the folder's setup record (``checkpoint/setup.json``, the record that ties an
output folder to one job). The job id is the **model version**: every party's
part of one trained model carries it, and a guest scores with the parts of one
version only.
"""

from __future__ import annotations

import hashlib
import json
import logging
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from fedps.engine.vertical.standardize import RowTransform
from fedps.errors import ConfigError, DataError

log = logging.getLogger(__name__)


def feature_columns(model: Any, available: tuple[str, ...], where: str) -> np.ndarray:
    """Indices of ``model.features`` among ``available``; DataError naming the missing ones."""
    index = {name: i for i, name in enumerate(available)}
    missing = [f for f in model.features if f not in index]
    if missing:
        raise DataError(f"model {model.version} of {model.party} needs features {', '.join(missing)} "
                        f"that {where} does not have")
    return np.array([index[f] for f in model.features], dtype=np.int64)


@dataclass(frozen=True)
class LinearModel:
    """One party's part of a vertical LR model: ``u = T(x) . weights + intercept``.

    ``T`` is the row transform the party trained with (its own standardisation and row
    clip, ``model.json``'s ``transform``), applied as the batch prediction applies it.
    """

    version: str
    party: str
    features: tuple[str, ...]
    weights: np.ndarray
    intercept: float
    digest: str
    transform: RowTransform | None = None
    kind: str = "linear"

    def columns(self, available: tuple[str, ...], where: str) -> np.ndarray:
        """Indices of the model's features among ``available``; DataError naming the missing ones."""
        return feature_columns(self, available, where)

    def score(self, x: np.ndarray) -> np.ndarray:
        """This party's part of the log-odds of each row (the batch prediction's ``x @ w + b``)."""
        if self.transform is not None and len(x):
            x = self.transform.apply(x)
        return np.asarray(x @ self.weights).ravel() + self.intercept


def model_job(folder: Path) -> str:
    """The id of the training job whose output ``folder`` is."""
    setup = folder / "checkpoint" / "setup.json"
    try:
        job = json.loads(setup.read_text()).get("job")
    except FileNotFoundError:
        raise ConfigError(f"{folder} has no {setup.relative_to(folder)}: cannot tell which job trained "
                          "this model; --model must be a party's output folder of a training job") from None
    except ValueError as exc:
        raise DataError(f"{setup} is unreadable: {exc}") from None
    if not isinstance(job, str) or not job:
        raise DataError(f"{setup} names no job")
    return job


def load_model(folder: str | Path, me: str) -> LinearModel:
    """This party's part of the model in a training job's output folder."""
    folder = Path(folder)
    path = folder / "model.json"
    try:
        text = path.read_text()
        saved = json.loads(text)
    except FileNotFoundError:
        raise ConfigError(f"{path} does not exist: --model must be a party's output folder of a "
                          "finished training job") from None
    except ValueError as exc:
        raise DataError(f"{path} is not a model.json: {exc}") from None
    if not isinstance(saved, dict):
        raise DataError(f"{path} is not a model.json")
    if saved.get("algorithm") == "secureboost" or "trees" in saved:
        from fedps.serving.trees import load_tree_model

        return load_tree_model(saved, path, me, model_job(folder), text)   # type: ignore[return-value]
    if saved.get("party") != me:
        raise ConfigError(f"{path} is the model of party {saved.get('party')!r}, and this is {me!r}")
    if "feature_ids" in saved:
        from fedps.serving.sparse import load_sparse_model

        return load_sparse_model(saved, path, model_job(folder), me, text)   # type: ignore[return-value]
    features, weights = saved.get("features"), saved.get("weights")
    if not isinstance(features, list) or not isinstance(weights, list) or len(features) != len(weights):
        raise DataError(f"{path} must hold as many weights as features")
    intercept = saved.get("intercept")
    w = np.asarray(weights, dtype=np.float64)
    if not np.isfinite(w).all() or (intercept is not None and not np.isfinite(float(intercept))):
        raise DataError(f"{path} holds a weight that is not finite")
    transform = None
    if saved.get("transform"):
        try:
            transform = RowTransform.from_json(saved["transform"])
        except (KeyError, TypeError, ValueError) as exc:
            raise DataError(f"{path} holds an unreadable row transform: {exc}") from None
        if len(transform.shift) != len(w) or len(transform.scale) != len(w):
            raise DataError(f"{path}: its row transform covers {len(transform.shift)} features, "
                            f"its weights {len(w)}")
    return LinearModel(version=model_job(folder), party=me, features=tuple(map(str, features)), weights=w,
                       intercept=float(intercept or 0.0), digest=hashlib.sha256(text.encode()).hexdigest()[:12],
                       transform=transform)


class Models:
    """The served model and, after a reload, the one before it (which a host keeps answering
    for, so that a guest still on the old version loses no request while it reloads)."""

    def __init__(self, first: LinearModel, load: Callable[[], LinearModel],
                 check: Callable[[LinearModel], None]) -> None:
        self._load, self._check = load, check
        self._lock = threading.Lock()
        check(first)
        self.current: LinearModel = first
        self.previous: LinearModel | None = None
        self.reloads = 0

    def get(self, version: str = "") -> LinearModel | None:
        """The model of ``version`` (the current one when empty), or None if not held."""
        current, previous = self.current, self.previous
        if not version or version == current.version:
            return current
        if previous is not None and version == previous.version:
            return previous
        return None

    @property
    def versions(self) -> list[str]:
        return [m.version for m in (self.current, self.previous) if m is not None]

    def reload(self) -> LinearModel:
        """Load the model folder again; the new model serves every request that starts after."""
        with self._lock:
            model = self._load()
            self._check(model)
            if model.version != self.current.version:
                self.previous = self.current
            self.current = model
            self.reloads += 1
        log.info("serving model %s (%s) of %s", model.version, model.digest, model.party)
        return model


def store_mismatch(model: Any, store: Any) -> str:
    """Why a model and a store do not fit: one is sparse, the other dense."""
    where = getattr(store, "path", store)
    if model.kind == "sparse":
        return (f"model {model.version} is a sparse LR model (features keyed by id): its store must hold sparse "
                f"rows, and {where} holds dense ones; build it from the party's LibSVM or tag:value file "
                "(`fedps serve --build-store FILE --format libsvm|tag_value`, docs/operations.md, 'Online serving')")
    return (f"model {model.version} has named features, and the store {where} holds sparse rows: build it from "
            "the party's Parquet features")
