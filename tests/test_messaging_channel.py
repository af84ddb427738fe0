"""The channel against an untrusted broker: sealing, tampering, replay, foreign identities."""

from __future__ import annotations

import dataclasses
import os
import threading

import numpy as np
import pytest
from kafka import KafkaConsumer, KafkaProducer, TopicPartition

from fedps.errors import ConfigError, PeerError, ProtocolError
from fedps.messaging import wire
from fedps.messaging.channel import Channel
from fedps.messaging.codec import Blob
from fedps.messaging.identity import generate_identity
from fedps.messaging.tags import Scope


def open_pair(job: str, configs: dict, a: str = "a", b: str = "b") -> tuple[Channel, Channel]:
    first, second = Channel(job, a, b, configs[a]), Channel(job, b, a, configs[b])
    opener = threading.Thread(target=first.open)
    opener.start()
    second.open()
    opener.join()
    return first, second


@pytest.fixture
def pair(make_parties, job_id):
    a, b = open_pair(job_id, make_parties("a", "b", on_bad_message="raise"))
    yield a, b
    a.close()
    b.close()


def raw_records(servers: str, topic: str) -> list[bytes]:
    consumer = KafkaConsumer(bootstrap_servers=[servers], enable_auto_commit=False,
                             consumer_timeout_ms=1500, fetch_max_wait_ms=50)
    consumer.assign([TopicPartition(topic, 0)])
    consumer.seek_to_beginning()
    records = [record.value for record in consumer]
    consumer.close()
    return records


def raw_produce(servers: str, topic: str, value: bytes) -> None:
    producer = KafkaProducer(bootstrap_servers=[servers])
    producer.send(topic, value=value, partition=0).get(timeout=10)
    producer.close()


def test_values_of_every_kind_cross_in_either_order(pair, job_id):
    a, b = pair
    scope = Scope(job_id, "test")
    values = {"dict": {"w": [1.5, -2.0], "ok": True}, "int": 7, "text": "hé",
              "matrix": np.arange(12, dtype=np.int32).reshape(3, 4),
              "blob": Blob("paillier.vector/1", os.urandom(3000))}
    for name, value in values.items():
        a.send(scope.tag(name), value)
    for name in reversed(values):            # out of order: earlier ones wait in the buffer
        got = b.recv(scope.tag(name), timeout=10)
        if isinstance(got, np.ndarray):
            np.testing.assert_array_equal(got, values[name])
            assert got.dtype == values[name].dtype
        else:
            assert got == values[name]


def test_large_value_is_chunked_under_the_limit_and_reassembled(make_parties, job_id, kafka_config):
    a, b = open_pair(job_id, make_parties("a", "b", chunk_bytes=64 * 1024))
    value = np.random.default_rng(0).normal(size=100_000)
    a.send(Scope(job_id, "t").tag("v"), value)
    np.testing.assert_array_equal(b.recv(Scope(job_id, "t").tag("v"), timeout=20), value)
    records = raw_records(kafka_config.bootstrap_servers, a.out_topic)
    assert len(records) > 10 and max(len(r) for r in records) <= 64 * 1024
    a.close()
    b.close()


def test_a_fetch_bound_below_a_chunk_still_brings_every_record(make_parties, job_id):
    """``fetch_bytes`` under the chunk size: each oversize record comes whole, small ones in batches."""
    configs = make_parties("a", "b", chunk_bytes=64 * 1024)
    configs["b"] = dataclasses.replace(configs["b"], fetch_bytes=4096)
    assert configs["a"].fetch_bound == 128 * 1024 and configs["b"].fetch_bound == 4096
    a, b = open_pair(job_id, configs)
    scope = Scope(job_id, "t")
    value = np.random.default_rng(1).normal(size=40_000)   # five chunks, each over b's bound
    a.send(scope.tag("big"), value)
    for i in range(50):
        a.send(scope.tag(f"small{i}"), i)
    np.testing.assert_array_equal(b.recv(scope.tag("big"), timeout=20), value)
    assert [b.recv(scope.tag(f"small{i}"), timeout=20) for i in range(50)] == list(range(50))
    a.close()
    b.close()


def test_a_fetch_bound_out_of_range_is_refused_by_name(make_parties):
    with pytest.raises(ConfigError, match="fetch_bytes must be between 4096"):
        make_parties("a", "b", fetch_bytes=1000)


def test_broker_stores_no_plaintext(pair, job_id, kafka_config):
    a, b = pair
    marker = b"CUSTOMER-4711-SECRET-BALANCE"
    array = np.full(4096, 123456.789)
    scope = Scope(job_id, "test")
    a.send(scope.tag("blob"), Blob("raw", marker * 10))
    a.send(scope.tag("dict"), {"note": marker.decode()})
    a.send(scope.tag("array"), array)
    for name in ("blob", "dict", "array"):
        b.recv(scope.tag(name), timeout=10)
    stored = b"".join(raw_records(kafka_config.bootstrap_servers, a.out_topic))
    assert marker not in stored
    assert array[:8].tobytes() not in stored
    assert b"123456.789" not in stored


