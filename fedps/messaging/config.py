"""Configuration of the messaging layer: the Kafka connection and one channel.

``messaging`` imports nothing from ``engine``; the engine's TOML loader builds
these dataclasses from a party's configuration file.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Mapping

from fedps.errors import ConfigError

#: Kafka topic names allow these characters; party and job names feed topic names.
NAME_PATTERN = re.compile(r"^[A-Za-z0-9_-]{1,64}$")

#: A stock Kafka broker refuses messages over ``message.max.bytes`` (about 1 MB).
DEFAULT_CHUNK_BYTES = 900_000
MAX_CHUNK_BYTES = 64 * 1024 * 1024

_SECURITY_PROTOCOLS = ("PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL")
_SASL_MECHANISMS = ("PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512", "GSSAPI", "OAUTHBEARER")


def check_name(kind: str, value: str) -> str:
    """Return ``value`` if it is usable in a topic name, else raise ConfigError."""
    if not isinstance(value, str) or not NAME_PATTERN.match(value):
        raise ConfigError(
            f"{kind} name {value!r} is invalid: use 1-64 letters, digits, '_' or '-'"
        )
    return value


@dataclass(frozen=True)
class KafkaConfig:
    """How to reach a Kafka cluster; security settings pass through to kafka-python."""

    bootstrap_servers: str = "127.0.0.1:9092"
    security_protocol: str = "PLAINTEXT"
    sasl_mechanism: str | None = None
    sasl_plain_username: str | None = None
    sasl_plain_password: str | None = None
    ssl_cafile: str | None = None
    ssl_certfile: str | None = None
    ssl_keyfile: str | None = None
    ssl_password: str | None = None
    ssl_check_hostname: bool = True
    topic_prefix: str = "fedps"
    replication_factor: int = 1
    #: How long the broker may hold a fetch open waiting for data; the floor of
    #: every round trip (kafka-python's default is 500 ms).
    fetch_max_wait_ms: int = 5
    request_timeout_ms: int = 30_000

    def __post_init__(self) -> None:
        if not self.bootstrap_servers:
            raise ConfigError("kafka.bootstrap_servers is empty")
        if self.security_protocol not in _SECURITY_PROTOCOLS:
            raise ConfigError(
                f"kafka.security_protocol {self.security_protocol!r} is not one of "
                f"{', '.join(_SECURITY_PROTOCOLS)}"
            )
        if self.security_protocol.startswith("SASL"):
            if self.sasl_mechanism not in _SASL_MECHANISMS:
                raise ConfigError(
                    f"kafka.sasl_mechanism must be one of {', '.join(_SASL_MECHANISMS)} "
                    f"when security_protocol is {self.security_protocol}"
                )
        elif self.sasl_mechanism is not None:
            raise ConfigError(
                "kafka.sasl_mechanism is set but kafka.security_protocol is "
                f"{self.security_protocol}; use SASL_PLAINTEXT or SASL_SSL"
            )
        check_name("kafka.topic_prefix", self.topic_prefix)
        if self.replication_factor < 1:
            raise ConfigError("kafka.replication_factor must be at least 1")
        if not 0 <= self.fetch_max_wait_ms <= 10_000:
            raise ConfigError("kafka.fetch_max_wait_ms must be between 0 and 10000")

    def client_options(self) -> dict[str, Any]:
        """Keyword arguments shared by kafka-python producers, consumers and admins."""
        options: dict[str, Any] = {
            "bootstrap_servers": self.bootstrap_servers.split(","),
            "security_protocol": self.security_protocol,
            "request_timeout_ms": self.request_timeout_ms,
        }
        optional = {
            "sasl_mechanism": self.sasl_mechanism,
            "sasl_plain_username": self.sasl_plain_username,
            "sasl_plain_password": self.sasl_plain_password,
            "ssl_cafile": self.ssl_cafile,
            "ssl_certfile": self.ssl_certfile,
            "ssl_keyfile": self.ssl_keyfile,
            "ssl_password": self.ssl_password,
        }
        options.update({k: v for k, v in optional.items() if v is not None})
        if "SSL" in self.security_protocol:
            options["ssl_check_hostname"] = self.ssl_check_hostname
        return options


@dataclass(frozen=True)
class ChannelConfig:
    """One party's settings for its channels: who it is, whom it trusts, where it keeps state."""

    kafka: KafkaConfig
    #: Path of this party's Ed25519 private identity key (PEM, mode 0600).
    identity_key: str
    #: Pinned public identity keys of the peers, ``name -> "ed25519:<base64>"``.
    peers: Mapping[str, str]
    #: Folder for the channel's session keys and consumer positions (mode 0700).
    state_dir: str
    chunk_bytes: int = DEFAULT_CHUNK_BYTES
    recv_timeout_s: float = 120.0
    handshake_timeout_s: float = 120.0
    #: How often ``recv`` records the position of values handed over (state file
    #: and Kafka); ``close`` and ``commit`` always do. 0 commits on every recv.
    commit_interval_s: float = 0.2
    #: What the channel does with a record it refuses (garbage, altered, foreign, under
    #: another key, an impostor's hello): "skip" drops, logs and counts it and goes on;
    #: "raise" (strict) stops at the first one with ProtocolError.
    on_bad_message: str = "skip"
    #: The most one fetch of the incoming topic brings beyond its first record (a record over the
    #: bound still comes whole). None: one chunk and its framing (``chunk_bytes`` + 64 KiB), the
    #: fastest. An algorithm whose party holds many channels open lowers it (the FedAvg
    #: coordinator: 64 KiB), since every idle channel may hold one fetch response.
    fetch_bytes: int | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "peers", dict(self.peers))
        for name in self.peers:
            check_name("peer", name)
        check_channel_settings(self.chunk_bytes, self.recv_timeout_s, self.handshake_timeout_s,
                               self.on_bad_message)
        if self.commit_interval_s < 0:
            raise ConfigError("channel.commit_interval_s must be 0 or more")
        if self.fetch_bytes is not None and not 4096 <= self.fetch_bytes <= MAX_CHUNK_BYTES:
            raise ConfigError(
                f"channel fetch_bytes must be between 4096 and {MAX_CHUNK_BYTES}, got {self.fetch_bytes}")

    @property
    def fetch_bound(self) -> int:
        """What one fetch may bring: ``fetch_bytes``, or one chunk and its framing."""
        return self.fetch_bytes if self.fetch_bytes is not None else self.chunk_bytes + 64 * 1024


def check_channel_settings(
    chunk_bytes: int, recv_timeout_s: float, handshake_timeout_s: float, on_bad_message: str
) -> None:
    """Validate the ``[channel]`` settings; shared with the engine's configuration."""
    if not 4096 <= chunk_bytes <= MAX_CHUNK_BYTES:
        raise ConfigError(
            f"channel.chunk_bytes must be between 4096 and {MAX_CHUNK_BYTES}, got {chunk_bytes}"
        )
    if recv_timeout_s <= 0:
        raise ConfigError(f"channel.recv_timeout_s must be positive, got {recv_timeout_s}")
    if handshake_timeout_s <= 0:
        raise ConfigError(f"channel.handshake_timeout_s must be positive, got {handshake_timeout_s}")
    if on_bad_message not in ("raise", "skip"):
        raise ConfigError(f"channel.on_bad_message must be 'raise' or 'skip', got {on_bad_message!r}")
