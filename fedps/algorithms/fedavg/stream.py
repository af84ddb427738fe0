"""A party's update in slices, added to the coordinator's sum as each slice arrives.

A party sends its update vector as consecutive slices, each one sealed message
``masked`` of its round with ``batch`` = the slice's index (0, 1, ...). The
coordinator adds each slice into its running sum at once (mod 2^64 for masked
updates, whose sum does not depend on the order), so it never holds a whole
update: only the sum, and the few slices its channel has fetched.

A stream that does not complete (the party is late beyond the deadline, went
away mid-update, or sent a malformed slice) must not leave the slices already
added in the sum. The coordinator then rewinds that party's channel to where
the stream began, reads the same sealed slices again (the topic keeps them)
and subtracts them, so the sum holds exactly the parties whose update came
whole. If those slices cannot be read again, the round's sum is unusable and
:class:`SumSpoiled` stops the coordinator instead of dropping the party.
"""

from __future__ import annotations

import logging
import time
from typing import Any, Callable

import numpy as np

from fedps.errors import DataError, PeerError, ProtocolError
from fedps.messaging.tags import Scope

log = logging.getLogger(__name__)

NAME = "masked"


class SumSpoiled(ProtocolError):
    """A dropped party's slices could not be taken back out of the sum: the round cannot go on."""


#: Values of the first and the last slice at most (64 KiB of float64 or uint64). A channel's
#: consumer keeps the last response it fetched and fetches the next record ahead, one
#: record when it is over 64 KiB (fedps.messaging.channel): so a channel whose update is
#: not read yet holds its small first slice, one already read its small last slice.
EDGE_VALUES = 8192


def cuts(size: int, slice_values: int) -> list[int]:
    """Where the slices of an update of ``size`` values begin, and its end: small first and last slices."""
    edge = min(EDGE_VALUES, slice_values)
    points = [0, min(edge, size)]
    while size - points[-1] > edge:
        points.append(min(points[-1] + slice_values, size - edge))
    if points[-1] < size:
        points.append(size)
    return points


def send(link: Any, scope: Scope, update: np.ndarray, slice_values: int) -> int:
    """Send ``update`` in slices of at most ``slice_values`` values; returns how many slices."""
    if update.ndim != 1 or update.size == 0:
        raise DataError(f"an update must be a non-empty vector, got shape {update.shape}")
    points = cuts(update.size, slice_values)
    for index, (start, stop) in enumerate(zip(points, points[1:])):
        link.send(scope.at(batch=index).tag(NAME), update[start:stop])
    return len(points) - 1


def add(link: Any, scope: Scope, total: np.ndarray, wait: Callable[[], float], who: str) -> None:
    """Add the stream of party ``who`` on ``link`` into ``total``, slice by slice.

    ``wait()`` is how long the whole update may take from now (what one
    message of the step may take). If the stream does not complete in that
    time, the slices already added are subtracted again (see the module
    docstring) and the failure is raised: PeerError or ProtocolError, as for
    any late or malformed message.
    """
    mark = link.position()
    until = time.monotonic() + wait()
    added = 0
    filled = 0
    try:
        while filled < total.size:
            piece = _slice(link, scope, added, total, filled, max(until - time.monotonic(), 0.001), who)
            _apply(total, filled, piece, np.add)
            filled += piece.size
            added += 1
    except (PeerError, ProtocolError, DataError):
        if added:
            _take_back(link, scope, total, mark, added, wait, who)
        raise


def _slice(link: Any, scope: Scope, index: int, total: np.ndarray, filled: int, timeout: float,
           who: str) -> np.ndarray:
    value = link.recv(scope.at(batch=index).tag(NAME), timeout=timeout)
    if not isinstance(value, np.ndarray) or value.dtype != total.dtype or value.ndim != 1:
        kind = f"{value.dtype} {value.shape}" if isinstance(value, np.ndarray) else type(value).__name__
        raise ProtocolError(f"{who} sent slice {index} of its update as {kind}, not a {total.dtype} vector")
    if not 0 < value.size <= total.size - filled:
        raise ProtocolError(f"{who} sent slice {index} of {value.size} values at value {filled} of an "
                            f"update of {total.size}")
    return value


def _apply(total: np.ndarray, start: int, piece: np.ndarray, op: Any) -> None:
    """``total[start:...] (+|-)= piece``, in place (uint64 wraps mod 2^64, as the ring wants)."""
    window = total[start:start + piece.size]
    op(window, piece, out=window)


def _take_back(link: Any, scope: Scope, total: np.ndarray, mark: Any, count: int, wait: Callable[[], float],
               who: str) -> None:
    """Read slices ``0 .. count - 1`` again from where the stream began and subtract them."""
    log.warning("fedavg %s: %s's update stopped after %d slices; taking them back out of the sum",
                scope, who, count)
    filled = 0
    try:
        link.rewind(mark)
        for index in range(count):
            piece = _slice(link, scope, index, total, filled, max(wait(), 30.0), who)
            _apply(total, filled, piece, np.subtract)
            filled += piece.size
    except (PeerError, ProtocolError, DataError) as exc:
        raise SumSpoiled(f"{scope}: {who}'s update stopped after {count} slices were added to the sum, and "
                         f"they could not be read again to take them out ({exc}); the round's sum is "
                         f"unusable") from exc
    commit = getattr(link, "commit", None)
    if commit is not None:
        commit()
