"""Configuration of the parameter server: frozen dataclasses, checked on creation.

A ``PSConfig`` names the server, its tables, how many shard actors each table
has, how steps are synchronised and where checkpoints go. ``engine`` builds it
from the party's TOML; ``ps`` never reads files or imports ``engine``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from fedps.errors import ConfigError

#: Keys are non-negative int64, so the largest id space is 2**63.
MAX_DIM = 2**63

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
OPTIMIZERS = ("sgd", "adagrad", "adam", "ftrl")
SCHEDULES = ("constant", "exponential", "inverse_time")
INITIALIZERS = ("zeros", "constant", "uniform", "normal")
DTYPES = ("float32", "float64")


def _check_name(key: str, value: str) -> None:
    if not isinstance(value, str) or not _NAME.match(value):
        raise ConfigError(f"{key} must be 1-64 letters, digits, '_', '.' or '-', got {value!r}")


def _positive(key: str, value: float, strict: bool = True) -> None:
    if not isinstance(value, (int, float)) or value < 0 or (strict and value == 0):
        word = "positive" if strict else "non-negative"
        raise ConfigError(f"{key} must be {word}, got {value!r}")


@dataclass(frozen=True)
class OptimizerConfig:
    """The update rule a shard applies to pushed gradients.

    ``learning_rate`` follows ``schedule`` over the step number:
    ``constant``; ``exponential``: ``lr * decay_rate ** (step / decay_steps)``;
    ``inverse_time``: ``lr / (1 + decay_rate * step / decay_steps)``.
    ``l1`` and ``l2`` regularise every rule (FTRL-Proximal natively; the others
    add ``l2 * w`` to the gradient and apply ``l1`` as a proximal shrink).
    For FTRL the learning rate is its ``alpha``.
    """

    name: str = "sgd"
    learning_rate: float = 0.01
    l1: float = 0.0
    l2: float = 0.0
    schedule: str = "constant"
    decay_rate: float = 1.0
    decay_steps: int = 1
    beta1: float = 0.9
    beta2: float = 0.999
    epsilon: float = 1e-8
    initial_accumulator: float = 0.1
    ftrl_beta: float = 1.0

    def __post_init__(self) -> None:
        if self.name not in OPTIMIZERS:
            raise ConfigError(f"optimizer.name must be one of {', '.join(OPTIMIZERS)}, got {self.name!r}")
        if self.schedule not in SCHEDULES:
            raise ConfigError(f"optimizer.schedule must be one of {', '.join(SCHEDULES)}, got {self.schedule!r}")
        _positive("optimizer.learning_rate", self.learning_rate)
        _positive("optimizer.l1", self.l1, strict=False)
        _positive("optimizer.l2", self.l2, strict=False)
        _positive("optimizer.decay_rate", self.decay_rate, strict=self.schedule == "exponential")
        if not isinstance(self.decay_steps, int) or self.decay_steps < 1:
            raise ConfigError(f"optimizer.decay_steps must be an integer >= 1, got {self.decay_steps!r}")
        for key in ("beta1", "beta2"):
            value = getattr(self, key)
            if not 0.0 <= value < 1.0:
                raise ConfigError(f"optimizer.{key} must be in [0, 1), got {value!r}")
        _positive("optimizer.epsilon", self.epsilon)
        _positive("optimizer.initial_accumulator", self.initial_accumulator, strict=False)
        _positive("optimizer.ftrl_beta", self.ftrl_beta, strict=False)


@dataclass(frozen=True)
class InitConfig:
    """Initial value of a row: a pure function of (seed, key, column).

    ``zeros``; ``constant`` (``value``); ``uniform`` in ``[-scale, scale)``;
    ``normal`` with standard deviation ``scale``.
    """

    kind: str = "zeros"
    value: float = 0.0
    scale: float = 0.01
    seed: int = 0

    def __post_init__(self) -> None:
        if self.kind not in INITIALIZERS:
            raise ConfigError(f"initializer.kind must be one of {', '.join(INITIALIZERS)}, got {self.kind!r}")
        _positive("initializer.scale", self.scale, strict=False)
        if not isinstance(self.seed, int) or not 0 <= self.seed < 2**64:
            raise ConfigError(f"initializer.seed must be an integer in [0, 2**64), got {self.seed!r}")


@dataclass(frozen=True)
class TableSpec:
    """One table: ``sparse`` rows keyed by id in ``[0, dim)``, or ``dense`` rows ``0..dim-1``.

    A sparse row exists only once a gradient touched it; a dense table holds
    all ``dim`` rows from the start (use it for small models only).
    """

    name: str
    width: int = 1
    kind: str = "sparse"
    dim: int = MAX_DIM
    dtype: str = "float32"
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    initializer: InitConfig = field(default_factory=InitConfig)

    def __post_init__(self) -> None:
        _check_name("table.name", self.name)
        if not isinstance(self.width, int) or not 1 <= self.width <= 65536:
            raise ConfigError(f"table {self.name}: width must be an integer in [1, 65536], got {self.width!r}")
        if self.kind not in ("sparse", "dense"):
            raise ConfigError(f"table {self.name}: kind must be sparse or dense, got {self.kind!r}")
        if not isinstance(self.dim, int) or not 1 <= self.dim <= MAX_DIM:
            raise ConfigError(f"table {self.name}: dim must be an integer in [1, 2**63], got {self.dim!r}")
        if self.kind == "dense" and self.dim * self.width > 2**31:
            raise ConfigError(f"table {self.name}: dim * width is too large for a dense table; use kind = 'sparse'")
        if self.dtype not in DTYPES:
            raise ConfigError(f"table {self.name}: dtype must be float32 or float64, got {self.dtype!r}")
        if self.optimizer.name == "ftrl" and self.initializer.kind != "zeros":
            raise ConfigError(f"table {self.name}: ftrl derives weights from its state; initializer.kind must be zeros")


@dataclass(frozen=True)
class PSConfig:
    """A parameter server: its tables, shards per table, synchronisation, checkpoints.

    ``staleness = 0`` is synchronous: pushes of step ``s`` are buffered and
    applied together, in worker order, when the step ends (``end_step`` on the
    driver, or every one of ``num_workers`` calling ``finish_step``), so the
    result never depends on timing. ``staleness = k > 0`` applies pushes at once
    and makes a pull of step ``s`` wait until every worker finished step
    ``s - k`` (bounded staleness; needs ``num_workers``).
    """

    name: str
    tables: tuple[TableSpec, ...]
    num_shards: int = 2
    namespace: str = "fedps"
    staleness: int = 0
    num_workers: int = 0
    wait_timeout_s: float = 300.0
    checkpoint_dir: str = ""
    checkpoint_every: int = 0
    keep_checkpoints: int = 2
    shard_num_cpus: float = 0.0

    def __post_init__(self) -> None:
        _check_name("ps.name", self.name)
        _check_name("ps.namespace", self.namespace)
        object.__setattr__(self, "tables", tuple(self.tables))
        if not self.tables or not all(isinstance(t, TableSpec) for t in self.tables):
            raise ConfigError("ps.tables must hold at least one TableSpec")
        names = [t.name for t in self.tables]
        if len(set(names)) != len(names):
            raise ConfigError(f"ps.tables has duplicate names: {sorted(names)}")
        if not isinstance(self.num_shards, int) or not 1 <= self.num_shards <= 4096:
            raise ConfigError(f"ps.num_shards must be an integer in [1, 4096], got {self.num_shards!r}")
        for key in ("staleness", "num_workers", "checkpoint_every"):
            value = getattr(self, key)
            if not isinstance(value, int) or value < 0:
                raise ConfigError(f"ps.{key} must be a non-negative integer, got {value!r}")
        if self.staleness > 0 and self.num_workers == 0:
            raise ConfigError("ps.staleness > 0 needs ps.num_workers (whose clocks bound the staleness)")
        if self.checkpoint_every and not self.checkpoint_dir:
            raise ConfigError("ps.checkpoint_every needs ps.checkpoint_dir")
        if not isinstance(self.keep_checkpoints, int) or self.keep_checkpoints < 1:
            raise ConfigError(f"ps.keep_checkpoints must be an integer >= 1, got {self.keep_checkpoints!r}")
        _positive("ps.wait_timeout_s", self.wait_timeout_s)
        _positive("ps.shard_num_cpus", self.shard_num_cpus, strict=False)

    def table(self, name: str) -> TableSpec:
        """The spec of table ``name``."""
        for spec in self.tables:
            if spec.name == name:
                return spec
        raise ConfigError(f"ps {self.name} has no table {name!r}; it has {[t.name for t in self.tables]}")
