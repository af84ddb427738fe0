"""Hostile records between two real channels: refused, counted, never re-read, never fatal by default."""

from __future__ import annotations

import threading

import pytest

from attacks import ATTACKS, REASONS, Target, inject, produce, unpinned_hello
from fedps.errors import PeerError, ProtocolError
from fedps.messaging import identity, wire
from fedps.messaging.channel import Channel
from fedps.messaging.tags import Scope


def open_pair(job: str, configs: dict) -> tuple[Channel, Channel]:
    first, second = Channel(job, "a", "b", configs["a"]), Channel(job, "b", "a", configs["b"])
    opener = threading.Thread(target=first.open)
    opener.start()
    second.open()
    opener.join()
    return first, second


@pytest.mark.parametrize("attack", ATTACKS)
def test_hostile_record_is_refused_counted_and_not_read_again_after_a_restart(
        attack, make_parties, job_id, kafka_config, tmp_path):
    configs = make_parties("a", "b")
    a, b = open_pair(job_id, configs)
    scope = Scope(job_id, "train")
    a.send(scope.tag("warmup"), 0)
    b.send(scope.tag("reply"), 0)                  # a genuine record for the "opposite" attack
    assert b.recv(scope.tag("warmup"), timeout=10) == 0
    a.send(scope.tag("held"), {"v": 1})            # buffered at b, so b's position stays before the attack
    a.flush()
    inject(attack, Target(kafka_config.bootstrap_servers, job_id, "a", "b"), tmp_path)
    a.send(scope.tag("after"), {"v": 2})
    assert b.recv(scope.tag("after"), timeout=20) == {"v": 2}
    assert b.refused_counts == {REASONS[attack]: 1}
    assert "1 record was refused" in b.refused_summary()
    b.close()                                      # the receiver restarts and reads on

    b = Channel(job_id, "b", "a", configs["b"]).open()
    assert b.resumed
    assert b.recv(scope.tag("held"), timeout=10) == {"v": 1}
    a.send(scope.tag("later"), 3)
    assert b.recv(scope.tag("later"), timeout=10) == 3
    assert b.refused_counts == {}, "the refused record was read again after the restart"
    a.close()
    b.close()


def test_refused_record_with_nothing_held_is_committed_past(make_parties, job_id, kafka_config):
    configs = make_parties("a", "b")
    a, b = open_pair(job_id, configs)
    scope = Scope(job_id, "t")
    produce(kafka_config.bootstrap_servers, a.out_topic, b"\x00" * 300)
    with pytest.raises(PeerError, match=r"1 record was refused on topic .*\(not-a-frame: 1"):
        b.recv(scope.tag("never"), timeout=1)
    assert b.position().offset == 2                # the peer's hello, then the garbage
    b.close()
    b = Channel(job_id, "b", "a", configs["b"]).open()
    a.send(scope.tag("x"), 1)
    assert b.recv(scope.tag("x"), timeout=10) == 1 and b.refused_counts == {}
    a.close()
    b.close()


def test_strict_mode_stops_at_the_first_refused_record(make_parties, job_id, kafka_config):
    a, b = open_pair(job_id, make_parties("a", "b", on_bad_message="raise"))
    produce(kafka_config.bootstrap_servers, a.out_topic, b"not a frame at all")
    with pytest.raises(wire.NotAFrame, match="not a fedps frame"):
        b.recv(Scope(job_id, "t").tag("x"), timeout=5)
    assert b.refused_counts == {"not-a-frame": 1}
    a.close()
    b.close()


def test_unpinned_hello_is_refused_by_the_key_that_signed_it(make_parties, job_id, kafka_config, tmp_path):
    a, b = open_pair(job_id, make_parties("a", "b", on_bad_message="raise"))
    frame, public = unpinned_hello(Target(kafka_config.bootstrap_servers, job_id, "a", "b"), tmp_path)
    produce(kafka_config.bootstrap_servers, a.out_topic, frame)
    with pytest.raises(ProtocolError) as error:
        b.recv(Scope(job_id, "t").tag("x"), timeout=5)
    message = str(error.value)
    assert f"a hello for job {job_id!r} claiming to be 'a', signed by an unpinned key {public}, was refused" in message
    assert "lost its channel state" not in message
    a.close()
    b.close()


def test_unpinned_hello_before_the_key_exchange_does_not_stop_it(make_parties, job_id, kafka_config, tmp_path):
    configs = make_parties("a", "b")
    target = Target(kafka_config.bootstrap_servers, job_id, "a", "b")
    b = Channel(job_id, "b", "a", configs["b"])
    b._ensure_topics(configs["b"].kafka.client_options())
    produce(target.servers, target.topic, unpinned_hello(target, tmp_path)[0])   # the impostor is first
    a, b = open_pair(job_id, configs)
    a.send(Scope(job_id, "t").tag("x"), 1)
    assert b.recv(Scope(job_id, "t").tag("x"), timeout=10) == 1
    assert b.refused_counts == {"unpinned-hello": 1}
    a.close()
    b.close()


def test_new_hello_signed_by_the_pinned_peer_means_it_lost_its_state(make_parties, job_id, kafka_config):
    configs = make_parties("a", "b")
    a, b = open_pair(job_id, configs)
    hello, _ = identity.make_hello(identity.load_identity(configs["a"].identity_key), job_id, "a", "b")
    produce(kafka_config.bootstrap_servers, a.out_topic,
            wire.hello_frame(job=job_id, sender="a", receiver="b", body=hello.to_bytes()))
    with pytest.raises(ProtocolError, match="'a' started a new key exchange .* lost its channel state"):
        b.recv(Scope(job_id, "t").tag("x"), timeout=5)
    a.close()
    b.close()
