"""Channel throughput and latency against raw kafka-python, on one broker, in one run.

    .venv/bin/python bench/messaging.py [--mb 200] [--vector 1000] [--repeats 3]

Throughput: a sender process ships ``--mb`` of 2048-bit ciphertext vectors
(512 bytes a ciphertext, ``--vector`` ciphertexts a message) to a receiver
process, once through a sealed ``Channel`` and once as the same bytes through
raw kafka-python (asynchronous sends, default settings), alternating, and the
median of the repeats is reported. Latency: 200 round trips of a small message
between two processes, through the channel and through raw kafka-python.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fedps.messaging.broker import EmbeddedBroker  # noqa: E402
from fedps.messaging.channel import Channel  # noqa: E402
from fedps.messaging.codec import Blob  # noqa: E402
from fedps.messaging.config import ChannelConfig, KafkaConfig  # noqa: E402
from fedps.messaging.identity import generate_identity  # noqa: E402
from fedps.messaging.tags import Scope  # noqa: E402

CIPHERTEXT = 512
ROUNDS = 200


def _configs(servers: str, folder: Path) -> dict[str, ChannelConfig]:
    public = {n: generate_identity(folder / f"{n}.key") for n in ("a", "b")}
    kafka = KafkaConfig(bootstrap_servers=servers)
    return {n: ChannelConfig(kafka, str(folder / f"{n}.key"), {p: public[p] for p in public if p != n},
                             str(folder / f"state-{n}")) for n in public}


def channel_party(role: str, job: str, config: ChannelConfig, vectors: int, size: int, out) -> None:
    import logging

    logging.getLogger("kafka").setLevel(logging.CRITICAL)
    me, peer = ("a", "b") if role.endswith("send") or role == "ping" else ("b", "a")
    with Channel(job, me, peer, config).open() as channel:
        scope = Scope(job, "bench")
        if role == "send":
            payload = os.urandom(size * CIPHERTEXT)
            channel.recv(scope.tag("ready"))
            start = time.time()
            for i in range(vectors):
                channel.send(scope.at(iteration=i).tag("v"), Blob("ct", payload))
            out.put(("start", start))
        elif role == "recv":
            channel.send(scope.tag("ready"), 1)
            for i in range(vectors):
                channel.recv(scope.at(iteration=i).tag("v"))
            out.put(("end", time.time()))
        elif role == "ping":
            times = []
            for i in range(ROUNDS):
                t0 = time.perf_counter()
                channel.send(scope.at(iteration=i).tag("ping"), i)
                channel.recv(scope.at(iteration=i).tag("pong"))
                times.append(time.perf_counter() - t0)
            out.put(("rtt", statistics.median(times)))
        else:
            for i in range(ROUNDS):
                channel.send(scope.at(iteration=i).tag("pong"), channel.recv(scope.at(iteration=i).tag("ping")))


def raw_party(role: str, servers: str, topic: str, vectors: int, size: int, out) -> None:
    from kafka import KafkaConsumer, KafkaProducer, TopicPartition

    back = topic + ".back"
    producer = KafkaProducer(bootstrap_servers=[servers], max_request_size=2 << 20, linger_ms=0)
    consumer = KafkaConsumer(bootstrap_servers=[servers], enable_auto_commit=False,
                             fetch_max_wait_ms=5, max_partition_fetch_bytes=8 << 20)
    consumer.assign([TopicPartition(back if role in ("send", "ping") else topic, 0)])
    consumer.seek_to_beginning()

    def read(n: int) -> None:
        got = 0
        while got < n:
            got += sum(len(v) for v in consumer.poll(timeout_ms=100).values())

    if role == "send":
        payload = os.urandom(size * CIPHERTEXT)
        read(1)
        start = time.time()
        for _ in range(vectors):
            producer.send(topic, payload, partition=0)
        producer.flush()
        out.put(("start", start))
    elif role == "recv":
        producer.send(back, b"ready", partition=0).get(10)
        read(vectors)
        out.put(("end", time.time()))
    elif role == "ping":
        times = []
        for i in range(ROUNDS):
            t0 = time.perf_counter()
            producer.send(topic, b"%d" % i, partition=0).get(10)
            read(1)
            times.append(time.perf_counter() - t0)
        out.put(("rtt", statistics.median(times)))
    else:
        for i in range(ROUNDS):
            read(1)
            producer.send(back, b"%d" % i, partition=0).get(10)
    producer.close()
    consumer.close()


def _pair(target, first: tuple, second: tuple) -> dict:
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    procs = [ctx.Process(target=target, args=(*first, out)), ctx.Process(target=target, args=(*second, out))]
    for p in procs:
        p.start()
    results = dict(out.get(timeout=600) for _ in range(2 if target is not None and first[0] == "send" else 1))
    for p in procs:
        p.join(timeout=120)
    return results


def _create(servers: str, *topics: str) -> None:
    from kafka.admin import KafkaAdminClient, NewTopic

    admin = KafkaAdminClient(bootstrap_servers=[servers])
    admin.create_topics([NewTopic(t, 1, 1) for t in topics])
    admin.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=int, default=200)
    parser.add_argument("--vector", type=int, default=1000, help="ciphertexts per message")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    vectors = max(1, args.mb * 1_000_000 // (args.vector * CIPHERTEXT))
    total = vectors * args.vector * CIPHERTEXT
    rates = {"channel": [], "raw": []}
    with EmbeddedBroker() as broker, tempfile.TemporaryDirectory() as folder:
        servers = broker.bootstrap_servers
        for _ in range(args.repeats):
            job = f"b{uuid.uuid4().hex[:10]}"
            configs = _configs(servers, Path(folder) / job)
            r = _pair(channel_party, ("send", job, configs["a"], vectors, args.vector),
                      ("recv", job, configs["b"], vectors, args.vector))
            rates["channel"].append(total / (r["end"] - r["start"]) / 1e6)
            topic = f"raw{uuid.uuid4().hex[:10]}"
            _create(servers, topic, topic + ".back")
            r = _pair(raw_party, ("send", servers, topic, vectors, args.vector),
                      ("recv", servers, topic, vectors, args.vector))
            rates["raw"].append(total / (r["end"] - r["start"]) / 1e6)
        job = f"l{uuid.uuid4().hex[:10]}"
        configs = _configs(servers, Path(folder) / job)
        rtt_channel = _pair(channel_party, ("ping", job, configs["a"], 0, 0), ("pong", job, configs["b"], 0, 0))["rtt"]
        topic = f"rawl{uuid.uuid4().hex[:10]}"
        _create(servers, topic, topic + ".back")
        rtt_raw = _pair(raw_party, ("ping", servers, topic, 0, 0), ("pong", servers, topic, 0, 0))["rtt"]
    channel, raw = statistics.median(rates["channel"]), statistics.median(rates["raw"])
    report = {
        "payload_mb": round(total / 1e6, 1),
        "messages": vectors,
        "ciphertexts_per_message": args.vector,
        "channel_mb_per_s": round(channel, 1),
        "raw_kafka_mb_per_s": round(raw, 1),
        "channel_share_of_raw": round(channel / raw, 3),
        "channel_ciphertexts_per_s": round(channel * 1e6 / CIPHERTEXT),
        "all_channel_mb_per_s": [round(x, 1) for x in rates["channel"]],
        "all_raw_mb_per_s": [round(x, 1) for x in rates["raw"]],
        "round_trip_median_ms_channel": round(rtt_channel * 1000, 2),
        "round_trip_median_ms_raw": round(rtt_raw * 1000, 2),
    }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
