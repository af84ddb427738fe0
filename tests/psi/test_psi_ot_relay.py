"""The OT PSI relay without the library: blackbox-shaped HTTP requests through a real sealed link.

The library's link POSTs ``/v1/interconn/chan/push`` and ``/pop`` with an
``x-ptp-topic`` header and reads a ``TransportOutbound`` protobuf back;
these tests send exactly such requests (over keep-alive HTTP/1.1) to two
relays joined by a partition of a real PSI link on the embedded broker.
"""

from __future__ import annotations

import http.client
import os
import threading
import time

import pytest
from kafka import KafkaConsumer, KafkaProducer, TopicPartition

from fedps.algorithms.psi.ot import check_installed
from fedps.algorithms.psi.ot.relay import (BAD_REQUEST, BLOB_KIND, FORBIDDEN, FRAMES, OK, Relay, outbound, pack,
                                           parse_outbound, unpack)
from fedps.errors import ConfigError, ProtocolError
from fedps.messaging import codec, wire
from fedps.messaging.channel import Channel
from fedps.messaging.partitioned import PartitionLink, ensure_topics, link_spec
from fedps.messaging.tags import Scope

P = 1   # the bucket (partition) these relays serve


class Client:
    """What the library's blackbox link does: keep-alive POSTs with its headers."""

    def __init__(self, relay: Relay, me: str, peer: str, token: str) -> None:
        host, port = relay.address.split(":")
        self.conn = http.client.HTTPConnection(host, int(port), timeout=10)
        self.me, self.peer, self.token = me, peer, token

    def post(self, path: str, topic: str, body: bytes = b"", token: str | None = None) -> dict:
        headers = {"x-ptp-topic": topic, "x-ptp-token": self.token if token is None else token,
                   "x-ptp-tecn-provider-code": "SecretFlow", "Content-Type": "application/x-protobuf"}
        self.conn.request("POST", f"/v1/interconn/chan/{path}", body=body, headers=headers)
        response = self.conn.getresponse()
        assert response.status == 200
        return parse_outbound(response.read())

    def push(self, body: bytes) -> dict:
        return self.post("push", f"{self.me}-{self.peer}", body)

    def pop_all(self, count: int, seconds: float = 30) -> list[bytes]:
        got, deadline = [], time.monotonic() + seconds
        while len(got) < count and time.monotonic() < deadline:
            reply = self.post("pop?timeout=1", f"{self.peer}-{self.me}")
            assert reply["code"] == OK
            if reply["payload"]:
                got.append(reply["payload"])
        return got


@pytest.fixture
def relays(make_parties, job_id):
    configs = make_parties("guest", "host", chunk_bytes=64 * 1024)
    guest, host = Channel(job_id, "guest", "host", configs["guest"]), Channel(job_id, "host", "guest", configs["host"])
    opener = threading.Thread(target=guest.open)
    opener.start()
    host.open()
    opener.join()
    specs = {"guest": link_spec(guest, 2, label="psi"), "host": link_spec(host, 2, label="psi")}
    ensure_topics(specs["guest"])
    made = {}
    scope = Scope(job_id, "ot").at(iteration=P)
    for me, peer in (("guest", "host"), ("host", "guest")):
        link = PartitionLink(specs[me]).open()
        token = os.urandom(8).hex()
        relay = Relay(me, peer, scope, send=lambda tag, value, link=link: link.send(P, tag, value),
                      recv=lambda tag, seconds, link=link: link.recv(P, tag, timeout=seconds),
                      token=token, wait_s=30).start()
        made[me] = (relay, link, Client(relay, me, peer, token))
    yield made, specs
    for relay, link, _ in made.values():
        relay.close()
        link.close()
    guest.close()
    host.close()


def test_protobuf_reply_and_frame_packing_round_trip():
    reply = outbound(payload=b"\x00\x01" * 200, code=OK, message="fine")
    assert parse_outbound(reply) == {"payload": b"\x00\x01" * 200, "code": OK, "message": "fine"}
    assert parse_outbound(outbound()) == {"payload": b"", "code": OK, "message": ""}
    messages = [b"", b"a", os.urandom(70_000)]
    assert unpack(pack(messages)) == messages
    with pytest.raises(ProtocolError, match="past its end"):
        unpack(pack(messages)[:-1])


