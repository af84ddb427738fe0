"""The job checkpoint of one party: what DESIGN.md's "Checkpoint and resume" lists.

Beside the PS rows (written by the parameter server under ``<folder>/ps``),
one JSON record per checkpointed step holds the protocol state, the consumer
positions of every channel, the party's mask/noise secret and its Paillier key
pair. The folder and files are private to the party (0700/0600); the last two
records are kept.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

from phe import paillier

from fedps.algorithms.hetero_lr.params import TrainState
from fedps.errors import DataError
from fedps.messaging.state import Position

KEEP = 2


class JobCheckpoint:
    def __init__(self, folder: str | os.PathLike[str]) -> None:
        self.folder = Path(folder)

    @property
    def ps_dir(self) -> str:
        return str(self.folder / "ps")

    def exists(self) -> bool:
        """Whether there is a record to resume from."""
        return bool(self._records())

    def _records(self) -> list[Path]:
        return sorted(self.folder.glob("job-*.json")) if self.folder.exists() else []

    def save(self, step: int, private_key: paillier.PaillierPrivateKey, public_keys: dict,
             secret: bytes, state: TrainState, positions: dict[str, Position]) -> Path:
        self.folder.mkdir(parents=True, exist_ok=True, mode=0o700)
        record = {
            "step": step,
            "paillier": {"p": str(private_key.p), "q": str(private_key.q)},
            "public_keys": {name: str(key.n) for name, key in public_keys.items()},
            "secret": secret.hex(),
            "state": dataclasses.asdict(state),
            "positions": {peer: p.to_dict() for peer, p in positions.items()},
        }
        path = self.folder / f"job-{step:010d}.json"
        tmp = path.with_suffix(".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as out:
            json.dump(record, out)
        os.replace(tmp, path)
        for old in self._records()[:-KEEP]:
            old.unlink()
        return path

    def load_latest(self):
        """``(private key, public keys, secret, state, positions)`` of the last record, or None."""
        records = self._records()
        if not records:
            return None
        try:
            record = json.loads(records[-1].read_text())
            public = {name: paillier.PaillierPublicKey(int(n)) for name, n in record["public_keys"].items()}
            p, q = int(record["paillier"]["p"]), int(record["paillier"]["q"])
            key = paillier.PaillierPrivateKey(paillier.PaillierPublicKey(p * q), p, q)
            state = TrainState(**record["state"])
            positions = {peer: Position.from_dict(v) for peer, v in record["positions"].items()}
            return key, public, bytes.fromhex(record["secret"]), state, positions
        except (ValueError, KeyError, TypeError) as exc:
            raise DataError(f"job checkpoint {records[-1]} is unreadable: {exc}") from exc
