"""What survives a kill -9: the global model in the coordinator's PS, its round journal, a party's round.

- :class:`PSStore`: the global model as a dense float64 table of the
  coordinator's parameter server; saving round ``r``'s model ends PS step
  ``r + 1`` and checkpoints it (``checkpoint_every = 1``). A restarted
  coordinator restores the last complete checkpoint.
- :class:`FileJournal`: at the start of round ``r`` the coordinator records the
  feature names, the position of each party's channel, and then, step by
  step, which parties it read. A coordinator restarted inside round ``r``
  rewinds its channels there and replays the round with the recorded
  parties, re-reading their answers from the topics, so what it sends again
  is what it sent before (the parties drop the copies).
- :class:`PartyState`: the next round a party waits for; a restarted party
  skips the round it was in (the coordinator dropped it there) and rejoins
  at the next one.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from fedps.errors import DataError
from fedps.messaging.state import Position


def _write(path: Path, value: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    tmp = path.with_suffix(".tmp")
    with open(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "w") as handle:
        json.dump(value, handle)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def _read(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except ValueError as exc:
        raise DataError(f"{path} is not JSON ({exc}); delete it to start the job again") from None


class FileJournal:
    """The coordinator's record of the round in progress (see the module docstring)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.data = _read(path) or {}

    @property
    def features(self) -> list[str] | None:
        return self.data.get("features")

    def set_features(self, features: list[str]) -> None:
        self.data["features"] = list(features)
        _write(self.path, self.data)

    def begin(self, round_: int, channels: dict[str, Any]) -> None:
        if self.data.get("round") == round_:
            return   # replaying: keep the positions and decisions of the first attempt
        positions = {p: c.position().to_dict() for p, c in channels.items() if hasattr(c, "position")}
        self.data.update(round=round_, positions=positions, decisions={})
        _write(self.path, self.data)

    def rewind(self, round_: int, channels: dict[str, Any]) -> bool:
        """Put the channels back where round ``round_`` began; False if the journal is of another round."""
        if self.data.get("round") != round_:
            return False
        for party, raw in self.data.get("positions", {}).items():
            channels[party].rewind(Position.from_dict(raw))
        return True

    def decided(self, round_: int, step: str) -> list[str] | None:
        if self.data.get("round") != round_:
            return None
        return self.data.get("decisions", {}).get(step)

    def decide(self, round_: int, step: str, parties: list[str]) -> None:
        if self.data.get("round") == round_:
            self.data.setdefault("decisions", {})[step] = list(parties)
            _write(self.path, self.data)


class PSStore:
    """The global model in the coordinator's PS (table ``model``: dense, width 1, float64)."""

    TABLE = "model"

    def __init__(self, server: Any, size: int, restored: bool) -> None:
        self.server, self.size = server, size
        self.keys = np.arange(size, dtype=np.int64)
        self.restored = restored

    def _pull(self) -> np.ndarray:
        return np.asarray(self.server.table(self.TABLE).pull(self.keys), dtype=np.float64).reshape(-1)

    def current(self) -> tuple[int, np.ndarray | None]:
        if not self.restored:
            return 0, None
        return self.server.step - 1, self._pull()

    def apply(self, round_: int, step: np.ndarray) -> np.ndarray:
        if self.server.step != round_:
            raise DataError(f"the PS is at step {self.server.step}, cannot store the model of round {round_}")
        # The table's optimizer is SGD with learning rate 1: pushing -step adds step.
        self.server.table(self.TABLE).push(self.keys, np.negative(step).reshape(-1, 1))
        self.server.end_step()   # checkpoint_every = 1: the model of every round is on disk
        self.restored = True
        return self._pull()


class PartyState:
    """The round a party may have begun, and the party list of the job's setup."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.data = _read(path) or {}

    @property
    def next_round(self) -> int:
        """A restarted party skips the round it may have begun: it may have sent that round's keys."""
        return int(self.data["started"]) + 1 if "started" in self.data else 0

    @property
    def parties(self) -> list[str]:
        return list(self.data.get("parties", []))

    def save(self, started: int, parties: list[str]) -> None:
        self.data = {"started": started, "parties": list(parties)}
        _write(self.path, self.data)
