"""The transport interface algorithms use, and an in-process implementation.

A driver's :class:`fedps.messaging.channel.Channel` to a peer and a task's
:class:`fedps.messaging.partitioned.PartitionLink` on one partition both offer
these few methods; :class:`InProcessTransport` offers them over queues in one
process, so a protocol's maths can be tested in seconds without a broker
(every algorithm keeps its real-broker, separate-process tests as well).
"""

from __future__ import annotations

import threading
import time
from collections import defaultdict, deque
from typing import Any, Callable, Protocol, runtime_checkable

from fedps.errors import PeerError, ProtocolError
from fedps.messaging.state import Position
from fedps.messaging.tags import Tag


@runtime_checkable
class Transport(Protocol):
    """Tagged, ordered, restartable delivery of values between this party and one peer."""

    job: str
    peer: str

    def send(self, tag: Tag, value: Any) -> None: ...

    def recv(self, tag: Tag, timeout: float | None = None) -> Any: ...

    def flush(self) -> None: ...

    def position(self) -> Position: ...

    def rewind(self, position: Position) -> None: ...

    def drop(self, predicate: Callable[[Tag], bool]) -> None: ...


class _Pipe:
    """One direction: an append-only log of (tag, value), like a topic."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.log: list[tuple[str, Any]] = []
        self.changed = threading.Condition()


class InProcessTransport:
    """One end of an in-process pair; values are handed over by reference (no copy, no sealing)."""

    def __init__(self, job: str, me: str, peer: str, out: _Pipe, inbox: _Pipe, timeout_s: float = 60.0) -> None:
        self.job, self.me, self.peer = job, me, peer
        self._out, self._in = out, inbox
        self._next = 0
        self._ready: dict[str, deque[tuple[int, Any]]] = defaultdict(deque)
        self._drop: Callable[[Tag], bool] | None = None
        self.timeout_s = timeout_s

    @property
    def in_topic(self) -> str:
        return self._in.name

    def send(self, tag: Tag, value: Any) -> None:
        if not isinstance(tag, Tag) or tag.job != self.job:
            raise ProtocolError(f"send needs a Tag of job {self.job!r}, got {tag!r}")
        with self._out.changed:
            self._out.log.append((tag.encode(), value))
            self._out.changed.notify_all()

    def recv(self, tag: Tag, timeout: float | None = None) -> Any:
        key = tag.encode()
        deadline = time.monotonic() + (self.timeout_s if timeout is None else timeout)
        with self._in.changed:
            while not self._ready.get(key):
                while self._next < len(self._in.log):
                    got, value = self._in.log[self._next]
                    if self._drop is None or not self._drop(Tag.decode(got)):
                        self._ready[got].append((self._next, value))
                    self._next += 1
                if self._ready.get(key):
                    break
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise PeerError(f"timed out waiting for {tag} from peer {self.peer!r} (in-process)")
                self._in.changed.wait(remaining)
            return self._ready[key].popleft()[1]

    def flush(self) -> None:
        pass

    def position(self) -> Position:
        held = [offset for queue in self._ready.values() for offset, _ in queue]
        return Position(self._in.name, min(held) if held else self._next)

    def rewind(self, position: Position) -> None:
        with self._in.changed:
            self._ready.clear()
            self._next = position.offset

    def drop(self, predicate: Callable[[Tag], bool]) -> None:
        self._drop = predicate
        for key in list(self._ready):
            if predicate(Tag.decode(key)):
                del self._ready[key]


def in_process_pair(job: str, a: str, b: str) -> tuple[InProcessTransport, InProcessTransport]:
    """Two connected ends: ``a``'s transport to ``b`` and ``b``'s to ``a``."""
    ab, ba = _Pipe(f"{job}.{a}.{b}"), _Pipe(f"{job}.{b}.{a}")
    return InProcessTransport(job, a, b, ab, ba), InProcessTransport(job, b, a, ba, ab)


def in_process_mesh(job: str, names: list[str]) -> dict[str, dict[str, InProcessTransport]]:
    """Transports between every pair of ``names``: ``mesh[me][peer]``."""
    mesh: dict[str, dict[str, InProcessTransport]] = {n: {} for n in names}
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            mesh[a][b], mesh[b][a] = in_process_pair(job, a, b)
    return mesh
