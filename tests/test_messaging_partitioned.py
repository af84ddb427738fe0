"""Per-partition links between executor tasks, through the embedded broker."""

from __future__ import annotations

import dataclasses
import os
import pickle
import threading
import time

import numpy as np
import pytest
from kafka import KafkaConsumer, KafkaProducer, TopicPartition
from kafka.admin import KafkaAdminClient, NewTopic

from fedps.errors import PeerError, ProtocolError
from fedps.messaging import wire
from fedps.messaging.channel import Channel
from fedps.messaging.partitioned import LinkSpec, PartitionLink, ensure_topics, link_spec
from fedps.messaging.tags import Scope

N = 4


def open_pair(job: str, configs: dict) -> tuple[Channel, Channel]:
    first, second = Channel(job, "a", "b", configs["a"]), Channel(job, "b", "a", configs["b"])
    opener = threading.Thread(target=first.open)
    opener.start()
    second.open()
    opener.join()
    return first, second


@pytest.fixture
def specs(make_parties, job_id):
    """The link specs of a and b, as their drivers would ship them to their tasks."""
    a, b = open_pair(job_id, make_parties("a", "b", chunk_bytes=64 * 1024, on_bad_message="skip"))
    spec_a, spec_b = link_spec(a, N), link_spec(b, N)
    ensure_topics(spec_a)
    ensure_topics(spec_b)
    yield spec_a, spec_b
    a.close()
    b.close()


@pytest.fixture
def open_link():
    links = []

    def make(spec: LinkSpec) -> PartitionLink:
        links.append(PartitionLink(spec).open())
        return links[-1]

    yield make
    for link in links:
        link.close()


def raw_records(servers: str, topic: str, p: int) -> list[bytes]:
    consumer = KafkaConsumer(bootstrap_servers=[servers], enable_auto_commit=False,
                             consumer_timeout_ms=1500, fetch_max_wait_ms=50)
    consumer.assign([TopicPartition(topic, p)])
    consumer.seek_to_beginning()
    records = [record.value for record in consumer]
    consumer.close()
    return records


def raw_produce(servers: str, topic: str, p: int, *values: bytes) -> None:
    producer = KafkaProducer(bootstrap_servers=[servers])
    for value in values:
        producer.send(topic, value=value, partition=p).get(timeout=10)
    producer.close()


def test_spec_pickles_and_hides_its_keys(specs):
    spec_a, spec_b = specs
    assert pickle.loads(pickle.dumps(spec_a)) == spec_a
    assert spec_a.send_key == spec_b.recv_key and spec_a.recv_key == spec_b.send_key
    assert spec_a.out_topic == spec_b.in_topic and spec_a.out_topic.endswith(".a.b.rows")
    assert spec_a.send_key.hex() not in repr(spec_a) and "send_key" not in repr(spec_a)


