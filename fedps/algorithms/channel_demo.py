"""The foundation's demo protocol: two parties measure their channel.

It stands in for a federated job until the first algorithm lands. The guest
sends a vector of ciphertext-sized blobs (512 bytes each, the size of a
2048-bit Paillier ciphertext) and the host echoes a digest; then they play
ping-pong with small messages to measure the round trip.

Messages (guest -> host unless noted):

1. ``payload``: Blob of ``count`` x 512 random bytes.
2. ``digest`` (host -> guest): SHA-256 of what arrived, and its size.
3. ``ping`` / ``pong`` (host -> guest), one pair per round: an integer.
"""

from __future__ import annotations

import hashlib
import logging
import os
import statistics
import time

from fedps.errors import ProtocolError
from fedps.messaging.codec import Blob
from fedps.messaging.tags import Message

log = logging.getLogger(__name__)

PAYLOAD = Message("payload", "guest", "host", Blob)
DIGEST = Message("digest", "host", "guest", dict)
PING = Message("ping", "guest", "host", int)
PONG = Message("pong", "host", "guest", int)

CIPHERTEXT_BYTES = 512


def run(context) -> None:
    """Entry point: dispatch on the party's role."""
    params = context.config.job.params
    count = int(params.get("ciphertexts", 100_000))
    rounds = int(params.get("rounds", 50))
    (peer,) = context.channels
    channel = context.channels[peer]
    scope = context.scope("channel_demo")
    if context.role == "guest":
        context.metrics.update(guest(channel, scope, count, rounds))
    else:
        host(channel, scope, rounds)


def guest(channel, scope, count: int, rounds: int) -> dict:
    payload = os.urandom(count * CIPHERTEXT_BYTES)
    started = time.perf_counter()
    # 1. the payload
    channel.send(scope.tag(PAYLOAD.name), PAYLOAD.check(Blob("demo.ciphertexts/1", payload)))
    # 2. the host's digest proves it arrived whole
    digest = DIGEST.check(channel.recv(scope.tag(DIGEST.name)))
    elapsed = time.perf_counter() - started
    if digest["sha256"] != hashlib.sha256(payload).hexdigest():
        raise ProtocolError("the host received a different payload than was sent")
    # 3. round trips
    latencies = []
    for i in range(rounds):
        at = scope.at(iteration=i)
        t0 = time.perf_counter()
        channel.send(at.tag(PING.name), i)
        if PONG.check(channel.recv(at.tag(PONG.name))) != i:
            raise ProtocolError(f"pong {i} carried the wrong value")
        latencies.append(time.perf_counter() - t0)
    return {
        "payload_bytes": len(payload),
        "payload_ciphertexts": count,
        "payload_seconds": round(elapsed, 3),
        "payload_mb_per_s": round(len(payload) / elapsed / 1e6, 1),
        "ciphertexts_per_s": round(count / elapsed),
        "round_trips": rounds,
        "round_trip_median_ms": round(1000 * statistics.median(latencies), 2),
        "round_trip_p90_ms": round(1000 * sorted(latencies)[int(0.9 * (rounds - 1))], 2),
    }


def host(channel, scope, rounds: int) -> None:
    blob = PAYLOAD.check(channel.recv(scope.tag(PAYLOAD.name)))
    channel.send(scope.tag(DIGEST.name),
                 {"sha256": hashlib.sha256(blob.data).hexdigest(), "bytes": len(blob.data)})
    for i in range(rounds):
        at = scope.at(iteration=i)
        channel.send(at.tag(PONG.name), PING.check(channel.recv(at.tag(PING.name))))
