"""Sealed per-partition links between the executor tasks of two parties.

Task p of party A talks to task p of party B through partition p of a topic
with N partitions, one topic per direction
(``<prefix>.<job>.<sender>.<receiver>.<label>``). The driver derives the
link's keys from its open :class:`~fedps.messaging.channel.Channel`
(``link_spec``) and ships the picklable :class:`LinkSpec` to its tasks; a
task opens a :class:`PartitionLink`, which seals, chunks and sends like the
channel, reads only the partitions it serves (manual assignment), and keeps
one buffer per partition. The caller keeps the positions (``position`` /
``seek``), so a retried task re-reads from where its checkpoint stopped.

Duplicates: a value whose tag was already handed over or buffered on a
partition is dropped, so a retried sender task (a new link instance, a new
epoch) re-sending its messages is harmless; a frame whose message id was
already seen is a replay and is dropped too. Refused records (not a frame,
altered, foreign, under another key, out of chunk order, hellos) are logged,
counted by reason and skipped, or raise at once in strict mode.
"""

from __future__ import annotations

import logging
import secrets
import threading
import time
from collections import Counter, deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable

from kafka import KafkaConsumer, KafkaProducer, TopicPartition
from kafka.admin import KafkaAdminClient
from kafka.errors import KafkaError

from fedps.errors import ConfigError, DataError, PeerError, ProtocolError
from fedps.messaging import codec, topics, wire
from fedps.messaging.channel import topic_name
from fedps.messaging.config import KafkaConfig, check_channel_settings, check_name
from fedps.messaging.tags import Tag

if TYPE_CHECKING:
    from fedps.messaging.channel import Channel

log = logging.getLogger(__name__)

# Fetch pacing as in channel.py: short fetches while records flow, then one
# fetch and a growing sleep (at most _IDLE_SLEEP_S) so a waiting task does not spin.
_POLL_S = 0.2
_IDLE_AFTER_S = 0.2
_IDLE_SLEEP_S = 0.05
_KEY_BYTES = 32


@dataclass(frozen=True)
class LinkSpec:
    """Everything a task needs to open its link; built on the driver, pickled to tasks."""

    kafka: KafkaConfig
    job: str
    me: str
    peer: str
    partitions: int
    send_key: bytes = field(repr=False)
    recv_key: bytes = field(repr=False)
    chunk_bytes: int = 900_000
    recv_timeout_s: float = 600.0
    on_bad_message: str = "skip"
    label: str = "rows"

    def __post_init__(self) -> None:
        for kind, name in (("job", self.job), ("party", self.me), ("party", self.peer),
                           ("link label", self.label)):
            check_name(kind, name)
        if not isinstance(self.partitions, int) or self.partitions < 1:
            raise ConfigError(f"a link needs at least one partition, got {self.partitions!r}")
        for kind in ("send_key", "recv_key"):
            key = getattr(self, kind)
            if not isinstance(key, bytes) or len(key) != _KEY_BYTES:
                raise ConfigError(f"link {kind} must be {_KEY_BYTES} bytes (from Channel.subkeys)")
        check_channel_settings(self.chunk_bytes, self.recv_timeout_s, 1.0, self.on_bad_message)

    @property
    def out_topic(self) -> str:
        return topic_name(self.kafka.topic_prefix, self.job, self.me, self.peer) + "." + self.label

    @property
    def in_topic(self) -> str:
        return topic_name(self.kafka.topic_prefix, self.job, self.peer, self.me) + "." + self.label


def link_spec(channel: Channel, partitions: int, label: str = "rows") -> LinkSpec:
    """The spec of the ``label`` link beside an open driver channel (same settings, derived keys)."""
    send_key, recv_key = channel.subkeys(label)
    config = channel.config
    return LinkSpec(
        kafka=config.kafka, job=channel.job, me=channel.me, peer=channel.peer,
        partitions=partitions, send_key=send_key, recv_key=recv_key,
        chunk_bytes=config.chunk_bytes, recv_timeout_s=config.recv_timeout_s,
        on_bad_message=config.on_bad_message, label=label,
    )


