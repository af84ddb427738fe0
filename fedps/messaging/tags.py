"""Structured message tags and the scopes that build them.

A tag is ``(job, phase, iteration, batch, name)``. Protocols never spell a
whole tag: they hold a :class:`Scope` for the phase and the current
iteration/batch and write only the message name, so two rounds cannot confuse
their messages. Messages are declared beside their protocol with
:class:`Message`, which names the direction and the value's type.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from typing import Any

from fedps.errors import ProtocolError

_MAX_FIELD = 128


def _check_text(kind: str, value: str) -> str:
    if not isinstance(value, str) or not value or len(value) > _MAX_FIELD:
        raise ValueError(f"tag {kind} must be a non-empty string of at most {_MAX_FIELD} characters")
    return value


@dataclass(frozen=True, order=True)
class Tag:
    """The full address of one message within a job."""

    job: str
    phase: str
    iteration: int
    batch: int
    name: str

    def __post_init__(self) -> None:
        for kind in ("job", "phase", "name"):
            _check_text(kind, getattr(self, kind))
        for kind in ("iteration", "batch"):
            value = getattr(self, kind)
            if not isinstance(value, int) or isinstance(value, bool) or value < -1:
                raise ValueError(f"tag {kind} must be an integer >= -1, got {value!r}")

    def encode(self) -> str:
        """The canonical text form carried (authenticated) in a message header."""
        return json.dumps(
            [self.job, self.phase, self.iteration, self.batch, self.name],
            separators=(",", ":"),
            ensure_ascii=True,
        )

    @classmethod
    def decode(cls, text: str) -> Tag:
        try:
            job, phase, iteration, batch, name = json.loads(text)
            return cls(job, phase, iteration, batch, name)
        except (ValueError, TypeError) as exc:
            raise ProtocolError(f"malformed message tag {text[:200]!r}") from exc

    def __str__(self) -> str:
        return f"{self.job}/{self.phase}/it{self.iteration}/b{self.batch}/{self.name}"


@dataclass(frozen=True)
class Scope:
    """Builds tags for one phase of a job; ``at`` moves it to an iteration and batch."""

    job: str
    phase: str
    iteration: int = -1
    batch: int = -1

    def at(self, iteration: int | None = None, batch: int | None = None) -> Scope:
        return replace(
            self,
            iteration=self.iteration if iteration is None else iteration,
            batch=self.batch if batch is None else batch,
        )

    def sub(self, phase: str) -> Scope:
        return replace(self, phase=f"{self.phase}.{phase}")

    def tag(self, name: str) -> Tag:
        return Tag(self.job, self.phase, self.iteration, self.batch, name)


@dataclass(frozen=True)
class Message:
    """A message declared beside its protocol: its name, direction and value type.

    ``sender`` and ``receiver`` are roles (``"guest"``, ``"host"``, ...). The
    type is checked on both ends, so a protocol that sends the wrong kind of
    value fails at the sender instead of confusing the receiver.
    """

    name: str
    sender: str
    receiver: str
    kind: type | tuple[type, ...]

    def check(self, value: Any) -> Any:
        if not isinstance(value, self.kind):
            raise ProtocolError(
                f"message {self.name!r} ({self.sender} -> {self.receiver}) carries "
                f"{_kind_name(self.kind)}, got {type(value).__name__}"
            )
        return value


def _kind_name(kind: type | tuple[type, ...]) -> str:
    if isinstance(kind, tuple):
        return " or ".join(k.__name__ for k in kind)
    return kind.__name__
