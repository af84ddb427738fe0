"""One broadcast, read by every receiver: a tampered, replayed or substituted copy is refused by name.

In-process for the sealing checks; through the embedded broker for the real
topic, with hostile records written by a plain Kafka producer (tests/attacks.py).
"""

from __future__ import annotations

import numpy as np
import pytest
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

from fedps.messaging import broadcast, codec
from fedps.messaging.broadcast import BroadcastReceiver, BroadcastRefused, BroadcastSender, InProcessBroadcast
from fedps.messaging.tags import Scope
from attacks import flip, produce, records


def _tag(job: str, round_: int):
    return Scope(job, "fedavg").at(iteration=round_).tag("model")


def test_every_receiver_reads_the_one_copy_in_chunks():
    hub = InProcessBroadcast("j", "coord", chunk_bytes=8192)
    model = np.random.default_rng(0).normal(size=5000)
    ticket = hub.publish(_tag("j", 0), model)
    assert ticket["chunks"] == len(hub.records) > 4
    for _ in range(3):   # every party reads the same records
        np.testing.assert_array_equal(hub.fetch(_tag("j", 0), ticket), model)


def test_a_tampered_record_is_refused():
    hub = InProcessBroadcast("j", "coord", chunk_bytes=8192)
    ticket = hub.publish(_tag("j", 0), np.arange(3000.0))
    hub.records[1] = flip(hub.records[1])
    with pytest.raises(BroadcastRefused, match="offset 1 .* seal does not verify"):
        hub.fetch(_tag("j", 0), ticket)


def test_a_replay_of_an_earlier_round_or_another_job_is_refused():
    hub = InProcessBroadcast("j", "coord")
    old = hub.publish(_tag("j", 0), np.zeros(10))
    new = hub.publish(_tag("j", 1), np.ones(10))
    served_old = dict(new, offset=old["offset"])        # a broker that serves round 0's records for round 1
    with pytest.raises(BroadcastRefused, match="broadcast of .*it0.* a replay of another broadcast"):
        hub.fetch(_tag("j", 1), served_old)
    with pytest.raises(BroadcastRefused, match="a replay of another broadcast"):
        hub.fetch(_tag("j", 1), old)                    # round 0's ticket presented for round 1
    other = InProcessBroadcast("k", "coord")
    other.records = hub.records                         # the same records read by job k
    with pytest.raises(BroadcastRefused, match="of job j from coord: a replay"):
        other.fetch(_tag("k", 1), new)


def test_a_receiver_holding_the_key_cannot_substitute_its_own_value():
    hub = InProcessBroadcast("j", "coord")
    ticket = hub.publish(_tag("j", 0), np.zeros(10))
    # another party knows the key from its own ticket and re-seals a value of its choice in the same place
    header = broadcast._header("j", "coord", _tag("j", 0).encode(), 0, 1)
    forged = ChaCha20Poly1305(bytes.fromhex(ticket["key"])).encrypt(
        broadcast._nonce(0), codec.encode(np.full(10, 7.0)), header)
    hub.records[ticket["offset"]] = header + forged
    with pytest.raises(BroadcastRefused, match="does not match the digest"):
        hub.fetch(_tag("j", 0), ticket)


def test_a_malformed_ticket_is_a_clear_error():
    hub = InProcessBroadcast("j", "coord")
    with pytest.raises(Exception, match="malformed broadcast ticket"):
        hub.fetch(_tag("j", 0), {"offset": 0})


def test_broadcast_through_the_broker_refuses_a_tampered_and_a_replayed_copy(kafka_config, job_id):
    servers = kafka_config.bootstrap_servers
    model = np.random.default_rng(1).normal(size=250_000)      # 2 MB: three 900 kB chunks
    with BroadcastSender(kafka_config, job_id, "coord").open() as sender, \
            BroadcastReceiver(kafka_config, job_id, "coord", timeout_s=30).open() as one, \
            BroadcastReceiver(kafka_config, job_id, "coord", timeout_s=30).open() as two:
        first = sender.publish(_tag(job_id, 0), model)
        second = sender.publish(_tag(job_id, 1), model + 1)
        assert first["chunks"] == 3 and second["offset"] == first["offset"] + 3
        np.testing.assert_array_equal(one.fetch(_tag(job_id, 0), first), model)
        np.testing.assert_array_equal(two.fetch(_tag(job_id, 1), second), model + 1)
        np.testing.assert_array_equal(two.fetch(_tag(job_id, 0), first), model)   # any order, any time
        # a hostile producer appends copies of round 1's records, the middle one altered
        genuine = records(servers, sender.topic)[second["offset"]: second["offset"] + 3]
        copies = [produce(servers, sender.topic, r if i != 1 else flip(r)) for i, r in enumerate(genuine)]
        with pytest.raises(BroadcastRefused, match=f"offset {copies[1]} .* seal does not verify"):
            one.fetch(_tag(job_id, 1), dict(second, offset=copies[0]))
        with pytest.raises(BroadcastRefused, match="a replay of another broadcast"):
            one.fetch(_tag(job_id, 1), dict(second, offset=first["offset"]))