def test_flipped_byte_is_rejected_and_channel_goes_on(pair, job_id, kafka_config):
    a, b = pair
    scope = Scope(job_id, "test")
    a.send(scope.tag("x"), {"v": 1})
    genuine = raw_records(kafka_config.bootstrap_servers, a.out_topic)[-1]
    b.recv(scope.tag("x"), timeout=10)
    for position in (len(genuine) - 5, 10):            # in the ciphertext, in the header
        tampered = bytearray(genuine)
        tampered[position] ^= 0x01
        raw_produce(kafka_config.bootstrap_servers, a.out_topic, bytes(tampered))
        with pytest.raises(ProtocolError, match="altered in transit|malformed|foreign"):
            b.recv(scope.tag("y"), timeout=5)
    a.send(scope.tag("y"), {"v": 2})
    assert b.recv(scope.tag("y"), timeout=10) == {"v": 2}


def test_replayed_message_is_dropped(pair, job_id, kafka_config):
    a, b = pair
    scope = Scope(job_id, "test")
    a.send(scope.tag("pay"), 100)
    assert b.recv(scope.tag("pay"), timeout=10) == 100
    genuine = raw_records(kafka_config.bootstrap_servers, a.out_topic)[-1]
    raw_produce(kafka_config.bootstrap_servers, a.out_topic, genuine)     # the replay
    a.send(scope.tag("next"), 1)
    assert b.recv(scope.tag("next"), timeout=10) == 1
    assert b.dropped == 1
    with pytest.raises(PeerError):
        b.recv(scope.tag("pay"), timeout=0.5)


def test_message_sealed_by_third_identity_is_refused(make_parties, job_id, kafka_config, tmp_path):
    configs = make_parties("a", "b", handshake_timeout_s=10, on_bad_message="raise")
    # An impostor who calls itself "a" but holds its own identity key.
    import dataclasses

    impostor = dataclasses.replace(configs["a"], identity_key=str(tmp_path / "mallory.key"),
                                   state_dir=str(tmp_path / "mallory"))
    generate_identity(impostor.identity_key)
    fake = Channel(job_id, "a", "b", impostor)
    threading.Thread(target=lambda: _quietly(fake.open), daemon=True).start()
    victim = Channel(job_id, "b", "a", configs["b"])
    with pytest.raises(ProtocolError, match="claiming to be 'a', signed by an unpinned key ed25519:"):
        victim.open()
    victim.close()


def test_data_sealed_with_a_foreign_key_is_refused(pair, job_id, kafka_config):
    a, b = pair
    tag = Scope(job_id, "test").tag("x")
    forged = wire.seal(os.urandom(32), job=job_id, sender="a", receiver="b", tag=tag.encode(),
                       epoch=99, seq=1, chunk=0, chunks=1, plaintext=b'J{"v":1}')
    raw_produce(kafka_config.bootstrap_servers, a.out_topic, forged)
    with pytest.raises(ProtocolError, match="failed authentication"):
        b.recv(tag, timeout=5)


def test_message_for_another_receiver_or_version_is_refused(pair, job_id, kafka_config):
    a, b = pair
    tag = Scope(job_id, "test").tag("x")
    misrouted = wire.seal(os.urandom(32), job=job_id, sender="a", receiver="c", tag=tag.encode(),
                          epoch=0, seq=9, chunk=0, chunks=1, plaintext=b"J1")
    raw_produce(kafka_config.bootstrap_servers, a.out_topic, misrouted)
    with pytest.raises(wire.ForeignMessage, match="foreign message"):
        b.recv(tag, timeout=5)
    future = bytearray(misrouted)
    future[3] = wire.VERSION + 1
    raw_produce(kafka_config.bootstrap_servers, a.out_topic, bytes(future))
    with pytest.raises(wire.WrongVersion, match="version 2"):
        b.recv(tag, timeout=5)


def test_restarted_sender_keeps_its_session_and_is_not_taken_for_a_replay(make_parties, job_id):
    configs = make_parties("a", "b")
    a, b = open_pair(job_id, configs)
    scope = Scope(job_id, "test")
    a.send(scope.tag("before"), 1)
    a.close()                                   # the sender restarts: same state folder
    a = Channel(job_id, "a", "b", configs["a"]).open()
    a.send(scope.tag("after"), 2)
    assert b.recv(scope.tag("before"), timeout=10) == 1
    assert b.recv(scope.tag("after"), timeout=10) == 2
    a.close()
    b.close()


def _quietly(fn) -> None:
    try:
        fn()
    except Exception:
        pass


def test_a_long_wait_backs_off_instead_of_spinning_and_still_receives(pair, job_id):
    """The broker answers an empty fetch after fetch_max_wait_ms (5 ms): a receiver that
    kept fetching would spend a third of a core waiting. After a short while it sleeps
    between fetches, and what arrives then is still delivered."""
    a, b = pair
    scope = Scope(job_id, "test")
    fetcher = b._consumer._fetcher
    real, fetches = fetcher.send_fetches, []

    def counting():
        fetches.append(1)
        return real()

    fetcher.send_fetches = counting
    sender = threading.Timer(2.0, lambda: a.send(scope.tag("late"), np.arange(3)))
    sender.start()
    try:
        got = b.recv(scope.tag("late"), timeout=20)
    finally:
        sender.cancel()
        fetcher.send_fetches = real
    np.testing.assert_array_equal(got, np.arange(3))
    assert len(fetches) < 150, f"{len(fetches)} fetches in a 2 s wait: the receiver spins"