def ensure_topics(spec: LinkSpec) -> None:
    """Create both topics of the link with ``spec.partitions`` partitions (driver side)."""
    admin = KafkaAdminClient(**spec.kafka.client_options())
    try:
        wanted = {spec.out_topic: spec.partitions, spec.in_topic: spec.partitions}
        for topic, have in topics.ensure(admin, wanted, spec.kafka.replication_factor).items():
            if have < spec.partitions:
                raise ProtocolError(
                    f"topic {topic} already exists with {have} partitions, but this job needs "
                    f"{spec.partitions}; rerun under a new job id or delete the topic"
                )
    except KafkaError as exc:
        raise PeerError(f"could not create topics on {spec.kafka.bootstrap_servers}: {exc}") from exc
    finally:
        admin.close()


class _Refused(ProtocolError):
    """A record this link does not accept; ``reason`` is the short key counted in ``refused``."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason


@dataclass
class _Assembly:
    """Chunks of one message being put back together."""

    tag: str
    first_offset: int
    chunks: int
    parts: list[bytes] = field(default_factory=list)


@dataclass
class _Ready:
    first_offset: int
    value: Any


@dataclass
class _Partition:
    """What a link knows about one partition of its inbound topic since its last seek."""

    next_offset: int
    ready: dict[str, _Ready] = field(default_factory=dict)
    assembly: dict[tuple[int, int], _Assembly] = field(default_factory=dict)
    handed: set[str] = field(default_factory=set)
    seen: set[tuple[int, int]] = field(default_factory=set)   # ids completed, dropped or abandoned


class PartitionLink:
    """One task's link to its peer; may serve several partitions in turn."""

    def __init__(self, spec: LinkSpec) -> None:
        self.spec = spec
        self.epoch = secrets.randbits(31)   # a retried task is a new instance: a new epoch
        self._seq = 0
        self._send_lock = threading.Lock()
        self._pending: deque = deque()      # (tag, partition, future) not yet acknowledged
        self._producer: KafkaProducer | None = None
        self._consumer: KafkaConsumer | None = None
        self._parts: dict[int, _Partition] = {}
        self._refused_at: dict[int, Counter] = {}
        self._current: int | None = None    # the partition the consumer is assigned to
        self._drop: Callable[[Tag], bool] | None = None
        self.refused: dict[str, int] = {}
        self.dropped = 0

    # ------------------------------------------------------------------ lifecycle
    def open(self) -> PartitionLink:
        """Create the producer and the (manually assigned, group-less) consumer."""
        options = self.spec.kafka.client_options()
        self._producer = KafkaProducer(
            **options, acks="all", linger_ms=0, max_in_flight_requests_per_connection=1,
            max_request_size=self.spec.chunk_bytes + 64 * 1024,
        )
        self._consumer = KafkaConsumer(
            **options, group_id=None, enable_auto_commit=False, auto_offset_reset="earliest",
            fetch_max_wait_ms=self.spec.kafka.fetch_max_wait_ms, fetch_min_bytes=1,
            max_partition_fetch_bytes=max(8 << 20, 4 * self.spec.chunk_bytes),
        )
        return self

    def close(self) -> None:
        """Flush what was sent and release the Kafka clients."""
        try:
            if self._producer is not None:
                self.flush()
        finally:
            for client in (self._producer, self._consumer):
                if client is not None:
                    client.close()
            self._producer = self._consumer = None
            self._current = None

    def __enter__(self) -> PartitionLink:
        return self.open() if self._producer is None else self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ sending
    def send(self, p: int, tag: Tag, value: Any) -> None:
        """Seal ``value`` under ``tag`` in chunks to partition ``p``; pipelined (see ``flush``)."""
        self._require_open()
        self._check_partition(p)
        if not isinstance(tag, Tag) or tag.job != self.spec.job:
            raise ProtocolError(f"send needs a Tag of job {self.spec.job!r}, got {tag!r}")
        body = codec.encode(value)
        size = self.spec.chunk_bytes - wire.MAX_OVERHEAD
        pieces = [body[i : i + size] for i in range(0, len(body), size)] or [b""]
        with self._send_lock:
            self._check_deliveries()
            self._seq += 1
            for i, piece in enumerate(pieces):
                frame = wire.seal(
                    self.spec.send_key, job=self.spec.job, sender=self.spec.me,
                    receiver=self.spec.peer, tag=tag.encode(), epoch=self.epoch, seq=self._seq,
                    chunk=i, chunks=len(pieces), plaintext=piece,
                )
                future = self._producer.send(self.spec.out_topic, partition=p, value=frame)
                self._pending.append((tag, p, future))

    def flush(self) -> None:
        """Wait until the broker holds every value sent so far."""
        self._require_open()
        with self._send_lock:
            self._producer.flush()
            self._check_deliveries()

    def _check_deliveries(self) -> None:
        while self._pending and self._pending[0][2].is_done:
            tag, p, future = self._pending.popleft()
            if future.failed():
                self._pending.clear()
                raise PeerError(
                    f"could not deliver {tag} to topic {self.spec.out_topic} partition {p}: "
                    f"{future.exception}"
                )

    # ------------------------------------------------------------------ receiving
    def recv(self, p: int, tag: Tag, timeout: float | None = None) -> Any:
        """The value sent under ``tag`` on partition ``p``; PeerError if none comes in time."""
        self._require_open()
        if not isinstance(tag, Tag) or tag.job != self.spec.job:
            raise ProtocolError(f"recv needs a Tag of job {self.spec.job!r}, got {tag!r}")
        state = self._use(p)
        key = tag.encode()
        if key in state.handed:
            raise ProtocolError(f"{tag} was already received on partition {p} of {self.spec.in_topic}")
        limit = self.spec.recv_timeout_s if timeout is None else timeout
        deadline = time.monotonic() + limit
        active = time.monotonic()
        while key not in state.ready:
            now = time.monotonic()
            remaining = deadline - now
            if remaining <= 0:
                raise PeerError(
                    f"timed out after {limit:g}s waiting for {tag} from peer {self.spec.peer!r} "
                    f"on topic {self.spec.in_topic} partition {p}; {self._refusals(p)}"
                )
            with self._send_lock:
                self._check_deliveries()
            idle = now - active
            if idle < _IDLE_AFTER_S:
                got = self._poll(min(remaining, _POLL_S))
            else:  # a long wait: one fetch, then sleep instead of spinning
                got = self._poll(0)
                if not got:
                    self._check_log_end(p, state)
                    time.sleep(min(remaining, _IDLE_SLEEP_S, idle / 20))
            if got:
                active = time.monotonic()
        state.handed.add(key)
        return state.ready.pop(key).value

    def seek(self, p: int, offset: int) -> None:
        """Start (re)reading partition ``p`` at ``offset``, forgetting what was buffered for it."""
        self._require_open()
        self._check_partition(p)
        if not isinstance(offset, int) or offset < 0:
            raise ValueError(f"offset must be a non-negative integer, got {offset!r}")
        tp = TopicPartition(self.spec.in_topic, p)
        start = self._consumer.beginning_offsets([tp])[tp]
        if offset < start:
            raise PeerError(
                f"the broker deleted records of {self.spec.in_topic} partition {p} (the log starts "
                f"at offset {start}, after the recorded position {offset}); raise the topic "
                "retention above the longest outage and rerun under a new job id"
            )
        self._parts[p] = _Partition(offset)
        if self._current == p:   # re-assign, so no high watermark from before the seek is kept
            self._consumer.assign([])
            self._current = None

    def position(self, p: int) -> int:
        """The offset below which every record of ``p`` was handed over, dropped or refused."""
        self._require_open()
        state = self._state(p)
        held = [r.first_offset for r in state.ready.values()]
        held += [a.first_offset for a in state.assembly.values()]
        return min(held) if held else state.next_offset

    def drop(self, predicate: Callable[[Tag], bool]) -> None:
        """Drop, now and from now on, values whose tag matches (messages of steps already done)."""
        self._drop = predicate
        for state in self._parts.values():
            for key in [k for k in state.ready if predicate(Tag.decode(k))]:
                del state.ready[key]
                self.dropped += 1
            for message_id in [m for m, a in state.assembly.items() if predicate(Tag.decode(a.tag))]:
                self._forget(state, message_id)

    # ------------------------------------------------------------------ internals
    def _require_open(self) -> None:
        if self._producer is None:
            raise ProtocolError(f"link {self.spec.me} -> {self.spec.peer} is not open; call open() first")

    def _check_partition(self, p: int) -> None:
        if not isinstance(p, int) or not 0 <= p < self.spec.partitions:
            raise ValueError(f"partition must be in [0, {self.spec.partitions}), got {p!r}")

    def _state(self, p: int) -> _Partition:
        self._check_partition(p)
        if p not in self._parts:
            tp = TopicPartition(self.spec.in_topic, p)
            self._parts[p] = _Partition(self._consumer.beginning_offsets([tp])[tp])
        return self._parts[p]

    def _use(self, p: int) -> _Partition:
        """Point the consumer at partition ``p`` alone, where this link stopped reading it."""
        state = self._state(p)
        if self._current != p:
            tp = TopicPartition(self.spec.in_topic, p)
            self._consumer.assign([tp])
            self._consumer.seek(tp, state.next_offset)
            self._current = p
        return state

    def _poll(self, timeout_s: float) -> int:
        """Handle the records one fetch brings; returns how many there were."""
        batches = self._consumer.poll(timeout_ms=int(timeout_s * 1000), max_records=64)
        count = 0
        for tp, records in batches.items():
            state = self._parts[tp.partition]
            for record in records:
                if record.offset < state.next_offset:   # the consumer fell back: offset out of range
                    raise self._lost(tp, state.next_offset, record.offset)
                state.next_offset = record.offset + 1
                count += 1
                try:
                    self._handle(state, record.offset, record.value or b"")
                except _Refused as exc:
                    self._refuse(tp, record.offset, exc)
        return count

    def _check_log_end(self, p: int, state: _Partition) -> None:
        """Stop at once if the partition now ends below where this link had read (a lost broker).

        The high watermark of the consumer's own fetches is used: the embedded
        broker under-reports ``end_offsets`` when the last batch holds several records.
        """
        tp = TopicPartition(self.spec.in_topic, p)
        end = self._consumer.highwater(tp)
        if end is not None and end < state.next_offset:
            raise self._lost(tp, state.next_offset, end)

    def _lost(self, tp: TopicPartition, expected: int, found: int) -> PeerError:
        return PeerError(
            f"the broker lost the topics of this job; rerun it under a new job id (topic "
            f"{tp.topic} partition {tp.partition} is back at offset {found}, below the position "
            f"{expected} this link had reached)"
        )

    def _refuse(self, tp: TopicPartition, offset: int, exc: _Refused) -> None:
        self.refused[exc.reason] = self.refused.get(exc.reason, 0) + 1
        self._refused_at.setdefault(tp.partition, Counter())[exc.reason] += 1
        log.warning("refused a record on %s partition %d at offset %d (%s): %s",
                    tp.topic, tp.partition, offset, exc.reason, exc)
        if self.spec.on_bad_message == "raise":
            self._consumer.seek(tp, offset + 1)   # the rest of this fetch is read again later
            raise ProtocolError(
                f"refused a record on {tp.topic} partition {tp.partition} at offset {offset} "
                f"({exc.reason}): {exc}"
            )

    def _refusals(self, p: int) -> str:
        counts = self._refused_at.get(p)
        if not counts:
            return "no records were refused there"
        why = ", ".join(f"{reason}: {n}" for reason, n in counts.most_common())
        total = sum(counts.values())
        noun = "record was" if total == 1 else "records were"
        return f"{total} {noun} refused there ({why})"

    def _handle(self, state: _Partition, offset: int, data: bytes) -> None:
        frame, plaintext = self._open(data)
        message_id = frame.message_id
        if message_id in state.seen:
            self.dropped += 1   # a replayed frame of a message already complete
            return
        assembly = state.assembly.get(message_id)
        if assembly is None:
            if frame.chunk != 0:
                raise _Refused("chunk-order", f"chunk {frame.chunk} of message {message_id} "
                                              "arrived without the message's first chunk")
            self._abandon_older(state, frame)
            assembly = state.assembly[message_id] = _Assembly(frame.tag, offset, frame.chunks)
        elif frame.chunk < len(assembly.parts):
            self.dropped += 1   # a replayed chunk of a message being assembled
            return
        elif frame.chunk > len(assembly.parts) or (frame.chunks, frame.tag) != (assembly.chunks, assembly.tag):
            raise _Refused("chunk-order", f"message {message_id} has chunk {frame.chunk} of "
                                          f"{frame.chunks} where chunk {len(assembly.parts)} of "
                                          f"{assembly.chunks} was due")
        assembly.parts.append(plaintext)
        if len(assembly.parts) == assembly.chunks:
            self._complete(state, message_id, assembly)

    def _open(self, data: bytes) -> tuple[wire.Frame, bytes]:
        """Parse, route-check and unseal one record, or raise _Refused with its reason."""
        try:
            frame = wire.parse(data)
        except wire.WrongVersion as exc:
            raise _Refused("wrong-version", str(exc)) from None
        except wire.TamperedMessage as exc:
            raise _Refused("malformed", str(exc)) from None
        except ProtocolError as exc:
            raise _Refused("not-a-frame", str(exc)) from None
        try:
            wire.check_route(frame, self.spec.job, self.spec.peer, self.spec.me)
        except wire.ForeignMessage as exc:
            raise _Refused("foreign", str(exc)) from None
        if frame.kind != wire.KIND_DATA:
            raise _Refused("hello", "a hello frame on a partition link; links never carry key exchanges")
        try:
            return frame, wire.open_sealed(self.spec.recv_key, frame)
        except wire.TamperedMessage as exc:
            raise _Refused("tampered", str(exc)) from None

    def _complete(self, state: _Partition, message_id: tuple[int, int], assembly: _Assembly) -> None:
        del state.assembly[message_id]
        state.seen.add(message_id)
        try:
            tag = Tag.decode(assembly.tag)
            value = codec.decode(b"".join(assembly.parts))
        except (ProtocolError, DataError) as exc:
            raise _Refused("undecodable", f"message {message_id}: {exc}") from None
        if assembly.tag in state.handed or assembly.tag in state.ready or (self._drop and self._drop(tag)):
            self.dropped += 1   # e.g. re-sent by a retried sender task
        else:
            state.ready[assembly.tag] = _Ready(assembly.first_offset, value)
        for other in [m for m, a in state.assembly.items() if a.tag == assembly.tag]:
            self._forget(state, other)   # another sender instance's copy: no longer needed

    def _abandon_older(self, state: _Partition, frame: wire.Frame) -> None:
        """A sender that starts a new message has given up on its unfinished older ones."""
        for message_id in [m for m in state.assembly if m[0] == frame.epoch and m[1] < frame.seq]:
            log.warning("abandoning incomplete message %s on %s from %s",
                        message_id, self.spec.in_topic, self.spec.peer)
            self._forget(state, message_id)

    def _forget(self, state: _Partition, message_id: tuple[int, int]) -> None:
        del state.assembly[message_id]
        state.seen.add(message_id)
        self.dropped += 1
