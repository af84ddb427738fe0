"""A party in its own OS process, for tests that need real processes.

Usage: python tests/party_main.py SPEC.json, where the spec names the channel
config, the peer, and a scenario. Each scenario writes what it received to a
log file (one line per value, flushed), so the test can compare.
"""

from __future__ import annotations

import hashlib
import json
import logging
import sys
import time

import numpy as np

from fedps.errors import PeerError
from fedps.messaging.channel import Channel
from fedps.messaging.config import ChannelConfig, KafkaConfig
from fedps.messaging.tags import Scope


def channel_from(spec: dict) -> Channel:
    raw = dict(spec["config"])
    raw["kafka"] = KafkaConfig(**raw["kafka"])
    return Channel(spec["job"], spec["me"], spec["peer"], ChannelConfig(**raw))


def send_values(channel: Channel, scope: Scope, spec: dict, log) -> None:
    big = np.arange(spec.get("big_elements", 0), dtype=np.float64) * 0.5
    if big.size:
        channel.send(scope.tag("big"), big)
        log.write(f"sent big {hashlib.sha256(big.tobytes()).hexdigest()}\n")
    channel.send(scope.tag("hello"), {"from": channel.me, "n": 42})
    for i in range(spec.get("count", 0)):
        channel.send(scope.at(iteration=i).tag("value"), i)
    log.write("done\n")


def receive_values(channel: Channel, scope: Scope, spec: dict, log) -> None:
    if spec.get("start", 0) == 0:
        channel.recv(scope.tag("hello"), timeout=60)
    for i in spec.get("must_not_get", []):
        try:
            value = channel.recv(scope.at(iteration=i).tag("value"), timeout=1.0)
            log.write(f"again {value}\n")
        except PeerError:
            log.write(f"absent {i}\n")
        log.flush()
    for i in range(spec.get("start", 0), spec["count"]):
        value = channel.recv(scope.at(iteration=i).tag("value"), timeout=60)
        log.write(f"{value}\n")
        log.flush()
        time.sleep(spec.get("delay_s", 0))


def main() -> int:
    logging.basicConfig(level=logging.WARNING)
    logging.getLogger("kafka").setLevel(logging.CRITICAL)
    spec = json.loads(open(sys.argv[1]).read())
    scope = Scope(spec["job"], "test")
    with open(spec["log"], "a", buffering=1) as log, channel_from(spec).open() as channel:
        if spec["scenario"] == "send":
            send_values(channel, scope, spec, log)
        elif spec["scenario"] == "recv_big":
            got = channel.recv(scope.tag("big"), timeout=120)
            log.write(f"got big {hashlib.sha256(got.tobytes()).hexdigest()} {got.shape} {got.dtype}\n")
            log.write(f"got hello {json.dumps(channel.recv(scope.tag('hello'), timeout=60))}\n")
        elif spec["scenario"] == "recv":
            receive_values(channel, scope, spec, log)
    return 0


if __name__ == "__main__":
    sys.exit(main())
