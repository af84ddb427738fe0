"""Raw-Kafka attacks on fedps topics, for tests of any algorithm.

Whoever can produce to a topic can write any record into it. Each attack
below writes one such record with a plain Kafka producer, the way a hostile
broker user would, into the topic (and partition) that ``target.receiver``
reads from ``target.sender``:

- ``random``: 300 random bytes
- ``garbage``: 5 MiB of random bytes
- ``flipped``: a copy of the newest genuine record there, one byte flipped
- ``other-key``: a well-formed frame under the right route, sealed with another key
- ``unpinned-hello``: a hello claiming to be the sender, signed by a fresh identity
- ``opposite``: a genuine record of the other direction, copied into this one

``REASONS`` says how the receiving channel counts each one.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from kafka import KafkaConsumer, KafkaProducer, TopicPartition

from fedps.messaging import identity, wire
from fedps.messaging.channel import topic_name
from fedps.messaging.tags import Scope

ATTACKS = ("random", "garbage", "flipped", "other-key", "unpinned-hello", "opposite")
#: The refusal reason a channel counts for each attack.
REASONS = {"random": "not-a-frame", "garbage": "not-a-frame", "flipped": "tampered",
           "other-key": "tampered", "unpinned-hello": "unpinned-hello", "opposite": "foreign"}


@dataclass(frozen=True)
class Target:
    """The direction under attack: records ``sender`` -> ``receiver`` of ``job``."""

    servers: str
    job: str
    sender: str
    receiver: str
    prefix: str = "fedps"
    partition: int = 0
    suffix: str = ""   # ".<label>" for the per-partition topics of executor links

    @property
    def topic(self) -> str:
        return topic_name(self.prefix, self.job, self.sender, self.receiver) + self.suffix

    @property
    def opposite_topic(self) -> str:
        return topic_name(self.prefix, self.job, self.receiver, self.sender) + self.suffix


def produce(servers: str, topic: str, value: bytes, partition: int = 0) -> int:
    """Write one raw record; returns its offset."""
    producer = KafkaProducer(bootstrap_servers=[servers], max_request_size=16 << 20)
    try:
        return producer.send(topic, value=value, partition=partition).get(timeout=30).offset
    finally:
        producer.close()


def records(servers: str, topic: str, partition: int = 0) -> list[bytes]:
    """Every record of a topic's partition, oldest first."""
    consumer = KafkaConsumer(bootstrap_servers=[servers], enable_auto_commit=False,
                             consumer_timeout_ms=1500, fetch_max_wait_ms=50)
    consumer.assign([TopicPartition(topic, partition)])
    consumer.seek_to_beginning()
    values = [record.value for record in consumer]
    consumer.close()
    return values


def latest_data_record(servers: str, topic: str, partition: int = 0) -> bytes:
    """The newest sealed data frame of a topic (hellos skipped)."""
    for value in reversed(records(servers, topic, partition)):
        if wire.parse(value).kind == wire.KIND_DATA:
            return value
    raise LookupError(f"topic {topic} holds no data frame yet")


def flip(record: bytes, position: int = -5) -> bytes:
    """A copy of ``record`` with one bit of one byte flipped (by default in the seal's tag)."""
    changed = bytearray(record)
    changed[position] ^= 0x01
    return bytes(changed)


def sealed_with_other_key(target: Target) -> bytes:
    tag = Scope(target.job, "attack").tag("forged")
    return wire.seal(os.urandom(32), job=target.job, sender=target.sender, receiver=target.receiver,
                     tag=tag.encode(), epoch=1 << 20, seq=1, chunk=0, chunks=1, plaintext=b"J1")


def unpinned_hello(target: Target, workdir: Path) -> tuple[bytes, str]:
    """A hello frame claiming to be ``target.sender``, signed by a new identity; and that key's public form."""
    key_path = Path(workdir) / f"mallory-{os.urandom(4).hex()}.key"
    public = identity.generate_identity(key_path)
    hello, _ = identity.make_hello(identity.load_identity(key_path), target.job, target.sender, target.receiver)
    frame = wire.hello_frame(job=target.job, sender=target.sender, receiver=target.receiver,
                             body=hello.to_bytes())
    return frame, public


def record_for(attack: str, target: Target, workdir: Path) -> bytes:
    """The record of ``attack`` against ``target`` (see the module docstring)."""
    if attack == "random":
        return os.urandom(300)
    if attack == "garbage":
        return os.urandom(5 << 20)
    if attack == "flipped":
        return flip(latest_data_record(target.servers, target.topic, target.partition))
    if attack == "other-key":
        return sealed_with_other_key(target)
    if attack == "unpinned-hello":
        return unpinned_hello(target, workdir)[0]
    if attack == "opposite":
        return latest_data_record(target.servers, target.opposite_topic, target.partition)
    raise ValueError(f"unknown attack {attack!r}; known: {', '.join(ATTACKS)}")


def inject(attack: str, target: Target, workdir: Path) -> int:
    """Write the record of ``attack`` into the target's topic; returns its offset."""
    return produce(target.servers, target.topic, record_for(attack, target, workdir), target.partition)
