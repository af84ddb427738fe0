"""The channel's durable state: session keys and how far the consumer has got.

Kept in the party's state folder (mode 0700 folder, 0600 files), written to a
temporary name and renamed, so a crash leaves either the old or the new state.
The recorded position is what DESIGN.md's job checkpoint stores for the channel.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

from fedps.errors import ProtocolError


@dataclass
class Position:
    """Where a receiver stands: everything below ``offset`` has been handed over or dropped.

    ``last_id`` is the newest frame id ``(epoch, seq, chunk)`` below ``offset``;
    ``delivered`` lists message ids at or above ``offset`` that were already
    handed over (values received out of order), so they are not handed again;
    ``refused`` lists offsets at or above ``offset`` of records that were
    refused (hostile or broken), so a resumed receiver skips them unread.
    """

    topic: str
    offset: int = 0
    last_id: tuple[int, int, int] = (-1, -1, -1)
    delivered: list[tuple[int, int]] = field(default_factory=list)
    refused: list[int] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> Position:
        return cls(
            topic=str(data["topic"]),
            offset=int(data["offset"]),
            last_id=tuple(int(v) for v in data["last_id"]),  # type: ignore[arg-type]
            delivered=[(int(e), int(s)) for e, s in data.get("delivered", [])],
            refused=[int(o) for o in data.get("refused", [])],
        )


@dataclass
class SessionState:
    """Everything a restarted party needs to carry on with the same channel."""

    my_hello: str = ""                # hex of our published hello
    my_ephemeral: str = ""            # hex of our X25519 private key (until keys exist)
    their_hello: str = ""             # hex of the peer's hello once verified
    send_key: str = ""
    recv_key: str = ""
    send_epoch: int = 0
    position: Position | None = None

    @property
    def keyed(self) -> bool:
        return bool(self.send_key and self.recv_key)


class StateFile:
    """One JSON file per channel: ``<state_dir>/<job>.<me>-<peer>.channel.json``."""

    def __init__(self, state_dir: str, job: str, me: str, peer: str) -> None:
        self.folder = Path(state_dir)
        self.path = self.folder / f"{job}.{me}-{peer}.channel.json"

    def load(self) -> SessionState | None:
        try:
            data = json.loads(self.path.read_text())
        except FileNotFoundError:
            return None
        except ValueError as exc:
            raise ProtocolError(f"channel state {self.path} is corrupt: {exc}") from exc
        position = data.pop("position", None)
        state = SessionState(**data)
        state.position = Position.from_dict(position) if position else None
        return state

    def save(self, state: SessionState) -> None:
        self.folder.mkdir(parents=True, exist_ok=True, mode=0o700)
        data = asdict(state)
        data["position"] = state.position.to_dict() if state.position else None
        tmp = self.path.with_name(self.path.name + ".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as out:
            json.dump(data, out)
        os.replace(tmp, self.path)
