"""Party and job configuration: one TOML file per party and job.

Every section is a frozen dataclass. Unknown keys, wrong types and bad values
are errors that name the key and the file. ``--set section.key=value`` on the
command line overrides a key (the value is read as TOML, or else as a string).
Relative paths are resolved against the folder of the configuration file.
"""

from __future__ import annotations

import dataclasses
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from fedps.errors import ConfigError
from fedps.messaging.config import ChannelConfig, KafkaConfig, check_channel_settings, check_name


def _path() -> Any:
    return field(default="", metadata={"path": True})


@dataclass(frozen=True)
class JobConfig:
    id: str
    #: What ``fedps run`` runs; each algorithm reads its own ``[params]``.
    algorithm: str = "channel_demo"
    params: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        check_name("job", self.id)


@dataclass(frozen=True)
class PartyConfig:
    name: str
    role: str = "guest"
    identity_key: str = _path()
    state_dir: str = _path()
    output_dir: str = _path()

    def __post_init__(self) -> None:
        check_name("party", self.name)
        if self.role not in ("guest", "host", "coordinator"):
            raise ConfigError(f"party.role must be guest, host or coordinator, got {self.role!r}")


@dataclass(frozen=True)
class ChannelSettings:
    chunk_bytes: int = 900_000
    recv_timeout_s: float = 120.0
    handshake_timeout_s: float = 120.0
    commit_interval_s: float = 0.2
    on_bad_message: str = "skip"

    def __post_init__(self) -> None:
        check_channel_settings(self.chunk_bytes, self.recv_timeout_s, self.handshake_timeout_s,
                               self.on_bad_message)


@dataclass(frozen=True)
class SparkConfig:
    #: ``local[2]`` by default; ignored under spark-submit, which brings its own master.
    master: str = "local[2]"
    app_name: str = "fedps"
    log_level: str = "ERROR"
    conf: Mapping[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        levels = ("ALL", "DEBUG", "INFO", "WARN", "ERROR", "FATAL", "OFF")
        if self.log_level not in levels:
            raise ConfigError(f"spark.log_level must be one of {', '.join(levels)}")


@dataclass(frozen=True)
class RayConfig:
    #: Empty: start a local Ray; otherwise ``ray://host:10001`` or a GCS ``host:port``.
    address: str = ""
    object_store_mb: int = 256
    num_cpus: int = 0  # 0: let Ray decide (local mode only)
    namespace: str = "fedps"

    def __post_init__(self) -> None:
        if self.object_store_mb < 64:
            raise ConfigError("ray.object_store_mb must be at least 64")


@dataclass(frozen=True)
class PSSettings:
    """This party's parameter server (``[ps]``): how many shard actors hold its model."""

    #: Shard actors; 0 chooses: 1 for a dense model under 4096 features, else 2.
    shards: int = 0
    #: How long an executor's pull waits for the driver to end a step.
    wait_timeout_s: float = 3600.0

    def __post_init__(self) -> None:
        if self.shards < 0:
            raise ConfigError("ps.shards must not be negative")
        if self.wait_timeout_s <= 0:
            raise ConfigError("ps.wait_timeout_s must be positive")

    def shards_for(self, features: int, sparse: bool) -> int:
        return self.shards or (2 if sparse or features >= 4096 else 1)


@dataclass(frozen=True)
class FedpsConfig:
    job: JobConfig
    party: PartyConfig
    #: Pinned identity keys of the other parties: ``name = "ed25519:<base64>"``.
    peers: Mapping[str, str] = field(default_factory=dict)
    kafka: KafkaConfig = field(default_factory=KafkaConfig)
    channel: ChannelSettings = field(default_factory=ChannelSettings)
    spark: SparkConfig = field(default_factory=SparkConfig)
    ray: RayConfig = field(default_factory=RayConfig)
    ps: PSSettings = field(default_factory=PSSettings)
    source: str = field(default="<memory>", metadata={"internal": True})

    def channel_config(self, bootstrap_servers: str | None = None) -> ChannelConfig:
        """The messaging layer's view of this party (optionally with a resolved broker)."""
        kafka = self.kafka
        if bootstrap_servers is not None:
            kafka = dataclasses.replace(kafka, bootstrap_servers=bootstrap_servers)
        if not self.party.identity_key:
            raise ConfigError(f"party.identity_key is not set in {self.source}")
        return ChannelConfig(
            kafka=kafka,
            identity_key=self.party.identity_key,
            peers=self.peers,
            state_dir=self.party.state_dir or str(Path(self.party.output_dir or ".") / "state"),
            **dataclasses.asdict(self.channel),
        )


def load(path: str | Path, overrides: list[str] | None = None) -> FedpsConfig:
    """Read a party's TOML file, apply ``section.key=value`` overrides, validate."""
    path = Path(path)
    try:
        data = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"configuration file {path} does not exist") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path} is not valid TOML: {exc}") from None
    for item in overrides or []:
        _apply_override(data, item, path)
    return from_mapping(data, source=str(path), base=path.parent)


