"""A sealed, ordered, restartable channel between two parties over Kafka.

``Channel(job, me, peer, config)`` owns two topics, one per direction
(``<prefix>.<job>.<sender>.<receiver>``, one partition each). ``send`` seals a
value in chunks under the direction's key; ``recv`` hands over the value with
the wanted tag, buffering others that arrive first. The consumer's position is
committed (to Kafka and to the party's state folder) only after a value has
been handed over, and a restarted party carries on from there.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import defaultdict, deque
from dataclasses import dataclass, field
from typing import Any, Callable

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from kafka import KafkaConsumer, KafkaProducer, TopicPartition
from kafka.admin import KafkaAdminClient, NewTopic
from kafka.errors import KafkaError, TopicAlreadyExistsError
from kafka.structs import OffsetAndMetadata

from fedps.errors import PeerError, ProtocolError
from fedps.messaging import codec, identity, wire
from fedps.messaging.config import ChannelConfig, check_name
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


def topic_name(prefix: str, job: str, sender: str, receiver: str) -> str:
    return f"{prefix}.{job}.{sender}.{receiver}"


@dataclass
class _Assembly:
    """Chunks of one message being put back together."""

    tag: str
    first_offset: int
    last_id_before: tuple[int, int, int]
    chunks: int
    parts: list[bytes] = field(default_factory=list)


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
        self._next_offset = 0
        self._last_id: tuple[int, int, int] = (-1, -1, -1)
        self._producer: KafkaProducer | None = None
        self._consumer: KafkaConsumer | None = None
        self._state = SessionState()
        self._drop: Callable[[Tag], bool] | None = None
        self.dropped = 0
        self.refused: list[str] = []

    # ------------------------------------------------------------------ lifecycle
    def open(self) -> Channel:
        """Create the topics, restore or run the key exchange, and position the consumer."""
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
            max_partition_fetch_bytes=max(8 << 20, 4 * self.config.chunk_bytes),
        )
        self._consumer.assign([self._partition])
        saved = self._file.load()
        if saved is not None:
            self._state = saved
        self._restore_position()
        if self._state.keyed:
            self._state.send_epoch += 1
            self._file.save(self._state)
        else:
            self._handshake()
        log.debug("channel %s <-> %s open (epoch %d)", self.me, self.peer, self._state.send_epoch)
        return self

    def close(self) -> None:
        """Commit what was handed over and release the Kafka clients."""
        try:
            if self._producer is not None and self._state.keyed:
                self.flush()
            if self._consumer is not None and self._state.keyed:
                self.commit(wait=True)
        finally:
            for client in (self._producer, self._consumer):
                if client is not None:
                    client.close()
            self._producer = self._consumer = None

    def __enter__(self) -> Channel:
        return self.open() if self._producer is None else self

    def __exit__(self, *exc: object) -> None:
        self.close()

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

    # ------------------------------------------------------------------ receiving
    def recv(self, tag: Tag, timeout: float | None = None) -> Any:
        """Return the value sent under ``tag``; PeerError if none comes within ``timeout`` s."""
        self._require_open()
        key = tag.encode()
        limit = self.config.recv_timeout_s if timeout is None else timeout
        deadline = time.monotonic() + limit
        with self._recv_lock:
            if time.monotonic() - self._last_commit >= self.config.commit_interval_s:
                self.commit()
            active = time.monotonic()
            while not self._ready.get(key):
                now = time.monotonic()
                remaining = deadline - now
                if remaining <= 0:
                    raise PeerError(
                        f"timed out after {limit:g}s waiting for {tag} from peer "
                        f"{self.peer!r} on topic {self.in_topic}"
                    )
                with self._send_lock:
                    self._check_deliveries()
                idle = now - active
                if idle < _IDLE_AFTER_S:
                    got = self._poll(min(remaining, _POLL_S))
                else:  # a long wait: one fetch, then sleep instead of spinning
                    got = self._poll(0)
                    if not got:
                        time.sleep(min(remaining, _IDLE_SLEEP_S, idle / 20))
                if got:
                    active = time.monotonic()
            ready = self._ready[key].popleft()
            self._handed.append(ready)
            self._delivered.add(ready.message_id)
            return ready.value

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
            self._consumer.seek(self._partition, position.offset)
            self._state.position = position
            self._file.save(self._state)

    def commit(self, wait: bool = False) -> Position:
        """Record as consumed everything handed over so far; returns the new position.

        The state file is always written before returning; the Kafka offset
        commit (for monitoring and for tools) is asynchronous unless ``wait``.
        """
        position = self.position()
        if self._handed or position.offset != (self._state.position.offset if self._state.position else 0):
            self._handed.clear()
            self._last_commit = time.monotonic()
            self._delivered = {m for m in self._delivered if m > position.last_id[:2]}
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
        """The committable position: below it, every value was handed over or dropped."""
        held = [r for queue in self._ready.values() for r in queue] + list(self._assembly.values())
        if not held:
            return Position(self.in_topic, self._next_offset, self._last_id, [])
        first = min(held, key=lambda r: r.first_offset)
        delivered = sorted(m for m in self._delivered if m > first.last_id_before[:2])
        return Position(self.in_topic, first.first_offset, first.last_id_before, delivered)

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
            for topic in (self.out_topic, self.in_topic):
                try:
                    admin.create_topics(
                        [NewTopic(topic, 1, self.config.kafka.replication_factor)]
                    )
                except TopicAlreadyExistsError:
                    pass
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
        self._consumer.seek(self._partition, position.offset)

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
        while not self._state.keyed:
            if time.monotonic() > deadline:
                raise PeerError(
                    f"peer {self.peer!r} did not answer the key exchange of job {self.job!r} "
                    f"within {self.config.handshake_timeout_s:g}s (topic {self.in_topic})"
                )
            self._poll(_POLL_S)

    def _accept_hello(self, frame: wire.Frame) -> None:
        hello = identity.Hello.from_bytes(frame.body)
        if self._state.their_hello:
            if hello.to_bytes().hex() == self._state.their_hello:
                return  # the peer re-sent its hello after a restart
            raise ProtocolError(
                f"peer {self.peer!r} started a new key exchange for job {self.job!r}; it has "
                "lost its channel state, so this job cannot continue safely"
            )
        identity.verify_hello(hello, self._pinned, self.job, self.me, self.peer)
        mine = X25519PrivateKey.from_private_bytes(bytes.fromhex(self._state.my_ephemeral))
        send_key, recv_key = identity.derive_keys(
            mine, identity.Hello.from_bytes(bytes.fromhex(self._state.my_hello)), hello
        )
        self._state.their_hello = hello.to_bytes().hex()
        self._state.send_key, self._state.recv_key = send_key.hex(), recv_key.hex()
        self._state.my_ephemeral = ""
        self._file.save(self._state)

    def _poll(self, timeout_s: float) -> int:
        """Handle the records one fetch brings; returns how many there were."""
        batches = self._consumer.poll(timeout_ms=int(timeout_s * 1000), max_records=64)
        error: ProtocolError | None = None
        records = batches.get(self._partition, [])
        for record in records:
            self._next_offset = record.offset + 1
            try:
                self._handle(record.offset, record.value)
            except ProtocolError as exc:
                self.refused.append(str(exc))
                log.warning("refused a message on %s at offset %d: %s", self.in_topic, record.offset, exc)
                if self.config.on_bad_message == "raise" and error is None:
                    error = exc
        if error is not None:
            raise error
        return len(records)

    def _handle(self, offset: int, data: bytes) -> None:
        frame = wire.parse(data)
        wire.check_route(frame, self.job, self.peer, self.me)
        if frame.kind == wire.KIND_HELLO:
            self._accept_hello(frame)
            return
        if not self._state.keyed:
            raise ProtocolError(f"data message from {self.peer!r} arrived before its key exchange")
        plaintext = wire.open_sealed(bytes.fromhex(self._state.recv_key), frame)
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
        if frame.chunk != len(assembly.parts) or frame.chunks != assembly.chunks or frame.tag != assembly.tag:
            del self._assembly[frame.message_id]
            raise ProtocolError(f"message {frame.message_id} from {self.peer!r} has chunks out of order")
        assembly.parts.append(plaintext)
        if len(assembly.parts) == assembly.chunks:
            del self._assembly[frame.message_id]
            value = codec.decode(b"".join(assembly.parts))
            if self._drop is not None and self._drop(Tag.decode(assembly.tag)):
                self.dropped += 1
                return
            ready = _Ready(frame.message_id, assembly.first_offset, assembly.last_id_before, value)
            self._ready[assembly.tag].append(ready)

    def _abandon_partials(self, current: tuple[int, int]) -> None:
        """A sender that died mid-message leaves a partial one; a newer message ends it."""
        for message_id in [m for m in self._assembly if m < current]:
            log.warning("abandoning incomplete message %s from %s", message_id, self.peer)
            del self._assembly[message_id]
            self.dropped += 1
