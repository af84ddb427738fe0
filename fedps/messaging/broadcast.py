"""One sealed broadcast from one sender to many receivers: written once, read by all.

The sender encrypts a value once, in chunks, with ChaCha20-Poly1305 under a
fresh 32-byte key used for that value only, and writes the chunks to its
broadcast topic ``<prefix>.<job>.<sender>.to-all.broadcast`` (one partition).
:meth:`BroadcastSender.publish` returns a *ticket*: the topic, the offset of
the first chunk, the chunk count, the size, the key and the SHA-256 digest of
the encoded value. The sender hands the ticket to each receiver through its
pairwise sealed :class:`~fedps.messaging.channel.Channel`, so the ticket is
authenticated as the sender's, for this job and this tag, and its key never
reaches the broker in clear.

A receiver reads the chunks at the ticket's offset and accepts the value only
if every chunk opens under the ticket's key with associated data naming the
job, the sender, the tag and the chunk, and the assembled value has the
ticket's digest. So a record altered on the broker fails its seal; a replay
of another broadcast (another round, another job) is under another key and
names another tag; and another receiver, which holds the key, still cannot
substitute a value of its own, because the digest came over the sender's
pairwise channel. Every refusal is a :class:`BroadcastRefused` naming the
topic, offset and reason. :class:`InProcessBroadcast` runs the same sealing
over a list, for protocol tests without a broker.
"""

from __future__ import annotations

import hashlib
import json
import struct
import time
from collections import deque
from typing import Any, Iterator

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

from fedps.errors import PeerError, ProtocolError
from fedps.messaging import codec, topics
from fedps.messaging.config import DEFAULT_CHUNK_BYTES, KafkaConfig, check_name
from fedps.messaging.tags import Tag

MAGIC, VERSION = b"FPB", 1
_PREFIX = struct.Struct(">3sBH")
_OVERHEAD = 1024            # header, prefix and AEAD tag room in every record
_IN_FLIGHT = 2              # records the sender lets the producer hold at once (memory bound)
_POLL_S = 0.2


class BroadcastRefused(ProtocolError):
    """A broadcast record that is not the one its ticket announced: tampered, replayed or forged."""


def topic_of(prefix: str, job: str, sender: str) -> str:
    return f"{prefix}.{job}.{sender}.to-all.broadcast"


# ------------------------------------------------------------------ sealing (no Kafka)
def _nonce(chunk: int) -> bytes:
    return chunk.to_bytes(12, "big")   # the key seals one value only, so chunk indices never repeat under it


def _header(job: str, sender: str, tag: str, chunk: int, chunks: int) -> bytes:
    text = json.dumps({"job": job, "sender": sender, "tag": tag, "chunk": chunk, "chunks": chunks},
                      separators=(",", ":"), ensure_ascii=True).encode()
    if len(text) + _PREFIX.size + 16 > _OVERHEAD:
        raise ProtocolError(f"broadcast header of {len(text)} bytes is too long; shorten the tag")
    return _PREFIX.pack(MAGIC, VERSION, len(text)) + text


def _pieces(parts: list[memoryview], size: int) -> Iterator[bytes]:
    """The concatenation of ``parts`` in pieces of ``size`` bytes, each copied once."""
    piece = bytearray()
    for part in parts:
        start = 0
        while start < len(part):
            take = min(size - len(piece), len(part) - start)
            piece += part[start: start + take]
            start += take
            if len(piece) == size:
                yield bytes(piece)
                piece = bytearray()
    if piece or not parts:
        yield bytes(piece)