#: Sections of the party's file that another command reads and validates (``fedps run`` leaves them alone).
OTHER_COMMANDS = {"serving": "fedps serve"}


def from_mapping(data: Mapping[str, Any], source: str = "<memory>", base: Path | None = None) -> FedpsConfig:
    """Build a FedpsConfig from already-parsed TOML data (the sections of ``OTHER_COMMANDS`` aside)."""
    data = {key: value for key, value in data.items() if key not in OTHER_COMMANDS}
    config = _build(FedpsConfig, data, "", source, base or Path.cwd())
    return dataclasses.replace(config, source=source)


def _apply_override(data: dict, item: str, path: Path) -> None:
    key, sep, text = item.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"override {item!r} must look like section.key=value")
    try:
        value = tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        value = text
    parts = key.strip().split(".")
    node = data
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {key!r}: {part!r} is not a section in {path}")
    node[parts[-1]] = value


def _build(cls: type, data: Any, where: str, source: str, base: Path) -> Any:
    label = where or "the top level"
    if not isinstance(data, dict):
        raise ConfigError(f"{label} in {source} must be a table, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if not f.metadata.get("internal")}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        names = ", ".join(f"{where}.{k}" if where else k for k in unknown)
        raise ConfigError(f"unknown key {names} in {source}; known keys: {', '.join(sorted(fields))}")
    values = {}
    for name, value in data.items():
        key = f"{where}.{name}" if where else name
        values[name] = _convert(hints[name], value, key, source, base)
        if fields[name].metadata.get("path") and values[name]:
            values[name] = str((base / values[name]).resolve()) if "://" not in values[name] else values[name]
    try:
        return cls(**values)
    except ConfigError as exc:
        raise ConfigError(f"{exc} (in {source})") from None
    except TypeError as exc:
        missing = [f.name for f in fields.values() if f.name not in values
                   and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
        if missing:
            names = ", ".join(f"{where}.{m}" if where else m for m in missing)
            raise ConfigError(f"missing key {names} in {source}") from None
        raise ConfigError(f"{label} in {source}: {exc}") from None


def _convert(hint: Any, value: Any, key: str, source: str, base: Path) -> Any:
    if dataclasses.is_dataclass(hint):
        return _build(hint, value, key, source, base)
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        options = [a for a in typing.get_args(hint) if a is not type(None)]
        return None if value is None else _convert(options[0], value, key, source, base)
    if origin in (Mapping, dict) or hint is Mapping:
        if not isinstance(value, dict):
            raise ConfigError(f"{key} in {source} must be a table, got {type(value).__name__}")
        return dict(value)
    expected = {int: (int,), float: (int, float), str: (str,), bool: (bool,)}.get(hint)
    if expected is None:
        return value
    if isinstance(value, bool) and hint is not bool or not isinstance(value, expected):
        raise ConfigError(
            f"{key} in {source} must be {hint.__name__}, got {type(value).__name__} {value!r}"
        )
    return float(value) if hint is float else value
