"""Records a receiver refuses: why, how many, and how to say so.

Anyone who can produce to a topic can write a record that is not a genuine
frame of the channel: garbage, an altered or replayed copy, a frame sealed
with another key, a hello from an impostor. The receiver drops such a record
(or, in strict mode, stops), logs it once as a WARNING naming the topic, the
offset and the reason, and counts it here per reason, so a timeout can say
what arrived instead of the awaited message and a job's metrics can show it.
"""

from __future__ import annotations

import logging
from collections import Counter

from fedps.errors import ProtocolError

#: Warnings logged per reason before further refusals of it go to DEBUG (a flood
#: of garbage must not flood the log too); every refusal is still counted.
LOG_LIMIT = 10


class Refused(ProtocolError):
    """A record the receiver does not accept; ``reason`` is the short key it is counted under.

    Reasons: ``not-a-frame``, ``wrong-version``, ``malformed``, ``foreign``,
    ``tampered``, ``chunk-order``, ``undecodable``, ``unkeyed`` (data before the
    key exchange) and those of a refused hello (``malformed-hello``,
    ``foreign-hello``, ``unpinned-hello``, ``forged-hello``).
    """

    def __init__(self, reason: str, detail: str, original: ProtocolError | None = None) -> None:
        super().__init__(detail)
        self.reason = reason
        #: The error the check raised (a ``wire`` or ``identity`` error), raised as it is in strict mode.
        self.original = original

    @classmethod
    def of(cls, reason: str, exc: ProtocolError) -> Refused:
        return cls(reason, str(exc), exc)


class Refusals:
    """The refusals of one topic: counted per reason, the latest one kept for messages."""

    def __init__(self, topic: str, logger: logging.Logger) -> None:
        self.topic = topic
        self.counts: Counter[str] = Counter()
        self.last = ""
        self._log = logger

    def add(self, offset: int, exc: Refused) -> None:
        self.counts[exc.reason] += 1
        self.last = f"offset {offset}: {exc}"
        if self.counts[exc.reason] <= LOG_LIMIT:
            self._log.warning("refused a record on %s at offset %d (%s): %s",
                              self.topic, offset, exc.reason, exc)
            if self.counts[exc.reason] == LOG_LIMIT:
                self._log.warning("further refused records of reason %s on %s are logged at "
                                  "DEBUG only; they are still counted", exc.reason, self.topic)
        else:
            self._log.debug("refused a record on %s at offset %d (%s): %s",
                            self.topic, offset, exc.reason, exc)

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def summary(self) -> str:
        """One sentence for an error message: how many records were refused there, and why."""
        if not self.counts:
            return f"no records were refused on topic {self.topic}"
        why = ", ".join(f"{reason}: {n}" for reason, n in self.counts.most_common())
        noun = "record was" if self.total == 1 else "records were"
        return f"{self.total} {noun} refused on topic {self.topic} ({why}; the last at {self.last})"