def seal(job: str, sender: str, tag: Tag, value: Any, chunk_bytes: int = DEFAULT_CHUNK_BYTES
         ) -> tuple[dict[str, Any], Iterator[bytes]]:
    """``(ticket without topic and offset, the records)``; records are made one at a time as iterated."""
    parts = codec.encode_parts(value)
    size = sum(len(p) for p in parts)
    digest = hashlib.sha256()
    for part in parts:
        digest.update(part)
    piece = chunk_bytes - _OVERHEAD
    chunks = max(1, -(-size // piece))
    key = ChaCha20Poly1305.generate_key()
    ticket = {"chunks": chunks, "size": size, "key": key.hex(), "digest": digest.hexdigest()}
    text = tag.encode()

    def records() -> Iterator[bytes]:
        cipher = ChaCha20Poly1305(key)
        for i, plain in enumerate(_pieces(parts, piece)):
            header = _header(job, sender, text, i, chunks)
            yield header + cipher.encrypt(_nonce(i), plain, header)

    return ticket, records()


def _readable(tag: Any) -> str:
    try:
        return str(Tag.decode(tag))
    except (ProtocolError, TypeError):
        return repr(tag)[:200]


class _Opener:
    """Checks and assembles the records of one ticket, in order."""

    def __init__(self, job: str, sender: str, tag: Tag, ticket: Any, where: str) -> None:
        try:
            self.key = bytes.fromhex(ticket["key"])
            self.chunks, self.size = int(ticket["chunks"]), int(ticket["size"])
            self.digest = str(ticket["digest"])
            if len(self.key) != 32 or self.chunks < 1 or self.size < 0:
                raise ValueError("bad key, chunk count or size")
        except (KeyError, TypeError, ValueError) as exc:
            raise ProtocolError(f"malformed broadcast ticket for {tag} ({exc})") from None
        self.job, self.sender, self.tag, self.where = job, sender, tag.encode(), where
        self.label = str(tag)
        self.cipher = ChaCha20Poly1305(self.key)
        self.buffer = bytearray(self.size)
        self.filled = 0
        self.next = 0
        self.hash = hashlib.sha256()

    def refuse(self, offset: int, reason: str) -> BroadcastRefused:
        return BroadcastRefused(f"the broadcast of {self.label} from {self.sender} at offset {offset} of "
                                f"{self.where} was refused: {reason}")

    def add(self, offset: int, record: bytes | None) -> bool:
        """Take the record at ``offset``; True once the value is complete."""
        if not record or len(record) < _PREFIX.size or record[:3] != MAGIC:
            raise self.refuse(offset, "it is not a broadcast record")
        magic, version, length = _PREFIX.unpack_from(record)
        if version != VERSION:
            raise self.refuse(offset, f"wire version {version}, this party speaks {VERSION}")
        try:
            header = json.loads(record[_PREFIX.size: _PREFIX.size + length])
            route = (header["job"], header["sender"], header["tag"])
            chunk, chunks = int(header["chunk"]), int(header["chunks"])
        except (ValueError, KeyError, TypeError):
            raise self.refuse(offset, "its header is malformed") from None
        if route != (self.job, self.sender, self.tag):
            raise self.refuse(offset, f"it is the broadcast of {_readable(header['tag'])} of job {header['job']} "
                                      f"from {header['sender']}: a replay of another broadcast")
        associated = record[: _PREFIX.size + length]
        try:
            plain = self.cipher.decrypt(_nonce(chunk), record[_PREFIX.size + length:], associated)
        except InvalidTag:
            raise self.refuse(offset, "its seal does not verify under the ticket's key (altered in transit, "
                                      "or a replay of an earlier copy)") from None
        if chunk < self.next:
            return False   # a producer retry wrote this chunk twice
        if chunk != self.next or chunks != self.chunks or self.filled + len(plain) > self.size:
            raise self.refuse(offset, f"chunk {chunk} of {chunks}, expected {self.next} of {self.chunks}")
        self.buffer[self.filled: self.filled + len(plain)] = plain
        self.hash.update(plain)
        self.filled += len(plain)
        self.next += 1
        return self.next == self.chunks

    def value(self, offset: int) -> Any:
        if self.filled != self.size or self.hash.hexdigest() != self.digest:
            raise self.refuse(offset, "its content does not match the digest the sender announced on its "
                                      "channel (forged by another holder of the key)")
        buffer, self.buffer = self.buffer, bytearray()
        return codec.decode(buffer)


# ------------------------------------------------------------------ in process
class InProcessBroadcast:
    """A broadcast over a list in memory (protocol tests); ``records`` plays the topic."""

    def __init__(self, job: str, sender: str, chunk_bytes: int = 64 * 1024) -> None:
        self.job, self.sender, self.chunk_bytes = job, sender, chunk_bytes
        self.records: list[bytes] = []
        self.topic = f"in-process:{job}.{sender}.broadcast"

    def publish(self, tag: Tag, value: Any) -> dict[str, Any]:
        ticket, records = seal(self.job, self.sender, tag, value, self.chunk_bytes)
        ticket.update(topic=self.topic, offset=len(self.records))
        self.records.extend(records)
        return ticket

    def fetch(self, tag: Tag, ticket: Any, timeout: float | None = None) -> Any:
        opener = _Opener(self.job, self.sender, tag, ticket, self.topic)
        offset = _offset(ticket, tag)
        while True:
            if offset >= len(self.records):
                raise PeerError(f"the broadcast of {tag} at offset {offset} of {self.topic} is not there")
            if opener.add(offset, self.records[offset]):
                return opener.value(offset)
            offset += 1


def _offset(ticket: Any, tag: Tag) -> int:
    try:
        return int(ticket["offset"])
    except (KeyError, TypeError, ValueError):
        raise ProtocolError(f"malformed broadcast ticket for {tag} (no offset)") from None


# ------------------------------------------------------------------ Kafka
def _fetch_bound(chunk_bytes: int) -> int:
    """Bytes one fetch may bring: two records (the broker still returns one larger record whole)."""
    return 2 * chunk_bytes + 64 * 1024


class BroadcastSender:
    """Publishes values on this party's broadcast topic; at most ``_IN_FLIGHT`` records buffered at once."""

    def __init__(self, kafka: KafkaConfig, job: str, me: str, chunk_bytes: int = DEFAULT_CHUNK_BYTES) -> None:
        self.kafka, self.job, self.me = kafka, check_name("job", job), check_name("party", me)
        self.chunk_bytes = chunk_bytes
        self.topic = topic_of(kafka.topic_prefix, job, me)
        self._producer: Any = None

    @classmethod
    def beside(cls, channel: Any, chunk_bytes: int | None = None) -> BroadcastSender:
        """The sender of ``channel``'s party, with the channel's Kafka settings.

        ``chunk_bytes`` (at most the channel's) makes smaller records: the sender then holds
        less at once (three records), and receivers read them with the same fetch bound.
        """
        limit = channel.config.chunk_bytes
        return cls(channel.config.kafka, channel.job, channel.me, min(chunk_bytes or limit, limit))

    def open(self) -> BroadcastSender:
        from kafka import KafkaProducer

        _ensure(self.kafka, self.topic)
        self._producer = KafkaProducer(**self.kafka.client_options(), acks="all", linger_ms=0,
                                       max_in_flight_requests_per_connection=1,
                                       max_request_size=self.chunk_bytes + 64 * 1024)
        return self

    def close(self) -> None:
        if self._producer is not None:
            self._producer.close()
            self._producer = None

    def __enter__(self) -> BroadcastSender:
        return self.open() if self._producer is None else self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def publish(self, tag: Tag, value: Any) -> dict[str, Any]:
        """Write ``value`` once; returns its ticket (to send to each receiver on its sealed channel)."""
        if self._producer is None:
            raise ProtocolError(f"broadcast topic {self.topic} is not open; call open() first")
        from kafka.errors import KafkaError

        ticket, records = seal(self.job, self.me, tag, value, self.chunk_bytes)
        futures: deque = deque()
        first = None
        try:
            for record in records:
                futures.append(self._producer.send(self.topic, partition=0, value=record))
                del record
                while len(futures) > _IN_FLIGHT:
                    done = futures.popleft().get(timeout=self.kafka.request_timeout_ms / 1000)
                    first = done.offset if first is None else first
            self._producer.flush()
            while futures:
                done = futures.popleft().get(timeout=self.kafka.request_timeout_ms / 1000)
                first = done.offset if first is None else first
        except KafkaError as exc:
            raise PeerError(f"could not write the broadcast of {tag} to topic {self.topic}: {exc}") from exc
        ticket.update(topic=self.topic, offset=int(first))
        return ticket


class BroadcastReceiver:
    """Reads the broadcasts of ``sender`` by their tickets (manual assignment, no consumer group)."""

    def __init__(self, kafka: KafkaConfig, job: str, sender: str, chunk_bytes: int = DEFAULT_CHUNK_BYTES,
                 timeout_s: float = 120.0) -> None:
        self.kafka, self.job, self.sender = kafka, check_name("job", job), check_name("party", sender)
        self.chunk_bytes, self.timeout_s = chunk_bytes, timeout_s
        self.topic = topic_of(kafka.topic_prefix, job, sender)
        self._consumer: Any = None

    @classmethod
    def beside(cls, channel: Any) -> BroadcastReceiver:
        """The receiver of the broadcasts of ``channel``'s peer, with the channel's Kafka settings."""
        config = channel.config
        return cls(config.kafka, channel.job, channel.peer, config.chunk_bytes, config.recv_timeout_s)

    def open(self) -> BroadcastReceiver:
        from kafka import KafkaConsumer, TopicPartition

        _ensure(self.kafka, self.topic)
        bound = _fetch_bound(self.chunk_bytes)
        self._partition = TopicPartition(self.topic, 0)
        self._consumer = KafkaConsumer(**self.kafka.client_options(), group_id=None, enable_auto_commit=False,
                                       fetch_max_wait_ms=self.kafka.fetch_max_wait_ms, fetch_min_bytes=1,
                                       max_partition_fetch_bytes=bound, fetch_max_bytes=bound)
        self._consumer.assign([self._partition])
        return self

    def close(self) -> None:
        if self._consumer is not None:
            self._consumer.close()
            self._consumer = None

    def __enter__(self) -> BroadcastReceiver:
        return self.open() if self._consumer is None else self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def fetch(self, tag: Tag, ticket: Any, timeout: float | None = None) -> Any:
        """The value ``ticket`` announces for ``tag``; BroadcastRefused if what the topic holds is not it."""
        if self._consumer is None:
            raise ProtocolError(f"broadcast topic {self.topic} is not open; call open() first")
        offset = _offset(ticket, tag)
        if ticket.get("topic") != self.topic:
            raise ProtocolError(f"the ticket for {tag} names topic {ticket.get('topic')!r}, not {self.topic}")
        opener = _Opener(self.job, self.sender, tag, ticket, self.topic)
        limit = self.timeout_s if timeout is None else timeout
        deadline = time.monotonic() + limit
        self._consumer.seek(self._partition, offset)
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise PeerError(f"timed out after {limit:g}s reading the broadcast of {tag} at offset "
                                f"{offset} of topic {self.topic}")
            batches = self._consumer.poll(timeout_ms=int(min(remaining, _POLL_S) * 1000), max_records=4)
            for record in batches.get(self._partition, []):
                if record.offset < offset:
                    continue
                offset = record.offset + 1
                if opener.add(record.offset, record.value):
                    return opener.value(record.offset)


def _ensure(kafka: KafkaConfig, topic: str) -> None:
    from kafka.admin import KafkaAdminClient
    from kafka.errors import KafkaError

    admin = KafkaAdminClient(**kafka.client_options())
    try:
        topics.ensure(admin, {topic: 1}, kafka.replication_factor)
    except KafkaError as exc:
        raise PeerError(f"could not create topic {topic} on {kafka.bootstrap_servers}: {exc}") from exc
    finally:
        admin.close()
