"""Control messages of a channel: a party that stops tells its peer why; a waiting party says so.

- :func:`send_stopped` seals one ``stopped`` message, ``{"stopped": "<kind>: <reason>"}``,
  under the reserved tag ``(job, "control", -1, -1, "stopped")``. Every open
  channel watches that tag, so the peer's current or next ``recv`` fails at
  once with :class:`PeerStopped`: ``"<peer> stopped: <kind>: <reason>"``.
- :class:`WaitNotice` logs, within seconds and then at intervals, which peer
  a party waits for, on which topic and until when.
- A hello signed by a key other than the pinned one, and no genuine hello
  within :data:`UNPINNED_GRACE_S`, ends the key exchange at once
  (:func:`check_unpinned`): the party tells the signer, sealed under keys
  derived from that hello only for this one message, that its identity key is
  not the pinned one, and stops with a ConfigError naming both keys.

The reason text is all a peer learns: no data, only the kind of error and a
sentence about the setting or check that failed (docs/protocols.md).
"""

from __future__ import annotations

import logging
import time
from datetime import datetime, timezone
from typing import Any

from fedps.errors import ConfigError, PeerError
from fedps.messaging import codec, identity, wire
from fedps.messaging.tags import Tag

log = logging.getLogger(__name__)

PHASE, NAME = "control", "stopped"
#: Longest reason text sent to a peer.
MAX_REASON = 400
#: How long a party waits for a genuine hello after one signed by an unpinned key.
UNPINNED_GRACE_S = 5.0


class PeerStopped(PeerError):
    """The peer stopped this job and said why (its ``stopped`` control message)."""


def stop_tag(job: str) -> Tag:
    return Tag(job, PHASE, -1, -1, NAME)


def one_line(text: str, limit: int = MAX_REASON) -> str:
    line = " ".join(str(text).split())
    return line if len(line) <= limit else line[: limit - 1] + "…"


def stop_value(kind: str, reason: str) -> dict[str, str]:
    return {"stopped": f"{one_line(kind, 64)}: {one_line(reason)}"}


def stopped_error(peer: str, value: Any) -> PeerStopped | None:
    """The error a watched ``stopped`` value means (None if ``value`` is not one)."""
    if isinstance(value, dict) and isinstance(value.get("stopped"), str):
        return PeerStopped(f"{peer} stopped: {one_line(value['stopped'])}")
    return None


def watch(channel: Any) -> None:
    """Make every ``recv`` of ``channel`` fail at once when the peer's ``stopped`` arrives."""
    channel._aborts.add(stop_tag(channel.job).encode())


def send_stopped(channel: Any, kind: str, reason: str, timeout_s: float = 5.0) -> bool:
    """Tell the peer this party stopped; True if the broker took the message."""
    if channel._producer is None or not channel._state.keyed:
        return False
    try:
        channel.send(stop_tag(channel.job), stop_value(kind, reason))
        channel._producer.flush(timeout=timeout_s)
        return True
    except Exception as exc:  # noqa: BLE001 - the party is stopping on its own error already
        log.debug("could not tell %s that %s stopped: %s", channel.peer, channel.me, exc)
        return False


class WaitNotice:
    """Logs at INFO what a party waits for: first after ``first_s``, then every ``every_s``."""

    def __init__(self, channel: Any, what: str, limit_s: float, first_s: float = 2.0,
                 every_s: float = 15.0) -> None:
        self.channel, self.what, self.limit_s = channel, what, limit_s
        self.started = time.monotonic()
        self.every_s = every_s
        self.next_s = first_s

    def tick(self) -> None:
        waited = time.monotonic() - self.started
        if waited < self.next_s:
            return
        self.next_s = waited + self.every_s
        until = datetime.fromtimestamp(time.time() + self.limit_s - waited, timezone.utc)
        refused = self.channel.refusals.counts
        extra = f"; refused so far: {self.channel.refused_summary()}" if refused else ""
        log.info("%s: waiting for %s (%s) on topic %s: %.0fs so far, until %s%s", self.channel.me,
                 self.channel.peer, self.what, self.channel.in_topic, waited,
                 until.strftime("%H:%M:%S UTC"), extra)


def note_unpinned(channel: Any, hello: identity.Hello) -> None:
    """Remember a hello signed by an unpinned key that arrived before the key exchange ended."""
    if not channel._state.keyed and getattr(channel, "_unpinned", None) is None:
        channel._unpinned = (time.monotonic(), hello)


def check_unpinned(channel: Any) -> None:
    """During the key exchange: after the grace period, tell the unpinned signer and stop."""
    seen = getattr(channel, "_unpinned", None)
    if seen is None or channel._state.keyed or time.monotonic() - seen[0] < UNPINNED_GRACE_S:
        return
    hello = seen[1]
    pinned = identity.public_text(channel._pinned)
    reason = (f"{channel.me} does not trust {channel.peer}'s identity key: its [peers] pins "
              f"{channel.peer} = {pinned!r}, but {channel.peer} signs with {hello.identity!r}; "
              "fix the pinned key (or party.identity_key) and rerun under a new job id")
    _tell_signer(channel, hello, reason)
    raise ConfigError(f"{reason} (no hello signed by the pinned key came within {UNPINNED_GRACE_S:g}s)")


def _tell_signer(channel: Any, hello: identity.Hello, reason: str) -> None:
    """Seal one ``stopped`` message for whoever signed ``hello``; its keys serve nothing else."""
    from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

    try:
        mine = X25519PrivateKey.from_private_bytes(bytes.fromhex(channel._state.my_ephemeral))
        my_hello = identity.Hello.from_bytes(bytes.fromhex(channel._state.my_hello))
        send_key, _ = identity.derive_keys(mine, my_hello, hello)
        frame = wire.seal(send_key, job=channel.job, sender=channel.me, receiver=channel.peer,
                          tag=stop_tag(channel.job).encode(), epoch=channel._state.send_epoch,
                          seq=1, chunk=0, chunks=1, plaintext=codec.encode(stop_value("ConfigError", reason)))
        channel._producer.send(channel.out_topic, partition=0, value=frame)
        channel._producer.flush(timeout=5.0)
    except Exception as exc:  # noqa: BLE001 - best effort; the party stops with its own error
        log.debug("could not tell the signer of %s's hello why: %s", channel.peer, exc)
