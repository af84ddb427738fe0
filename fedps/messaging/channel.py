"""A sealed, ordered, restartable channel between two parties over Kafka.

``Channel(job, me, peer, config)`` owns two topics, one per direction
(``<prefix>.<job>.<sender>.<receiver>``, one partition each). ``send`` seals a
value in chunks under the direction's key; ``recv`` hands over the value with
the wanted tag, buffering others that arrive first. The consumer's position is
committed (to Kafka and to the party's state folder) only after a value has
been handed over, and a restarted party carries on from there.

A record that is not a genuine frame of this channel (garbage, an altered,
foreign or misdirected copy, a frame under another key, an impostor's hello)
is refused: dropped, logged once, counted per reason in ``refused_counts``
and never read again after a resume; with ``on_bad_message = "raise"`` the
first one stops the channel instead. Two things stop it whatever the mode: a
validly signed new hello from the pinned peer (it lost its channel state) and
a topic that ends below the position already reached (the broker lost the
job's topics).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import defaultdict, deque
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from kafka import KafkaConsumer, KafkaProducer, TopicPartition
from kafka.admin import KafkaAdminClient
from kafka.errors import KafkaError
from kafka.structs import OffsetAndMetadata

from fedps.errors import DataError, FedpsError, PeerError, ProtocolError
from fedps.messaging import codec, control, identity, topics, wire
from fedps.messaging.config import ChannelConfig, check_name
from fedps.messaging.refusals import Refusals, Refused
from fedps.messaging.state import Position, SessionState, StateFile
from fedps.messaging.tags import Tag

log = logging.getLogger(__name__)

_POLL_S = 0.2
# The embedded broker answers an empty fetch only after fetch_max_wait_ms, even
# when data arrives sooner, so a short wait keeps round trips fast but makes a
# waiting receiver fetch 200 times a second: about a third of a core, taken
# from the computation it waits for. After this long without a record ...
_IDLE_AFTER_S = 0.2
# ... the receiver sleeps between fetches, a twentieth of the time it has
# waited so far and at most this long, so a long wait costs a few percent of
# a core and ends at most about a tenth later than it would have.
_IDLE_SLEEP_S = 0.05
# How long ``open`` waits for a first fetch of a resumed channel's topic, to
# see where the log ends before anything is sent.
_PROBE_S = 5.0
# How long ``close`` waits for pending sends when the channel failed.
_CLOSE_AFTER_ERROR_S = 5.0


def topic_name(prefix: str, job: str, sender: str, receiver: str) -> str:
    return f"{prefix}.{job}.{sender}.{receiver}"


#: Largest message body reassembled into one buffer sized from its first chunk; larger ones grow.
_PREALLOCATE_BYTES = 256 << 20


@dataclass
class _Assembly:
    """Chunks of one message being put back together, copied once into one growing buffer.

    Every chunk but the last has the size of the first, so the first sizes the
    buffer; the value is decoded from the buffer itself (no join of the parts).
    """

    tag: str
    first_offset: int
    last_id_before: tuple[int, int, int]
    chunks: int
    received: int = 0
    filled: int = 0
    body: bytearray = field(default_factory=bytearray)

    def add(self, plaintext: bytes) -> None:
        if self.received == 0 and self.chunks > 1 and len(plaintext) * self.chunks <= _PREALLOCATE_BYTES:
            self.body = bytearray(len(plaintext) * self.chunks)
        end = self.filled + len(plaintext)
        if end <= len(self.body):
            self.body[self.filled:end] = plaintext
        else:
            del self.body[self.filled:]
            self.body += plaintext
        self.filled = end
        self.received += 1

    def value(self) -> bytearray:
        del self.body[self.filled:]   # the last chunk is shorter: at most one chunk's room given back
        body, self.body = self.body, bytearray()
        return body


@dataclass
class _Ready:
    message_id: tuple[int, int]
    first_offset: int
    last_id_before: tuple[int, int, int]
    value: Any


class Channel:
    """Send and receive tagged values between ``me`` and ``peer`` for one job."""

    def __init__(self, job: str, me: str, peer: str, config: ChannelConfig) -> None:
        self.job = check_name("job", job)
        self.me = check_name("party", me)
        self.peer = check_name("party", peer)
        if peer not in config.peers:
            raise PeerError(f"peer {peer!r} has no pinned identity key in this party's configuration")
        self.config = config
        prefix = config.kafka.topic_prefix
        self.out_topic = topic_name(prefix, job, me, peer)
        self.in_topic = topic_name(prefix, job, peer, me)
        self._identity = identity.load_identity(config.identity_key)
        self._pinned = identity.parse_public(config.peers[peer], peer)
        self._file = StateFile(config.state_dir, job, me, peer)
        self._send_lock = threading.Lock()
        self._recv_lock = threading.Lock()
        self._seq = 0
        self._pending: deque = deque()   # (tag, future) of sends not yet acknowledged
        self._last_commit = 0.0
        self._partition = TopicPartition(self.in_topic, 0)
        self._ready: dict[str, deque[_Ready]] = defaultdict(deque)
        self._assembly: dict[tuple[int, int], _Assembly] = {}
        self._handed: list[_Ready] = []   # handed over, not yet committed
        self._delivered: set[tuple[int, int]] = set()
        self._skip: set[int] = set()      # offsets of refused records not yet below the position
        self._next_offset = 0
        self._last_id: tuple[int, int, int] = (-1, -1, -1)
        self._producer: KafkaProducer | None = None
        self._consumer: KafkaConsumer | None = None
        self._state = SessionState()
        self._drop: Callable[[Tag], bool] | None = None
        self._aborts: set[str] = set()
        self._failed: FedpsError | None = None
        self.dropped = 0
        self.refusals = Refusals(self.in_topic, log)
        #: True when ``open`` found this channel's keys from an earlier run (a restarted party).
        self.resumed = False

    @property
    def refused_counts(self) -> dict[str, int]:
        """Refused records of the incoming topic, per reason (see :class:`Refused`)."""
        return dict(self.refusals.counts)

    def refused_summary(self) -> str:
        """How many records were refused on the incoming topic and why, as one sentence."""
        return self.refusals.summary()

    # ------------------------------------------------------------------ lifecycle
    def open(self) -> Channel:
        """Create the topics, restore or run the key exchange, and position the consumer.

        A resumed channel first checks that its topic still reaches the
        position it had read to (PeerError if the broker lost the job's topics).
        """
        options = self.config.kafka.client_options()
        self._ensure_topics(options)
        self._producer = KafkaProducer(
            **options,
            acks="all",
            linger_ms=0,
            max_in_flight_requests_per_connection=1,
            max_request_size=self.config.chunk_bytes + 64 * 1024,
        )
        self._consumer = KafkaConsumer(
            **options,
            group_id=f"{self.in_topic}.reader",
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            fetch_max_wait_ms=self.config.kafka.fetch_max_wait_ms,
            fetch_min_bytes=1,
            # One fetch brings records up to the bound, or one larger record (the broker returns a
            # first record over the bound whole: Kafka's KIP-74, and the embedded broker too). The
            # consumer sends its next fetch as it hands records over, so every idle channel may
            # hold one response: a chunk by default (one fetch per chunk keeps throughput up), and
            # about one small record where a party holds many channels (``fetch_bytes``).
            max_partition_fetch_bytes=self.config.fetch_bound,
            fetch_max_bytes=self.config.fetch_bound,
        )
        self._consumer.assign([self._partition])
        saved = self._file.load()
        if saved is not None:
            self._state = saved
        self._restore_position()
        if self._state.keyed:
            self.resumed = True
            self._probe_log_end()
            self._state.send_epoch += 1
            self._file.save(self._state)
        else:
            self._handshake()
        control.watch(self)   # the peer's ``stopped`` fails any recv at once
        log.debug("channel %s <-> %s open (epoch %d)", self.me, self.peer, self._state.send_epoch)
        return self

    def close(self, *, after_error: bool = False) -> None:
        """Commit what was handed over and release the Kafka clients.

        ``after_error`` (set by ``__exit__`` when an exception is on its way)
        waits only briefly for pending sends and logs instead of raising, so
        the first error is the one that reaches the caller.
        """
        quiet = after_error or self._failed is not None
        try:
            if self._producer is not None and self._state.keyed:
                if quiet:
                    self._producer.flush(timeout=_CLOSE_AFTER_ERROR_S)
                else:
                    self.flush()
            if self._consumer is not None and self._state.keyed and self._failed is None:
                self.commit(wait=True)
        except (FedpsError, KafkaError) as exc:
            if not quiet:
                raise
            log.warning("channel %s -> %s closed after an error; not all sends were confirmed: %s",
                        self.me, self.peer, exc)
        finally:
            if self._producer is not None:
                self._producer.close(timeout=_CLOSE_AFTER_ERROR_S if quiet else None)
            if self._consumer is not None:
                self._consumer.close()
            self._producer = self._consumer = None

    def __enter__(self) -> Channel:
        return self.open() if self._producer is None else self

    def __exit__(self, exc_type: object, *exc: object) -> None:
        self.close(after_error=exc_type is not None)

    # ------------------------------------------------------------------ sending
    def send(self, tag: Tag, value: Any, *, wait: bool = False) -> None:
        """Seal ``value`` under ``tag`` and hand it to the producer.

        Sends are pipelined: the value is on its way when this returns, and
        :meth:`flush` (called by ``close`` and before a checkpoint) waits until
        the broker has everything. ``wait=True`` flushes at once. A delivery
        failure surfaces as PeerError from the next send, flush or recv.
        """
        self._require_open()
        if not isinstance(tag, Tag) or tag.job != self.job:
            raise ProtocolError(f"send needs a Tag of job {self.job!r}, got {tag!r}")
        body = codec.encode(value)
        size = self.config.chunk_bytes - wire.MAX_OVERHEAD
        pieces = [body[i : i + size] for i in range(0, len(body), size)] or [b""]
        key = bytes.fromhex(self._state.send_key)
        with self._send_lock:
            self._check_deliveries()
            self._seq += 1
            for i, piece in enumerate(pieces):
                frame = wire.seal(
                    key, job=self.job, sender=self.me, receiver=self.peer,
                    tag=tag.encode(), epoch=self._state.send_epoch, seq=self._seq,
                    chunk=i, chunks=len(pieces), plaintext=piece,
                )
                self._pending.append((tag, self._producer.send(self.out_topic, partition=0, value=frame)))
        if wait:
            self.flush()

    def flush(self) -> None:
        """Wait until the broker holds every value sent so far."""
        self._require_open()
        with self._send_lock:
            self._producer.flush()
            self._check_deliveries()

    def _check_deliveries(self) -> None:
        while self._pending and self._pending[0][1].is_done:
            tag, future = self._pending.popleft()
            if future.failed():
                self._pending.clear()
                raise PeerError(
                    f"could not deliver {tag} to topic {self.out_topic}: {future.exception}"
                )

    # ------------------------------------------------------------------ aborting
    def abort(self, tag: Tag, reason: str) -> None:
        """Tell the peer, under ``tag``, that this job cannot go on and why; waits until sent.

        A peer that watches ``tag`` (:meth:`stop_on`) fails its current or next
        ``recv`` at once with ``reason``, instead of waiting for its timeout.
        """
        self.send(tag, {"abort": str(reason)}, wait=True)

    @contextmanager
    def stop_on(self, tag: Tag) -> Iterator[None]:
        """While inside, a value under ``tag`` (the peer's :meth:`abort`) fails ``recv`` at once."""
        key = tag.encode()
        self._aborts.add(key)
        try:
            yield
        finally:
            self._aborts.discard(key)

    def _check_aborts(self, before: int | None = None) -> None:
        """Raise the peer's stop or abort, if one is buffered (only one sent before offset ``before``)."""
        for key in self._aborts:
            if self._ready.get(key) and (before is None or self._ready[key][0].first_offset < before):
                value = self._ready[key][0].value
                stopped = control.stopped_error(self.peer, value)
                if stopped is not None:
                    raise stopped
                reason = value.get("abort") if isinstance(value, dict) else None
                raise PeerError(f"peer {self.peer!r} stopped job {self.job!r}: "
                                f"{reason or 'no reason given'}")

    # ------------------------------------------------------------------ receiving
    def recv(self, tag: Tag, timeout: float | None = None, patient: bool = False) -> Any:
        """Return the value sent under ``tag``; PeerError if none comes within ``timeout`` s.

        A value the peer sent before its ``stopped`` (or an abort watched with
        :meth:`stop_on`) is still returned; only a receive that would otherwise
        wait, or whose value came after the stop, fails at once with it. The
        error of a timeout says how many records were refused meanwhile, and why.
        ``patient``: a value not expected soon (a watch for a rare message, called
        again and again): the wait starts in the idle back-off instead of
        fetching as fast as the broker answers for its first 0.2 s.
        """
        self._require_open()
        key = tag.encode()
        limit = self.config.recv_timeout_s if timeout is None else timeout
        deadline = time.monotonic() + limit
        with self._recv_lock:
            if time.monotonic() - self._last_commit >= self.config.commit_interval_s:
                self.commit()
            active = time.monotonic() - (_IDLE_AFTER_S + 20 * _IDLE_SLEEP_S if patient else 0.0)
            notice = control.WaitNotice(self, str(tag), limit, first_s=10.0, every_s=60.0)
            while not self._ready.get(key):
                self._check_aborts()
                notice.tick()
                now = time.monotonic()
                remaining = deadline - now
                if remaining <= 0:
                    raise PeerError(
                        f"timed out after {limit:g}s waiting for {tag} from peer "
                        f"{self.peer!r} on topic {self.in_topic}; {self.refusals.summary()}"
                    )
                self._check_sends()
                idle = now - active
                if idle < _IDLE_AFTER_S:
                    got = self._poll(min(remaining, _POLL_S))
                else:  # a long wait: one fetch, then sleep instead of spinning
                    got = self._poll(0)
                    if not got:
                        time.sleep(min(remaining, _IDLE_SLEEP_S, idle / 20))
                if got:
                    active = time.monotonic()
            if key not in self._aborts:
                # The peer's values sent before its stop (or abort) are still handed over; one it
                # sent after that, or a receive that would have to wait, fails with the stop.
                self._check_aborts(before=self._ready[key][0].first_offset)
            ready = self._ready[key].popleft()
            value, ready.value = ready.value, None   # the caller holds the value; the channel only counts it
            self._handed.append(ready)
            self._delivered.add(ready.message_id)
            return value

    def _check_sends(self) -> None:
        """Raise a failed delivery; when the broker lost the job's topics, say that instead."""
        try:
            with self._send_lock:
                self._check_deliveries()
        except PeerError:
            self._poll(_POLL_S)   # a restarted broker fails sends first: look at the topic's end
            raise

    def drop(self, predicate: Callable[[Tag], bool]) -> None:
        """Drop, now and from now on, values whose tag matches ``predicate`` unread.

        A resumed job uses this for messages of steps it has already done, so
        they neither reach the protocol nor hold back the committed position.
        """
        self._drop = predicate
        for key in list(self._ready):
            if predicate(Tag.decode(key)):
                self.dropped += len(self._ready.pop(key))

    def rewind(self, position: Position) -> None:
        """Go back to a position recorded by a job checkpoint (resume after a crash).

        Everything buffered is forgotten and the consumer re-reads from there;
        values handed over after that position are handed over again.
        """
        self._require_open()
        if position.topic != self.in_topic:
            raise ProtocolError(f"position of topic {position.topic} cannot rewind channel {self.in_topic}")
        with self._recv_lock:
            self._ready.clear()
            self._assembly.clear()
            self._handed.clear()
            self._next_offset = position.offset
            self._last_id = tuple(position.last_id)  # type: ignore[assignment]
            self._delivered = set(map(tuple, position.delivered))
            self._skip = set(getattr(position, "refused", []))
            self._consumer.seek(self._partition, position.offset)
            self._state.position = position
            self._file.save(self._state)

    def commit(self, wait: bool = False) -> Position:
        """Record as consumed everything handed over (or refused) so far; returns the new position.

        The state file is always written before returning; the Kafka offset
        commit (for monitoring and for tools) is asynchronous unless ``wait``.
        """
        position = self.position()
        saved = self._state.position
        if self._handed or saved is None or (position.offset, position.refused) != (saved.offset, saved.refused):
            self._handed.clear()
            self._last_commit = time.monotonic()
            self._delivered = {m for m in self._delivered if m > position.last_id[:2]}
            self._skip = set(position.refused)
            self._state.position = position
            self._file.save(self._state)
            metadata = f"{position.last_id[0]},{position.last_id[1]},{position.last_id[2]}"
            offsets = {self._partition: OffsetAndMetadata(position.offset, metadata, -1)}
            if wait:
                try:
                    self._consumer.commit(offsets)
                except KafkaError as exc:
                    log.warning("could not commit offset to Kafka (kept in %s): %s", self._file.path, exc)
            else:
                self._consumer.commit_async(offsets)
        return position

    def position(self) -> Position:
        """The committable position: below it, every value was handed over, dropped or refused."""
        held = [r for queue in self._ready.values() for r in queue] + list(self._assembly.values())
        if not held:
            return Position(self.in_topic, self._next_offset, self._last_id, [])
        first = min(held, key=lambda r: r.first_offset)
        delivered = sorted(m for m in self._delivered if m > first.last_id_before[:2])
        refused = sorted(o for o in self._skip if o >= first.first_offset)
        return Position(self.in_topic, first.first_offset, first.last_id_before, delivered, refused)

    def subkeys(self, label: str) -> tuple[bytes, bytes]:
        """``(send_key, recv_key)`` of a sub-channel named ``label``, derived from this channel's keys.

        Per-partition traffic between executor tasks is sealed with these, so
        it needs no key exchange of its own; both parties derive the same pair
        (one's send key is the other's receive key) and the broker learns nothing.
        """
        self._require_open()
        check_name("sub-channel", label)

        def derive(key_hex: str, sender: str, receiver: str) -> bytes:
            info = f"fedps/subchannel/v1|{self.job}|{sender}->{receiver}|{label}".encode()
            return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=info).derive(bytes.fromhex(key_hex))

        return (derive(self._state.send_key, self.me, self.peer),
                derive(self._state.recv_key, self.peer, self.me))

    # ------------------------------------------------------------------ internals
    def _require_open(self) -> None:
        if self._producer is None or not self._state.keyed:
            raise ProtocolError(f"channel {self.me} -> {self.peer} is not open; call open() first")

    def _ensure_topics(self, options: dict) -> None:
        admin = KafkaAdminClient(**options)
        try:
            topics.ensure(admin, {self.out_topic: 1, self.in_topic: 1}, self.config.kafka.replication_factor)
        except KafkaError as exc:
            raise PeerError(
                f"could not create topics on {self.config.kafka.bootstrap_servers}: {exc}"
            ) from exc
        finally:
            admin.close()

    def _restore_position(self) -> None:
        position = self._state.position
        if position is None:
            committed = self._consumer.committed(self._partition, metadata=True)
            if committed is not None and committed.offset >= 0 and committed.metadata:
                last_id = tuple(int(v) for v in committed.metadata.split(","))
                position = Position(self.in_topic, committed.offset, last_id)  # type: ignore[arg-type]
        if position is None:
            position = Position(self.in_topic)
        self._next_offset = position.offset
        self._last_id = tuple(position.last_id)  # type: ignore[assignment]
        self._delivered = set(position.delivered)
        self._skip = set(position.refused)
        self._consumer.seek(self._partition, position.offset)

    # ------------------------------------------------------------------ a lost broker
    def _expected_end(self) -> int:
        """The least the incoming topic must hold: what was read, and the peer's hello once keyed."""
        return max(self._next_offset, 1 if self._state.their_hello else 0)

    def _probe_log_end(self) -> None:
        """Fetch once so the topic's end is known before a resumed channel sends anything."""
        deadline = time.monotonic() + _PROBE_S
        while self._consumer.highwater(self._partition) is None and time.monotonic() < deadline:
            self._poll(_POLL_S)
        self._check_log_end()

    def _check_log_end(self) -> None:
        """PeerError if the topic now ends below where this channel had read (a lost broker).

        The high watermark of the consumer's own fetches is used: the embedded
        broker under-reports ``end_offsets`` when the last batch holds several records.
        """
        end = self._consumer.highwater(self._partition)
        if end is not None and end < self._expected_end():
            raise self._lost(end)

    def _lost(self, found: int) -> PeerError:
        self._failed = PeerError(
            f"the broker lost the topics of this job; rerun it under a new job id (topic "
            f"{self.in_topic} is back at offset {found}, below the position {self._expected_end()} "
            f"this channel had reached)"
        )
        return self._failed

    # ------------------------------------------------------------------ the key exchange
    def _handshake(self) -> None:
        if not self._state.my_hello:
            hello, ephemeral = identity.make_hello(self._identity, self.job, self.me, self.peer)
            self._state.my_hello = hello.to_bytes().hex()
            self._state.my_ephemeral = ephemeral.private_bytes_raw().hex()
            self._file.save(self._state)   # before publishing: a crash re-sends the same hello
        frame = wire.hello_frame(job=self.job, sender=self.me, receiver=self.peer,
                                 body=bytes.fromhex(self._state.my_hello))
        self._producer.send(self.out_topic, partition=0, value=frame)
        self._producer.flush()
        deadline = time.monotonic() + self.config.handshake_timeout_s
        notice = control.WaitNotice(self, "its key exchange: is it started?", self.config.handshake_timeout_s)
        while not self._state.keyed:
            notice.tick()
            control.check_unpinned(self)   # a peer whose key is not the pinned one hears why
            if time.monotonic() > deadline:
                raise PeerError(
                    f"peer {self.peer!r} did not answer the key exchange of job {self.job!r} "
                    f"within {self.config.handshake_timeout_s:g}s (topic {self.in_topic}); "
                    f"{self.refusals.summary()}"
                )
            self._poll(_POLL_S)

    def _accept_hello(self, frame: wire.Frame) -> None:
        """Verify a hello before drawing any conclusion from it, then key the channel."""
        try:
            hello = identity.Hello.from_bytes(frame.body)
            identity.verify_hello(hello, self._pinned, self.job, self.me, self.peer)
        except identity.HelloRefused as exc:
            if exc.reason == "unpinned-hello":
                control.note_unpinned(self, hello)
            raise Refused.of(exc.reason, exc) from None
        if self._state.their_hello:
            if hello.signed == identity.Hello.from_bytes(bytes.fromhex(self._state.their_hello)).signed:
                return  # the peer re-sent its hello after a restart, or a copy of it was replayed
            self._failed = ProtocolError(
                f"peer {self.peer!r} started a new key exchange for job {self.job!r} (its hello is "
                "validly signed by its pinned key); it has lost its channel state, so this job "
                "cannot continue safely: rerun it under a new job id"
            )
            raise self._failed
        mine = X25519PrivateKey.from_private_bytes(bytes.fromhex(self._state.my_ephemeral))
        send_key, recv_key = identity.derive_keys(
            mine, identity.Hello.from_bytes(bytes.fromhex(self._state.my_hello)), hello
        )
        self._state.their_hello = hello.to_bytes().hex()
        self._state.send_key, self._state.recv_key = send_key.hex(), recv_key.hex()
        self._state.my_ephemeral = ""
        self._file.save(self._state)

    # ------------------------------------------------------------------ records
    def _poll(self, timeout_s: float) -> int:
        """Handle the records one fetch brings; returns how many there were.

        A refused record is counted and skipped (and the position committed
        past it), or raises at once in strict mode.
        """
        batches = self._consumer.poll(timeout_ms=int(timeout_s * 1000), max_records=64)
        records = batches.get(self._partition, [])
        refused = False
        for record in records:
            if record.offset < self._next_offset:   # the consumer fell back: the log was replaced
                raise self._lost(record.offset)
            self._next_offset = record.offset + 1
            if record.offset in self._skip:
                log.debug("skipped the record at offset %d of %s, refused before", record.offset, self.in_topic)
                continue
            try:
                self._handle(record.offset, record.value)
            except Refused as exc:
                self._skip.add(record.offset)
                self.refusals.add(record.offset, exc)
                refused = True
                if self.config.on_bad_message == "raise":   # strict: the first one stops the channel
                    self._consumer.seek(self._partition, record.offset + 1)   # the rest is read again
                    self.commit()
                    raise exc.original or exc
        self._check_log_end()
        if refused:
            self.commit()   # so a restart does not read the refused records again
        return len(records)

    def _handle(self, offset: int, data: bytes | None) -> None:
        frame = self._parse(data)
        if frame.kind == wire.KIND_HELLO:
            self._accept_hello(frame)
            return
        if not self._state.keyed:
            raise Refused("unkeyed", f"data message from {self.peer!r} arrived before its key exchange")
        try:
            plaintext = wire.open_sealed(bytes.fromhex(self._state.recv_key), frame)
        except wire.TamperedMessage as exc:
            raise Refused.of("tampered", exc) from None
        if frame.frame_id <= self._last_id or frame.message_id in self._delivered:
            self.dropped += 1
            log.debug("dropped duplicate or replayed frame %s on %s", frame.frame_id, self.in_topic)
            return
        self._abandon_partials(frame.message_id)
        before, self._last_id = self._last_id, frame.frame_id
        assembly = self._assembly.get(frame.message_id)
        if assembly is None:
            if frame.chunk != 0:
                self.dropped += 1   # the start of this message was lost or dropped
                return
            assembly = _Assembly(frame.tag, offset, before, frame.chunks)
            self._assembly[frame.message_id] = assembly
        if frame.chunk != assembly.received or frame.chunks != assembly.chunks or frame.tag != assembly.tag:
            del self._assembly[frame.message_id]
            raise Refused("chunk-order", f"message {frame.message_id} from {self.peer!r} has chunks out of order")
        assembly.add(plaintext)
        del plaintext
        if assembly.received == assembly.chunks:
            del self._assembly[frame.message_id]
            try:
                tag = Tag.decode(assembly.tag)
                value = codec.decode(assembly.value())
            except (ProtocolError, DataError) as exc:
                raise Refused("undecodable", f"message {frame.message_id} from {self.peer!r}: {exc}") from None
            if self._drop is not None and self._drop(tag):
                self.dropped += 1
                return
            ready = _Ready(frame.message_id, assembly.first_offset, assembly.last_id_before, value)
            self._ready[assembly.tag].append(ready)

    def _parse(self, data: bytes | None) -> wire.Frame:
        """Parse and route-check one record, or raise Refused with its reason."""
        try:
            frame = wire.parse(data)
        except wire.NotAFrame as exc:
            raise Refused.of("not-a-frame", exc) from None
        except wire.WrongVersion as exc:
            raise Refused.of("wrong-version", exc) from None
        except ProtocolError as exc:
            raise Refused.of("malformed", exc) from None
        try:
            wire.check_route(frame, self.job, self.peer, self.me)
        except wire.ForeignMessage as exc:
            raise Refused.of("foreign", exc) from None
        return frame

    def _abandon_partials(self, current: tuple[int, int]) -> None:
        """A sender that died mid-message leaves a partial one; a newer message ends it."""
        for message_id in [m for m in self._assembly if m < current]:
            log.warning("abandoning incomplete message %s from %s", message_id, self.peer)
            del self._assembly[message_id]
            self.dropped += 1