def test_values_arrive_on_their_own_partition_in_order_and_large_ones_chunked(
    specs, open_link, job_id, kafka_config
):
    spec_a, spec_b = specs
    scope = Scope(job_id, "rows")
    big = np.random.default_rng(1).normal(size=300_000 // 8)     # 300 KB in 64 KiB chunks
    sender = open_link(spec_a)
    for i in range(3):
        for p in range(N):
            sender.send(p, scope.at(batch=i).tag("u"), big if (p, i) == (2, 1) else np.full(3, 10 * p + i))
    sender.flush()
    got: dict[int, list] = {}

    def task(p: int) -> None:                     # task p of b reads partition p only
        link = open_link(spec_b)
        got[p] = [link.recv(p, scope.at(batch=i).tag("u"), timeout=20) for i in range(3)]

    threads = [threading.Thread(target=task, args=(p,)) for p in range(N)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for p in range(N):
        for i in range(3):
            expected = big if (p, i) == (2, 1) else np.full(3, 10 * p + i)
            np.testing.assert_array_equal(got[p][i], expected)
    records = raw_records(kafka_config.bootstrap_servers, spec_a.out_topic, 2)
    assert len(records) >= 2 + 5 and max(len(r) for r in records) <= 64 * 1024


def test_out_of_order_tags_are_buffered_and_hold_the_position(specs, open_link, job_id):
    spec_a, spec_b = specs
    scope = Scope(job_id, "rows")
    sender, receiver = open_link(spec_a), open_link(spec_b)
    for name in ("x", "y", "z"):
        sender.send(1, scope.tag(name), name)
    assert receiver.recv(1, scope.tag("z"), timeout=10) == "z"
    assert receiver.position(1) == 0                   # x and y wait in the buffer
    assert receiver.recv(1, scope.tag("x"), timeout=10) == "x"
    assert receiver.recv(1, scope.tag("y"), timeout=10) == "y"
    assert receiver.position(1) == 3


def test_a_message_resent_by_a_retried_task_is_dropped(specs, open_link, job_id, kafka_config):
    spec_a, spec_b = specs
    scope = Scope(job_id, "rows")
    first, receiver = open_link(spec_a), open_link(spec_b)
    first.send(3, scope.tag("u"), 1)
    first.flush()
    assert receiver.recv(3, scope.tag("u"), timeout=10) == 1
    retried = open_link(spec_a)                       # the retried task: a new epoch
    assert retried.epoch != first.epoch
    retried.send(3, scope.tag("u"), 1)
    retried.flush()
    genuine = raw_records(kafka_config.bootstrap_servers, spec_a.out_topic, 3)[0]
    raw_produce(kafka_config.bootstrap_servers, spec_a.out_topic, 3, genuine)   # a replay
    retried.send(3, scope.tag("v"), 2)
    assert receiver.recv(3, scope.tag("v"), timeout=10) == 2
    assert receiver.dropped == 2 and not receiver.refused
    assert receiver.position(3) == 4


def test_hostile_records_are_refused_counted_and_genuine_values_still_arrive(
    specs, open_link, job_id, kafka_config
):
    spec_a, spec_b = specs
    servers, scope = kafka_config.bootstrap_servers, Scope(job_id, "rows")
    sender, receiver = open_link(spec_a), open_link(spec_b)
    sender.send(3, scope.tag("seen"), 0)
    assert receiver.recv(3, scope.tag("seen"), timeout=10) == 0
    genuine = raw_records(servers, spec_a.out_topic, 3)[0]
    flipped = bytearray(genuine)
    flipped[-5] ^= 0x01
    other_key = wire.seal(os.urandom(32), job=job_id, sender="a", receiver="b",
                          tag=scope.tag("u").encode(), epoch=1, seq=1, chunk=0, chunks=1,
                          plaintext=b"J1")
    hello = wire.hello_frame(job=job_id, sender="a", receiver="b", body=b"x" * 64)
    raw_produce(servers, spec_a.out_topic, 3, os.urandom(300), bytes(flipped), other_key, hello)
    raw_produce(servers, spec_b.out_topic, 3, genuine)   # into the opposite direction's topic
    sender.send(3, scope.tag("u"), {"ok": True})
    assert receiver.recv(3, scope.tag("u"), timeout=10) == {"ok": True}
    assert receiver.refused == {"not-a-frame": 1, "tampered": 2, "hello": 1}
    assert receiver.position(3) == 6
    with pytest.raises(PeerError, match=r"partition 3; 1 record was refused there \(foreign: 1\)"):
        sender.recv(3, scope.tag("answer"), timeout=0.5)
    assert sender.refused == {"foreign": 1}


def test_strict_link_raises_on_the_first_refused_record(specs, open_link, job_id, kafka_config):
    spec_a, spec_b = specs
    scope = Scope(job_id, "rows")
    sender = open_link(spec_a)
    receiver = open_link(dataclasses.replace(spec_b, on_bad_message="raise"))
    raw_produce(kafka_config.bootstrap_servers, spec_a.out_topic, 0, os.urandom(300))
    sender.send(0, scope.tag("u"), 5)
    sender.flush()
    with pytest.raises(ProtocolError, match=r"partition 0 at offset 0 \(not-a-frame\)"):
        receiver.recv(0, scope.tag("u"), timeout=10)
    assert receiver.recv(0, scope.tag("u"), timeout=10) == 5   # the caller may go on past it


def test_a_fresh_link_seeks_to_a_recorded_position_and_reads_on(specs, open_link, job_id):
    spec_a, spec_b = specs
    scope = Scope(job_id, "rows")
    sender, receiver = open_link(spec_a), open_link(spec_b)
    for i in range(3):
        sender.send(2, scope.at(batch=i).tag("u"), i)
    assert [receiver.recv(2, scope.at(batch=i).tag("u"), timeout=10) for i in range(2)] == [0, 1]
    position = receiver.position(2)
    receiver.close()
    resumed = open_link(spec_b)
    resumed.seek(2, position)
    assert resumed.position(2) == position
    assert resumed.recv(2, scope.at(batch=2).tag("u"), timeout=10) == 2
    with pytest.raises(PeerError):
        resumed.recv(2, scope.at(batch=1).tag("u"), timeout=0.5)
    resumed.seek(2, position)                     # the same link may read it again
    assert resumed.recv(2, scope.at(batch=2).tag("u"), timeout=10) == 2
    beyond = open_link(spec_b)                   # a position past the end: the broker lost data
    beyond.seek(2, position + 100)
    with pytest.raises(PeerError, match="lost the topics of this job; rerun it under a new job id"):
        beyond.recv(2, scope.at(batch=3).tag("u"), timeout=10)


def test_a_recreated_topic_stops_a_waiting_link_at_once(specs, open_link, job_id, kafka_config):
    spec_a, spec_b = specs
    scope = Scope(job_id, "rows")
    sender, receiver = open_link(spec_a), open_link(spec_b)
    sender.send(1, scope.tag("u"), 1)
    assert receiver.recv(1, scope.tag("u"), timeout=10) == 1
    admin = KafkaAdminClient(bootstrap_servers=[kafka_config.bootstrap_servers])
    try:                                          # what a restarted in-memory broker looks like
        admin.delete_topics([spec_a.out_topic])
        admin.create_topics([NewTopic(spec_a.out_topic, N, 1)])
    finally:
        admin.close()
    started = time.monotonic()
    with pytest.raises(PeerError, match=f"lost the topics .*{spec_a.out_topic} partition 1"):
        receiver.recv(1, scope.tag("v"), timeout=30)
    assert time.monotonic() - started < 5


def test_timeout_names_the_partition_and_the_refusals(specs, open_link, job_id, kafka_config):
    spec_a, spec_b = specs
    receiver = open_link(spec_b)
    raw_produce(kafka_config.bootstrap_servers, spec_a.out_topic, 1, os.urandom(300), os.urandom(30))
    tag = Scope(job_id, "rows").tag("never")
    with pytest.raises(PeerError) as caught:
        receiver.recv(1, tag, timeout=1)
    message = str(caught.value)
    assert str(tag) in message and "'a'" in message and spec_b.in_topic in message
    assert "partition 1; 2 records were refused there (not-a-frame: 2)" in message


def test_dropped_tags_are_dropped_now_and_later(specs, open_link, job_id):
    spec_a, spec_b = specs
    scope = Scope(job_id, "rows")
    sender, receiver = open_link(spec_a), open_link(spec_b)
    sender.send(0, scope.at(batch=0).tag("u"), 0)
    sender.send(0, scope.at(batch=2).tag("u"), 2)
    assert receiver.recv(0, scope.at(batch=2).tag("u"), timeout=10) == 2
    receiver.drop(lambda tag: tag.batch < 2)
    sender.send(0, scope.at(batch=1).tag("u"), 1)
    sender.send(0, scope.at(batch=3).tag("u"), 3)
    assert receiver.recv(0, scope.at(batch=3).tag("u"), timeout=10) == 3
    assert receiver.dropped == 2 and receiver.position(0) == 4


def test_ensure_topics_creates_n_partitions_and_refuses_too_few(specs, kafka_config):
    spec_a, _ = specs
    consumer = KafkaConsumer(bootstrap_servers=[kafka_config.bootstrap_servers])
    try:
        for topic in (spec_a.out_topic, spec_a.in_topic):
            assert consumer.partitions_for_topic(topic) == set(range(N))
    finally:
        consumer.close()
    with pytest.raises(ProtocolError, match=spec_a.out_topic.replace(".", r"\.")):
        ensure_topics(dataclasses.replace(spec_a, partitions=N + 4))