def test_pushed_messages_come_out_of_the_peers_pops_in_order_over_the_sealed_link(relays):
    (guest_relay, _, guest), (host_relay, _, host) = relays[0]["guest"], relays[0]["host"]
    sent = [os.urandom(n) for n in (1, 100, 5_000, 300_000, 17, 2_000_000, 64)] + [os.urandom(40) for _ in range(40)]
    for body in sent:
        assert guest.push(body)["code"] == OK           # answered at once: queued for the link
    assert host.pop_all(len(sent)) == sent
    answer = [os.urandom(33) for _ in range(5)]
    for body in answer:
        assert host.push(body)["code"] == OK
    assert guest.pop_all(len(answer)) == answer
    assert guest_relay.stats["ot_pushed"] == len(sent) and host_relay.stats["ot_popped"] == len(sent)
    assert guest_relay.stats["ot_frames_sent"] == host_relay.stats["ot_frames_received"] <= len(sent)
    assert guest_relay.error() is None and host_relay.error() is None


def test_a_pop_whose_answer_was_not_written_keeps_its_message_for_the_next_pop(relays):
    _, _, guest = relays[0]["guest"]
    host_relay, _, host = relays[0]["host"]
    assert guest.push(b"first")["code"] == OK and guest.push(b"second")["code"] == OK
    reply = host_relay.pop("guest-host", 30)            # taken, but the library never got the answer
    assert parse_outbound(reply)["payload"] == b"first"
    host_relay.unpop(reply)
    assert host.pop_all(2) == [b"first", b"second"]
    assert host_relay.stats["ot_popped"] == 2 and host_relay.stats["ot_pop_retries"] == 1


def test_wrong_token_or_topic_is_refused_and_nothing_passes(relays):
    relay, _, guest = relays[0]["guest"]
    _, _, host = relays[0]["host"]
    assert guest.post("push", "guest-host", b"evil", token="0" * 16)["code"] == FORBIDDEN
    assert guest.post("push", "host-guest", b"evil")["code"] == BAD_REQUEST   # not this relay's direction
    assert guest.post("pop?timeout=1", "guest-host")["code"] == BAD_REQUEST
    assert guest.post("nowhere", "guest-host")["code"] != OK
    assert relay.stats["ot_pushed"] == 0
    assert host.pop_all(1, seconds=1.5) == []


def test_a_tampered_or_forged_frame_is_refused_and_the_genuine_one_still_arrives(relays, kafka_config, job_id):
    made, specs = relays
    _, _, guest = made["guest"]
    host_relay, host_link, host = made["host"]
    servers = kafka_config.bootstrap_servers
    scope = Scope(job_id, "ot").at(iteration=P)
    forged = wire.seal(os.urandom(32), job=job_id, sender="guest", receiver="host",
                       tag=scope.at(batch=0).tag(FRAMES.name).encode(), epoch=7, seq=1, chunk=0, chunks=1,
                       plaintext=codec.encode(codec.Blob(BLOB_KIND, pack([b"forged"]))))
    producer = KafkaProducer(bootstrap_servers=[servers])
    producer.send(specs["guest"].out_topic, value=forged, partition=P).get(timeout=10)
    assert guest.push(b"genuine")["code"] == OK
    assert host.pop_all(1) == [b"genuine"]
    consumer = KafkaConsumer(bootstrap_servers=[servers], enable_auto_commit=False, consumer_timeout_ms=1500)
    consumer.assign([TopicPartition(specs["guest"].out_topic, P)])
    consumer.seek_to_beginning()
    genuine = [r.value for r in consumer][-1]
    consumer.close()
    flipped = bytearray(genuine)
    flipped[-3] ^= 0x01
    producer.send(specs["guest"].out_topic, value=bytes(flipped), partition=P).get(timeout=10)
    producer.close()
    assert guest.push(b"after")["code"] == OK
    assert host.pop_all(1) == [b"after"]
    assert host.pop_all(1, seconds=1) == []               # neither the forged nor the flipped frame came out
    assert host_link.refused == {"tampered": 2}
    assert host_relay.error() is None


def test_protocol_ot_without_the_library_says_how_to_install_it(monkeypatch, tmp_path):
    monkeypatch.setenv("FEDPS_OT_PYTHON", str(tmp_path / "missing" / "python"))
    with pytest.raises(ConfigError, match=r"protocol = \"ot\".*make ot-env"):
        check_installed()
