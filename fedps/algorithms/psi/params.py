"""PSI settings: ``[job] params = {...}`` read into one frozen dataclass.

Unknown keys and bad values are ConfigErrors naming ``job.params.<key>``.
The settings both parties must share are compared with the peer's before any
data is read (:func:`agreed_view`).
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from fedps.errors import ConfigError

_CHOICES = {
    "format": ("auto", "csv", "parquet", "libsvm", "tag_value"),
    "id_type": ("auto", "string", "integer"),
    "protocol": ("ecdh", "rsa", "ot"),
    "on_null": ("refuse", "drop"),
    "on_duplicate": ("refuse", "drop", "keep"),
    "result": ("both", "guest", "host"),
    "rsa_key_holder": ("guest", "host"),
}
#: Settings that must be equal on both sides (the rest are each party's own business).
SHARED = ("protocol", "buckets", "result", "rsa_key_holder", "rsa_bits", "dry_run")
#: How ids are bucketed and ordered; two fedps versions that differ here would meet the wrong buckets
#: and find a wrong intersection without an error. 2: buckets are ranges of the order key's hash (the
#: version before sent no scheme and bucketed by a separate keyed hash modulo the bucket count).
SCHEME = 2


@dataclass(frozen=True)
class PsiParams:
    #: CSV or Parquet file or folder with one row per sample; relative to the config file.
    input: str
    id_column: str = "id"
    format: str = "auto"
    #: ``auto``: integral Parquet columns and all-digit CSV columns are integers.
    id_type: str = "auto"
    protocol: str = "ecdh"
    #: Ids are split by a keyed hash into this many buckets; bucket i meets only bucket i.
    buckets: int = 8
    #: Points (or RSA values) per channel message.
    batch_size: int = 8192
    on_null: str = "refuse"
    on_duplicate: str = "refuse"
    #: Who learns the intersection; a one-sided result feeds no training.
    result: str = "both"
    rsa_key_holder: str = "host"
    rsa_bits: int = 2048
    #: Output folder: relative to the party's output_dir, or absolute, or a URI (file://, hdfs://, s3a://).
    output: str = "psi"
    #: Work folder (executors read and write it: shared storage on a cluster); "" is <output>/_work.
    work: str = ""
    keep_work: bool = False
    #: Below this many ids (this party's), the buckets are served in the driver: no Spark job per bucket.
    local_below: int = 100_000
    #: Start the sessions, open the channels, compare the settings with the peer, and stop (no ids read).
    dry_run: bool = False
    #: Executor tasks that serve the buckets (one barrier stage); 0: one per task slot, at most one per bucket.
    tasks: int = 0
    #: Longest wait, in seconds, for a step of the peer's (reading its ids, its cryptography).
    wait_s: int = 3600
    #: Incremental PSI (ecdh, rsa): this party's persistent PSI key for this partner; "" runs from scratch.
    #: Its blinded sets are kept beside it (``<key_file>.cache/``). Relative to the config file, or a URI.
    key_file: str = ""
    #: A key older than this is rotated (a new epoch: fresh keys, everything blinded again).
    key_max_age_days: int = 30

    def __post_init__(self) -> None:
        for key, choices in _CHOICES.items():
            if getattr(self, key) not in choices:
                raise ConfigError(f"job.params.{key} must be one of {', '.join(choices)}, "
                                  f"got {getattr(self, key)!r}")
        if not self.input:
            raise ConfigError("job.params.input must name a CSV or Parquet path")
        if not self.id_column:
            raise ConfigError("job.params.id_column must name the id column")
        if not 1 <= self.buckets <= 65536:
            raise ConfigError(f"job.params.buckets must be in 1..65536, got {self.buckets}")
        if not 1 <= self.batch_size <= 1_000_000:
            raise ConfigError(f"job.params.batch_size must be in 1..1000000, got {self.batch_size}")
        if self.tasks < 0:
            raise ConfigError(f"job.params.tasks must be 0 (one per slot) or more, got {self.tasks}")
        if self.local_below < 0:
            raise ConfigError(f"job.params.local_below must be 0 or more, got {self.local_below}")
        if self.wait_s < 1:
            raise ConfigError(f"job.params.wait_s must be positive, got {self.wait_s}")
        if self.rsa_bits < 1024 or self.rsa_bits % 256:
            raise ConfigError(f"job.params.rsa_bits must be a multiple of 256 and at least 1024, "
                              f"got {self.rsa_bits}")
        if self.key_max_age_days < 1:
            raise ConfigError(f"job.params.key_max_age_days must be 1 or more, got {self.key_max_age_days}")
        if self.key_file and self.protocol not in ("ecdh", "rsa"):
            raise ConfigError(f"job.params.key_file (incremental PSI) works with protocols ecdh and rsa, "
                              f"not {self.protocol!r}")
        if self.protocol == "rsa" and self.result == self.rsa_key_holder:
            raise ConfigError("job.params.result: with protocol rsa a one-sided result goes to the "
                              "party that does not hold the key (job.params.rsa_key_holder)")

    def learns(self, role: str) -> bool:
        """Whether the party with ``role`` ends with the intersection."""
        return self.result in ("both", role)

    def agreed_view(self) -> dict[str, Any]:
        """The settings the peer must have set the same way."""
        return {"scheme": SCHEME, **{key: getattr(self, key) for key in SHARED}}


def from_mapping(raw: Mapping[str, Any], base: Path) -> PsiParams:
    """Validate ``job.params``; ``input`` is resolved against ``base`` unless absolute or a URL."""
    fields = {f.name: f for f in dataclasses.fields(PsiParams)}
    unknown = sorted(set(raw) - set(fields))
    if unknown:
        raise ConfigError(f"unknown key {', '.join('job.params.' + k for k in unknown)}; "
                          f"known keys: {', '.join(sorted(fields))}")
    if "input" not in raw:
        raise ConfigError("missing key job.params.input (the CSV or Parquet path of the ids)")
    hints = typing.get_type_hints(PsiParams)
    values = {}
    for name, value in raw.items():
        expected = hints[name]
        if isinstance(value, bool) and expected is not bool or not isinstance(value, expected):
            raise ConfigError(f"job.params.{name} must be {expected.__name__}, got {value!r}")
        values[name] = value
    for name in ("input", "key_file"):
        path = values.get(name, "")
        if path and "://" not in path and not Path(path).is_absolute():
            values[name] = str((base / path).resolve())
    return PsiParams(**values)


def check_agreement(mine: Mapping[str, Any], theirs: Mapping[str, Any], peer: str) -> None:
    """ConfigError naming the first shared setting the peer has set differently."""
    if mine.get("scheme") != theirs.get("scheme"):
        raise ConfigError(f"{peer} runs a fedps whose PSI buckets ids differently (scheme "
                          f"{theirs.get('scheme', 'before 2')!r}, ours {mine.get('scheme')!r}); "
                          f"both parties need a fedps with the same PSI scheme")
    for key in SHARED:
        if mine.get(key) != theirs.get(key):
            raise ConfigError(f"job.params.{key} is {mine.get(key)!r} here but {theirs.get(key)!r} "
                              f"at {peer}; both parties must set it the same way")
