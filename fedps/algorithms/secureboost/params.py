"""Settings of a SecureBoost job (``[job] params``)."""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from typing import Any, Mapping

from fedps.errors import ConfigError

OBJECTIVES = ("binary:logistic", "multi:softmax", "reg:squarederror")


@dataclass(frozen=True)
class SBParams:
    """Training settings; both parties must agree on those listed in :meth:`shared`."""

    # parties; empty: a guest with its peers as hosts, or a host with one peer
    guest: str = ""
    hosts: tuple[str, ...] = ()
    mode: str = "train"               # or "predict" new aligned rows with a trained model
    model: str = ""                   # predict: this party's model.json from training
    # data
    train: str = ""
    id_column: str = "id"
    label_column: str = "y"           # guest only
    feature_columns: tuple[str, ...] = ()
    categorical: tuple[str, ...] = ()  # this party's features split by category (one against the rest)
    # boosting (shared)
    objective: str = "binary:logistic"
    num_class: int = 0                # multi:softmax only
    trees: int = 10                   # boosting rounds (multi-class: one tree per class per round)
    max_depth: int = 3
    learning_rate: float = 0.3
    reg_lambda: float = 1.0
    min_child_weight: float = 1.0
    min_split_gain: float = 0.0
    max_bin: int = 32
    subsample: float = 1.0            # rows per tree (the guest zeroes g and h of the others)
    colsample_bytree: float = 1.0     # each party samples its own features per tree
    goss_top_rate: float = 0.0        # GOSS (0: off): the rows of largest gradient kept per tree ...
    goss_other_rate: float = 0.0      # ... and the share of the others sampled, amplified (goss.py)
    early_stopping_rounds: int = 0    # 0: never; else stop when validation loss has not improved
    validation_fraction: float = 0.0
    seed: int = 0
    # crypto
    key_bits: int = 2048
    precision_bits: int = 24          # fixed-point bits of g and h
    # executor layout (shared)
    partitions: int = 4
    tasks: int = 0

    def __post_init__(self) -> None:
        for key in ("trees", "max_depth", "learning_rate", "max_bin", "partitions"):
            if getattr(self, key) <= 0:
                raise ConfigError(f"job.params.{key} must be positive, got {getattr(self, key)!r}")
        if self.mode not in ("train", "predict"):
            raise ConfigError(f"job.params.mode must be train or predict, got {self.mode!r}")
        if self.mode == "predict" and not self.model:
            raise ConfigError("job.params.model must name this party's model.json to predict with")
        if self.objective not in OBJECTIVES:
            raise ConfigError(f"job.params.objective must be one of {', '.join(OBJECTIVES)}, got {self.objective!r}")
        if self.objective == "multi:softmax" and self.num_class < 2:
            raise ConfigError("job.params.num_class must be at least 2 with objective multi:softmax")
        if self.objective != "multi:softmax" and self.num_class not in (0, 1):
            raise ConfigError("job.params.num_class is for objective multi:softmax only")
        if self.max_depth > 12:
            raise ConfigError("job.params.max_depth must be at most 12")
        if not 2 <= self.max_bin <= 255:
            raise ConfigError("job.params.max_bin must be between 2 and 255")
        for key in ("reg_lambda", "min_child_weight", "min_split_gain"):
            if getattr(self, key) < 0:
                raise ConfigError(f"job.params.{key} must not be negative")
        for key in ("subsample", "colsample_bytree"):
            if not 0.0 < getattr(self, key) <= 1.0:
                raise ConfigError(f"job.params.{key} must be in (0, 1]")
        if self.goss_top_rate or self.goss_other_rate:
            if not (0.0 < self.goss_top_rate < 1.0 and 0.0 < self.goss_other_rate <= 1.0 - self.goss_top_rate):
                raise ConfigError("GOSS needs 0 < job.params.goss_top_rate < 1 and "
                                  "0 < job.params.goss_other_rate <= 1 - goss_top_rate, got "
                                  f"{self.goss_top_rate!r} and {self.goss_other_rate!r}")
            if self.subsample < 1.0:
                raise ConfigError("job.params.goss_top_rate (GOSS) replaces subsample; set one of them only")
        if not 0.0 <= self.validation_fraction < 1.0:
            raise ConfigError("job.params.validation_fraction must be in [0, 1)")
        if self.early_stopping_rounds < 0 or self.tasks < 0:
            raise ConfigError("job.params.early_stopping_rounds and tasks must not be negative")
        if self.early_stopping_rounds and self.validation_fraction == 0:
            raise ConfigError("job.params.early_stopping_rounds needs a validation split "
                              "(job.params.validation_fraction > 0)")
        if self.key_bits not in (512, 1024, 2048, 3072, 4096):
            raise ConfigError("job.params.key_bits must be 512, 1024, 2048, 3072 or 4096")
        if self.key_bits < 2048:
            logging.getLogger(__name__).warning("job.params.key_bits = %d is for tests only; use 2048 or more",
                                                self.key_bits)
        if not 8 <= self.precision_bits <= 40:
            raise ConfigError("job.params.precision_bits must be between 8 and 40")

    @property
    def classes(self) -> int:
        """Trees grown per round (and g/h pairs per row)."""
        return self.num_class if self.objective == "multi:softmax" else 1

    def shared(self) -> dict[str, Any]:
        """The settings every party must agree on, compared at the start of a job."""
        names = ("objective", "num_class", "trees", "max_depth", "max_bin", "subsample", "colsample_bytree",
                 "validation_fraction", "seed", "partitions", "precision_bits", "early_stopping_rounds",
                 "goss_top_rate", "goss_other_rate")
        return {name: getattr(self, name) for name in names}

    @classmethod
    def from_mapping(cls, params: Mapping[str, Any]) -> SBParams:
        known = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(params) - set(known))
        if unknown:
            raise ConfigError(f"unknown key job.params.{unknown[0]}; known: {', '.join(sorted(known))}")
        values = dict(params)
        for name in ("feature_columns", "hosts", "categorical"):
            if name in values:
                if not isinstance(values[name], (list, tuple)):
                    raise ConfigError(f"job.params.{name} must be a list of names")
                values[name] = tuple(values[name])
        for name, value in values.items():
            expected = type(known[name].default)
            if expected is float and isinstance(value, int) and not isinstance(value, bool):
                values[name] = float(value)
            elif not isinstance(values[name], expected) or (expected is int and isinstance(value, bool)):
                raise ConfigError(f"job.params.{name} must be {expected.__name__}, got {value!r}")
        return cls(**values)
