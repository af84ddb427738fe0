"""Control messages: a stopping party tells its peer why; a party alone says it waits.

Real channels on the embedded broker, parties as threads of this process.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time

import pytest

from fedps.errors import ConfigError, PeerError
from fedps.messaging.channel import Channel
from fedps.messaging.control import PeerStopped, send_stopped
from fedps.messaging.identity import generate_identity
from fedps.messaging.tags import Scope


def open_pair(job: str, configs: dict) -> tuple[dict, dict]:
    channels = {"a": Channel(job, "a", "b", configs["a"]), "b": Channel(job, "b", "a", configs["b"])}
    errors: dict[str, BaseException] = {}

    def open_one(name: str) -> None:
        try:
            channels[name].open()
        except BaseException as exc:  # noqa: BLE001 - handed to the test
            errors[name] = exc

    threads = [threading.Thread(target=open_one, args=(n,)) for n in channels]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    return channels, errors


def test_peer_that_stops_is_named_with_its_reason_at_once(make_parties, job_id):
    channels, errors = open_pair(job_id, make_parties("a", "b", recv_timeout_s=60.0))
    assert not errors
    assert send_stopped(channels["a"], "DataError", "its label column is not a binary 0/1 label")
    started = time.monotonic()
    with pytest.raises(PeerStopped) as error:
        channels["b"].recv(Scope(job_id, "lr_setup").tag("keys"))
    assert str(error.value) == "a stopped: DataError: its label column is not a binary 0/1 label"
    assert time.monotonic() - started < 30   # not the 60 s receive timeout
    for channel in channels.values():
        channel.close()


def test_values_sent_before_a_stop_are_still_received_then_the_stop_fails_at_once(make_parties, job_id):
    channels, errors = open_pair(job_id, make_parties("a", "b", recv_timeout_s=60.0))
    assert not errors
    scope = Scope(job_id, "fedavg").at(iteration=0)
    channels["a"].send(scope.tag("masked"), {"update": [1, 2, 3]})
    assert send_stopped(channels["a"], "PeerError", "it finished its part of the job")
    time.sleep(1.0)   # both are on the broker, so b's first fetch brings the value and the stop together
    assert channels["b"].recv(scope.tag("masked")) == {"update": [1, 2, 3]}
    started = time.monotonic()
    with pytest.raises(PeerStopped, match="a stopped: PeerError: it finished its part of the job"):
        channels["b"].recv(scope.tag("unmask"))
    assert time.monotonic() - started < 30   # not the 60 s receive timeout
    for channel in channels.values():
        channel.close()


def test_party_started_alone_says_whom_it_waits_for_and_until_when(make_parties, job_id, caplog):
    configs = make_parties("a", "b", handshake_timeout_s=4.0)
    caplog.set_level(logging.INFO, logger="fedps")
    with pytest.raises(PeerError, match="did not answer the key exchange"):
        Channel(job_id, "a", "b", configs["a"]).open()
    notices = [r.getMessage() for r in caplog.records if "waiting for b" in r.getMessage()]
    assert notices and f"fedps.{job_id}.b.a" in notices[0] and "until" in notices[0]


def test_wrong_pinned_key_stops_both_sides_naming_the_keys(make_parties, job_id, tmp_path):
    configs = make_parties("a", "b", recv_timeout_s=60.0)
    stranger = generate_identity(tmp_path / "keys" / "stranger.key")
    configs["a"] = dataclasses.replace(configs["a"], peers={"b": stranger})   # a pins the wrong key for b
    channels, errors = open_pair(job_id, configs)
    assert isinstance(errors.get("a"), ConfigError)
    assert "does not trust b's identity key" in str(errors["a"]) and stranger in str(errors["a"])
    assert "b" not in errors
    with pytest.raises(PeerStopped, match="a stopped: ConfigError: a does not trust b's identity key"):
        channels["b"].recv(Scope(job_id, "preflight").tag("ready"))
    channels["b"].close()
    channels["a"].close()
