"""Settings of a vertical logistic regression job (``[job] params``)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Mapping

from fedps.errors import ConfigError

_OPTIMIZERS = ("sgd", "adagrad", "adam", "ftrl")


@dataclass(frozen=True)
class LRParams:
    """Training settings; both parties must agree on those marked *shared*."""

    # parties (shared); empty: a guest with its peers as hosts, or a host with one peer
    guest: str = ""
    hosts: tuple[str, ...] = ()
    # what to do: "train", or "predict" new rows with a trained model
    mode: str = "train"
    model: str = ""                 # predict: this party's model.json from training
    # data
    train: str = ""                 # Parquet from PSI, or a CSV/Parquet file with ``id_column``
    id_column: str = "id"
    label_column: str = "y"         # guest only
    feature_columns: tuple[str, ...] = ()   # empty: every column but id and label
    # optimisation (shared)
    epochs: int = 10
    batch_size: int = 0             # 0: grows with the rows (engine/vertical/plan.py, auto_batch_size)
    learning_rate: float = 0.02
    optimizer: str = "adam"
    l1: float = 0.0
    l2: float = 0.0
    schedule: str = "inverse_time"
    decay_rate: float = 0.5
    decay_steps: int = 0            # 0: one epoch of automatic batches
    tolerance: float = 1e-4         # converged: the epoch loss (label DP: the guest's weights, relative)
    patience: int = 2               # ... changes less than tolerance this many epochs in a row
    standardize: bool = True        # each party standardises its own dense features (its own statistics)
    fit_intercept: bool = True
    seed: int = 0
    # privacy (shared)
    min_batch_ratio: float = 4.0    # batch >= ratio x the largest party's feature count
    d_noise: float = 0.0            # std. dev. of Gaussian noise the guest adds to d
    label_dp: bool = True           # the guest noises every gradient (engine/vertical/privacy.py)
    dp_epsilon: float = 8.0         # label-DP budget at dp_delta over the job's epochs
    dp_delta: float = 1e-5
    dp_noise: float = 0.0           # noise multiplier; 0: the smallest that keeps dp_epsilon over epochs
    dp_clip: float = 2.0            # rows clipped to L2 norm dp_clip * sqrt(features) (standardised)
    dp_on_budget: str = "stop"      # "stop" or "warn" when the next epoch would pass dp_epsilon
    # crypto
    key_bits: int = 2048
    frac_bits: int = 24
    # evaluation (shared)
    validation_fraction: float = 0.3
    evaluate_every: int = 1         # epochs between validation metrics; 0: only at the end
    export_validation: bool = False  # write the validation rows' keys (validation_rows/) per party
    loss_every: int = 1             # batches between encrypted loss computations
    # checkpoints
    checkpoint_every: int = 0       # batches between job checkpoints; 0: never
    # executor layout (shared): rows are spread over this many partitions on every party
    partitions: int = 4
    tasks: int = 0                  # this party's tasks per stage; 0: its Spark's slots (at most partitions)

    def __post_init__(self) -> None:
        positive = {"partitions": self.partitions, "epochs": self.epochs,
                    "learning_rate": self.learning_rate, "min_batch_ratio": self.min_batch_ratio}
        for key, value in positive.items():
            if value <= 0:
                raise ConfigError(f"job.params.{key} must be positive, got {value!r}")
        if self.mode not in ("train", "predict"):
            raise ConfigError(f"job.params.mode must be train or predict, got {self.mode!r}")
        if self.mode == "predict" and not self.model:
            raise ConfigError("job.params.model must name this party's model.json to predict with")
        if self.optimizer not in _OPTIMIZERS:
            raise ConfigError(f"job.params.optimizer must be one of {', '.join(_OPTIMIZERS)}")
        if self.l1 < 0 or self.l2 < 0 or self.d_noise < 0:
            raise ConfigError("job.params.l1, l2 and d_noise must not be negative")
        if not 0.0 <= self.validation_fraction < 1.0:
            raise ConfigError("job.params.validation_fraction must be in [0, 1)")
        if self.key_bits not in (512, 1024, 2048, 3072, 4096):
            raise ConfigError("job.params.key_bits must be 512, 1024, 2048, 3072 or 4096")
        if self.key_bits < 2048:
            import logging

            logging.getLogger(__name__).warning(
                "job.params.key_bits = %d is for tests only; use 2048 or more", self.key_bits)
        if self.label_dp:
            if self.dp_epsilon <= 0 or not 0 < self.dp_delta < 1 or self.dp_clip <= 0:
                raise ConfigError("job.params.dp_epsilon and dp_clip must be positive and dp_delta in (0, 1)")
            if self.dp_on_budget not in ("stop", "warn"):
                raise ConfigError(f"job.params.dp_on_budget must be stop or warn, got {self.dp_on_budget!r}")
        if not 8 <= self.frac_bits <= 40:
            raise ConfigError("job.params.frac_bits must be between 8 and 40")
        for key in ("evaluate_every", "loss_every", "checkpoint_every", "tasks", "batch_size", "decay_steps",
                    "patience", "dp_noise"):
            if getattr(self, key) < 0:
                raise ConfigError(f"job.params.{key} must not be negative")

    def shared(self) -> dict[str, Any]:
        """The settings both parties must agree on, compared at the start of a job."""
        names = ("epochs", "batch_size", "tolerance", "seed", "min_batch_ratio", "d_noise",
                 "validation_fraction", "evaluate_every", "loss_every", "checkpoint_every", "partitions",
                 "patience", "decay_steps", "label_dp", "dp_epsilon", "dp_delta", "dp_noise", "dp_clip",
                 "dp_on_budget")
        return {name: getattr(self, name) for name in names}

    @classmethod
    def from_mapping(cls, params: Mapping[str, Any]) -> LRParams:
        known = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(params) - set(known))
        if unknown:
            raise ConfigError(f"unknown key job.params.{unknown[0]}; known: {', '.join(sorted(known))}")
        values = dict(params)
        for name in ("feature_columns", "hosts"):
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


@dataclass
class TrainState:
    """The protocol state a checkpoint records (besides the PS rows and channel positions)."""

    epoch: int = 0
    batch: int = 0
    step: int = 0
    losses: list[float] = field(default_factory=list)
    batch_losses: list[float] = field(default_factory=list)
    metrics: list[dict] = field(default_factory=list)
    done: bool = False
    calm: int = 0                   # epochs in a row whose change stayed under the tolerance
    last_weights: list[float] = field(default_factory=list)   # guest, label DP: for the convergence test
    epsilon: float = 0.0            # label DP spent so far, at dp_delta
    stopped: str = ""               # why training ended early ("converged", "privacy budget")
