"""A vertical job's durable records: the setup record and the step checkpoints.

``setup.json`` is written *before* this party announces anything: its
Paillier key pair, its mask/noise secret and the job it belongs to. A party
killed at any instant after that restarts with the same keys and the same
secret, so whatever it already sent stays valid (issue: "a crash at any
instant is resumable"). ``job-<step>.json`` records what DESIGN.md's
"Checkpoint and resume" lists besides the PS rows: the algorithm's state, the
positions of the driver channels and of every partition of every link, and
the peers' public keys. Folder 0700, files 0600; the last two step records
are kept.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from phe import paillier

from fedps.errors import ConfigError, DataError
from fedps.messaging.state import Position

KEEP = 2


def _write_private(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    os.chmod(path.parent, 0o700)
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as out:
        json.dump(data, out)
    os.replace(tmp, path)


class JobRecords:
    """The records of one party's job under ``folder`` (``<output_dir>/checkpoint``)."""

    def __init__(self, folder: str | os.PathLike[str], job: str) -> None:
        self.folder = Path(folder)
        self.job = job

    @property
    def ps_dir(self) -> str:
        return str(self.folder / "ps")

    # ------------------------------------------------------------------ setup
    def check_owner(self) -> None:
        """ConfigError if this folder holds the records of another job."""
        path = self.folder / "setup.json"
        try:
            owner = json.loads(path.read_text()).get("job")
        except FileNotFoundError:
            return
        except ValueError as exc:
            raise DataError(f"setup record {path} is unreadable: {exc}") from exc
        if owner != self.job:
            raise ConfigError(
                f"the output folder {self.folder.parent} belongs to job {owner!r}, not {self.job!r}: "
                f"give job {self.job!r} its own party.output_dir, or delete {self.folder} to reuse it")

    def setup(self, key_bits: int) -> tuple[paillier.PaillierPrivateKey | None, bytes, bool]:
        """``(private key, secret, restarted)``: the persisted ones, or new ones persisted now.

        ``key_bits = 0``: a job without Paillier (joint prediction); only the secret is kept.
        """
        path = self.folder / "setup.json"
        self.check_owner()
        if key_bits == 0:
            return None, b"", False
        if path.exists():
            try:
                record = json.loads(path.read_text())
                p, q = int(record["paillier"]["p"]), int(record["paillier"]["q"])
                secret = bytes.fromhex(record["secret"])
            except (ValueError, KeyError, TypeError) as exc:
                raise DataError(f"setup record {path} is unreadable: {exc}") from exc
            if (p * q).bit_length() != key_bits:
                raise ConfigError(f"{path} holds a {(p * q).bit_length()}-bit key but key_bits is {key_bits}; "
                                  "a job keeps its settings across a restart")
            return paillier.PaillierPrivateKey(paillier.PaillierPublicKey(p * q), p, q), secret, True
        from fedps.engine.crypto import generate_keypair

        public, private = generate_keypair(key_bits)
        secret = os.urandom(32)
        _write_private(path, {"job": self.job, "paillier": {"p": str(private.p), "q": str(private.q)},
                              "secret": secret.hex()})
        return private, secret, False

    # ------------------------------------------------------------------ steps
    def _records(self) -> list[Path]:
        return sorted(self.folder.glob("job-*.json")) if self.folder.exists() else []

    def exists(self) -> bool:
        return bool(self._records())

    def save(self, step: int, state: dict[str, Any], public_keys: dict[str, Any],
             positions: dict[str, Position], links: dict[str, int]) -> Path:
        record = {
            "job": self.job,
            "step": step,
            "state": state,
            "public_keys": {name: str(key.n) for name, key in public_keys.items()},
            "positions": {peer: p.to_dict() for peer, p in positions.items()},
            "links": links,
        }
        path = self.folder / f"job-{step:010d}.json"
        _write_private(path, record)
        for old in self._records()[:-KEEP]:
            old.unlink()
        return path

    def load_latest(self) -> dict[str, Any] | None:
        """The last step record (public keys and positions parsed), or None."""
        records = self._records()
        if not records:
            return None
        try:
            record = json.loads(records[-1].read_text())
            record["public_keys"] = {name: paillier.PaillierPublicKey(int(n))
                                     for name, n in record["public_keys"].items()}
            record["positions"] = {peer: Position.from_dict(v) for peer, v in record["positions"].items()}
            record["links"] = {k: int(v) for k, v in record.get("links", {}).items()}
            return record
        except (ValueError, KeyError, TypeError) as exc:
            raise DataError(f"job checkpoint {records[-1]} is unreadable: {exc}") from exc
