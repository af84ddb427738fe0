"""The ``[serving]`` section of a party's TOML file, read by ``fedps serve`` only.

``fedps serve --conf party.toml`` takes the party's identity, pinned peers and
job from the usual sections and its serving settings from ``[serving]``
(which ``fedps run`` leaves alone: one party file serves both commands; or give
them with ``--set serving.key=value``).
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from fedps.engine import config as engine_config
from fedps.engine.config import FedpsConfig
from fedps.errors import ConfigError

FAILURE_POLICIES = ("fail", "partial")
ID_HASHES = ("sha256", "hmac")


def _path() -> Any:
    return field(default="", metadata={"path": True})


@dataclass(frozen=True)
class ServingConfig:
    #: gRPC address: the public Guest API on the guest, the Host API on a host.
    listen: str = "127.0.0.1:0"
    #: HTTP address of /healthz, /readyz, /metrics and POST /reload.
    ops_listen: str = "127.0.0.1:0"
    #: Guest: each host's gRPC address, ``name = "host:port"`` (names as in [peers]).
    hosts: Mapping[str, str] = field(default_factory=dict)
    #: Guest: how long it waits for a host's part (also bounded by the caller's deadline).
    host_timeout_s: float = 0.5
    #: Guest: a host that does not answer in time fails the request ("fail") or is
    #: left out of it, its default part used instead ("partial"); counted either way.
    on_host_failure: str = "fail"
    #: Host: the one party allowed to call (default: job.params.guest, or the only pinned peer).
    guest: str = ""
    #: Host: every host of the job (this one too) when their parts are summed under pairwise
    #: masks, so that the guest learns only the sum; empty: this host's part goes in plain.
    mask_with: tuple[str, ...] = ()
    #: Host: the partial score of a row its store does not hold (0: as if every feature were 0).
    unknown_score: float = 0.0
    #: SQLite file built by ``fedps serve --build-store`` (required on a host; optional on the guest).
    store: str = _path()
    #: How an id becomes its 32-byte row key: "sha256" (as the layout of files with
    #: shared ids) or "hmac" (HMAC-SHA256 under the key in ``id_key_file``).
    id_hash: str = "sha256"
    id_key_file: str = _path()
    #: gRPC worker threads and the largest batch accepted.
    workers: int = 8
    max_rows: int = 10_000
    #: Graceful shutdown: how long in-flight requests may take to finish.
    grace_s: float = 5.0
    #: Written once the ports are bound: {"listen": port, "ops": port} as JSON.
    port_file: str = _path()
    #: Optional TLS for the public Guest API (PEM files); empty: plaintext.
    public_cert: str = _path()
    public_key: str = _path()

    def __post_init__(self) -> None:
        if self.on_host_failure not in FAILURE_POLICIES:
            raise ConfigError(f"serving.on_host_failure must be one of {', '.join(FAILURE_POLICIES)}, "
                              f"got {self.on_host_failure!r}")
        if self.id_hash not in ID_HASHES:
            raise ConfigError(f"serving.id_hash must be one of {', '.join(ID_HASHES)}, got {self.id_hash!r}")
        if self.id_hash == "hmac" and not self.id_key_file:
            raise ConfigError("serving.id_hash = \"hmac\" needs serving.id_key_file")
        if self.host_timeout_s <= 0 or self.grace_s < 0:
            raise ConfigError("serving.host_timeout_s must be positive and serving.grace_s not negative")
        if self.workers < 1 or self.max_rows < 1:
            raise ConfigError("serving.workers and serving.max_rows must be at least 1")
        if bool(self.public_cert) != bool(self.public_key):
            raise ConfigError("serving.public_cert and serving.public_key go together")
        if not isinstance(self.mask_with, (list, tuple)) or not all(isinstance(h, str) for h in self.mask_with):
            raise ConfigError("serving.mask_with must be a list of host names")
        object.__setattr__(self, "mask_with", tuple(sorted(set(self.mask_with))))
        if len(self.mask_with) == 1:
            raise ConfigError("serving.mask_with needs every host of the job, at least two")
        for name, address in self.hosts.items():
            if not isinstance(address, str) or ":" not in address:
                raise ConfigError(f"serving.hosts.{name} must be \"host:port\", got {address!r}")


def load(path: str | Path, overrides: list[str] | None = None) -> tuple[FedpsConfig, ServingConfig]:
    """The party's configuration and its ``[serving]`` settings from one TOML file."""
    path = Path(path)
    try:
        data = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"configuration file {path} does not exist") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path} is not valid TOML: {exc}") from None
    for item in overrides or []:
        engine_config._apply_override(data, item, path)
    raw = data.pop("serving", {})
    party = engine_config.from_mapping(data, source=str(path), base=path.parent)
    serving = engine_config._build(ServingConfig, raw, "serving", str(path), path.parent)
    return party, serving
