"""FedAvg settings: ``[job.params]`` of every party, checked before any peer is waited for."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Mapping

from fedps.errors import ConfigError

MODELS = ("lr", "mlp")
EXECUTOR_MODES = ("auto", "single", "parallel")


@dataclass(frozen=True)
class FedAvgParams:
    """What a FedAvg job does. Coordinator and parties read the same keys; each uses its own.

    Secure aggregation: ``min_parties`` is also the Shamir threshold ``t``: a
    round completes only if at least ``t`` parties reach its end, and any
    ``t - 1`` parties together with the coordinator learn nothing about
    another party's update beyond the sum. Updates are fixed point with
    ``frac_bits`` fractional bits in the ring of integers mod 2^64.
    """

    rounds: int = 10
    model: str = "lr"
    hidden: int = 16
    local_epochs: int = 1
    batch_size: int = 32
    learning_rate: float = 0.1
    l2: float = 0.0
    #: FedProx's proximal weight mu (0: plain FedAvg).
    fedprox_mu: float = 0.0
    server_learning_rate: float = 1.0
    secure: bool = True
    min_parties: int = 2
    #: How long the coordinator waits for the parties at each step of a round.
    deadline_s: float = 60.0
    #: How long the coordinator waits for the parties to join (they build their data layout first).
    join_deadline_s: float = 600.0
    #: After the deadline, how long a party whose message is not in yet is still read.
    grace_s: float = 2.0
    frac_bits: int = 24
    #: Values per message of a party's update at most (864 KiB of float64 by default: one
    #: record of a channel with the default chunk_bytes; a smaller chunk_bytes splits slices
    #: into chunks, which still works). The coordinator adds each slice to the sum as it
    #: arrives, so it holds the sum and a few slices, never a whole update; fewer, larger
    #: slices mean fewer fetches per update (each fetch brings one record of this size).
    slice_values: int = 110592
    seed: int = 0
    # ---- a party's data
    data: str = ""
    id_column: str = "id"
    label_column: str = "y"
    partitions: int = 2
    validation_fraction: float = 0.2
    #: ``single``: one executor task trains on all rows; ``parallel``: every task trains on its
    #: partitions and the party averages them; ``auto``: single below ``single_below_rows``.
    executor_mode: str = "auto"
    single_below_rows: int = 200_000
    #: How long a party waits for the coordinator's next message (0: four deadlines plus a minute).
    party_wait_s: float = 0.0

    def __post_init__(self) -> None:
        if self.model not in MODELS:
            raise ConfigError(f"params.model must be one of {', '.join(MODELS)}, got {self.model!r}")
        if self.executor_mode not in EXECUTOR_MODES:
            raise ConfigError(f"params.executor_mode must be one of {', '.join(EXECUTOR_MODES)}")
        for key in ("rounds", "hidden", "local_epochs", "batch_size", "partitions", "single_below_rows",
                    "slice_values"):
            _integer(key, getattr(self, key), 1)
        _integer("min_parties", self.min_parties, 2)
        _integer("seed", self.seed, 0)
        if not isinstance(self.frac_bits, int) or not 8 <= self.frac_bits <= 40:
            raise ConfigError(f"params.frac_bits must be an integer in [8, 40], got {self.frac_bits!r}")
        for key in ("learning_rate", "server_learning_rate", "deadline_s", "join_deadline_s", "grace_s"):
            if not getattr(self, key) > 0:
                raise ConfigError(f"params.{key} must be positive, got {getattr(self, key)!r}")
        for key in ("l2", "fedprox_mu", "party_wait_s"):
            if getattr(self, key) < 0:
                raise ConfigError(f"params.{key} must not be negative, got {getattr(self, key)!r}")
        if not 0.0 < self.validation_fraction < 1.0:
            raise ConfigError(f"params.validation_fraction must be in (0, 1), got {self.validation_fraction!r}")

    @property
    def party_wait(self) -> float:
        return self.party_wait_s or max(4 * self.deadline_s + 60.0, self.join_deadline_s)

    @classmethod
    def from_mapping(cls, raw: Mapping[str, Any]) -> FedAvgParams:
        fields = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(raw) - set(fields))
        if unknown:
            raise ConfigError(f"unknown FedAvg params {', '.join(unknown)}; known: {', '.join(sorted(fields))}")
        values = {}
        for name, value in raw.items():
            kind = type(fields[name].default)
            if kind is float and isinstance(value, int) and not isinstance(value, bool):
                value = float(value)
            if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
                raise ConfigError(f"params.{name} must be {kind.__name__}, got {value!r}")
            values[name] = value
        return cls(**values)


def _integer(key: str, value: Any, least: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < least:
        raise ConfigError(f"params.{key} must be an integer >= {least}, got {value!r}")
