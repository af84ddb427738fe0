"""A broker that loses the job's topics (the embedded one keeps nothing across a restart)."""

from __future__ import annotations

import dataclasses
import threading
import time

import pytest

from fedps.errors import PeerError
from fedps.messaging.broker import EmbeddedBroker
from fedps.messaging.channel import Channel
from fedps.messaging.tags import Scope

LOST = "the broker lost the topics of this job; rerun it under a new job id"


@pytest.fixture
def own_broker():
    """A broker of this test alone, which it may restart (never the session's)."""
    broker = EmbeddedBroker().start()
    yield broker
    broker.stop()


def test_a_restarted_broker_stops_both_parties_fast_and_a_resume_too(own_broker, make_parties, job_id):
    kafka = dataclasses.replace(make_parties("x")["x"].kafka, bootstrap_servers=own_broker.bootstrap_servers)
    configs = {n: dataclasses.replace(c, kafka=kafka) for n, c in make_parties("a", "b").items()}
    a, b = Channel(job_id, "a", "b", configs["a"]), Channel(job_id, "b", "a", configs["b"])
    opener = threading.Thread(target=a.open)
    opener.start()
    b.open()
    opener.join()
    scope = Scope(job_id, "t")
    for i in range(3):
        a.send(scope.at(iteration=i).tag("x"), i)
        assert b.recv(scope.at(iteration=i).tag("x"), timeout=10) == i
        b.send(scope.at(iteration=i).tag("y"), i)
        assert a.recv(scope.at(iteration=i).tag("y"), timeout=10) == i

    port = own_broker.port
    own_broker.stop()
    own_broker.port = port
    own_broker.start()                                 # empty: the job's topics are gone
    a.send(scope.at(iteration=5).tag("z"), 5)          # a send into the lost topic fails or vanishes

    errors: dict[str, BaseException] = {}

    def wait(name: str, channel: Channel, tag_name: str) -> None:
        try:
            channel.recv(scope.at(iteration=9).tag(tag_name), timeout=60)
        except BaseException as exc:  # noqa: BLE001 - handed to the test
            errors[name] = exc

    started = time.monotonic()
    waiters = [threading.Thread(target=wait, args=("a", a, "y")), threading.Thread(target=wait, args=("b", b, "x"))]
    for thread in waiters:
        thread.start()
    for thread in waiters:
        thread.join(60)
    assert time.monotonic() - started < 30
    for name, channel in (("a", a), ("b", b)):
        assert isinstance(errors.get(name), PeerError), errors.get(name)
        assert LOST in str(errors[name]) and channel.in_topic in str(errors[name])
    a.close()
    b.close()

    started = time.monotonic()
    with pytest.raises(PeerError, match=LOST):         # a restarted party fails as fast
        Channel(job_id, "b", "a", configs["b"]).open()
    assert time.monotonic() - started < 30
