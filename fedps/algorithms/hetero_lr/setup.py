"""The automatic settings of a vertical LR job and what its report says about them.

Pure functions of the settings (and of a finished :class:`~fedps.algorithms.hetero_lr.trainer.Trainer`
for the report): the schedule's epoch length, the label-DP noise and row clip,
the accountant, the noise seed, the restored state. The plaintext harness
(``protocol.plaintext_training``) and the runtime (``trainer.prepare``) both use
them, so the two follow one set of rules.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
from typing import TYPE_CHECKING, Any

from fedps.algorithms.hetero_lr.params import LRParams, TrainState
from fedps.engine.vertical.plan import auto_batch_size, batch_count
from fedps.engine.vertical.privacy import Accountant, calibrate

if TYPE_CHECKING:
    from fedps.algorithms.hetero_lr.trainer import Trainer


def resolved(params: LRParams, rows: int) -> LRParams:
    """Settings that follow from the aligned row count alone (the same on every party)."""
    if params.decay_steps == 0:
        provisional = auto_batch_size(rows, params.validation_fraction)
        params = dataclasses.replace(params, decay_steps=batch_count(rows, provisional, params.validation_fraction))
    return params


def noise_multiplier(params: LRParams) -> float:
    """The label-DP noise multiplier: as set, or the smallest that keeps the budget over the epochs."""
    if not params.label_dp:
        return 0.0
    return params.dp_noise or calibrate(params.dp_epsilon, params.dp_delta, params.epochs)


def clip_norm(params: LRParams, features: int) -> float:
    """The L2 norm a party clips its (standardised) rows to under label DP."""
    return params.dp_clip * math.sqrt(max(features, 1)) if params.label_dp else 0.0


def accountant(params: LRParams) -> Accountant | None:
    sigma = noise_multiplier(params)
    return Accountant(sigma, params.dp_delta) if sigma else None


def privacy_report(trainer: Trainer) -> dict[str, Any]:
    """What ``metrics.json`` says about label DP."""
    params = trainer.params
    if not params.label_dp:
        return {"enabled": False}
    return {"enabled": True, "epsilon": round(trainer.state.epsilon, 4), "delta": params.dp_delta,
            "budget": params.dp_epsilon, "noise_multiplier": round(noise_multiplier(params), 4),
            "epochs_accounted": trainer.state.epoch, "row_clip": params.dp_clip,
            "accountant": "RDP of the Gaussian mechanism, one release per epoch (fedps.engine.vertical.privacy)"}


def transform_json(trainer: Trainer) -> dict[str, Any]:
    """The row transform stored with the model (prediction applies it)."""
    transform = trainer.plan.transform
    return {"transform": transform.to_json()} if transform is not None else {}


def noise_seed(secret: bytes) -> int:
    return int.from_bytes(hashlib.sha256(secret + b"noise").digest()[:8], "big")


def restored_state(record: dict[str, Any] | None) -> TrainState:
    if record is None:
        return TrainState()
    known = {f.name for f in dataclasses.fields(TrainState)}
    return TrainState(**{k: v for k, v in record["state"].items() if k in known})
