"""Session-wide fixtures: the embedded broker, Spark and Ray start once per test run.

DESIGN.md ("Tests that fit in CI"): starting these is slow, so every test
shares one of each; Spark and Ray start only if some test asks for them.
"""

from __future__ import annotations

import logging
import os
import tempfile
import sys

import pytest

from fedps.messaging.broker import EmbeddedBroker
from fedps.messaging.config import KafkaConfig

os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
# `fedps jobs` records go to a throwaway home, not the user's ~/.fedps (subprocesses inherit it)
os.environ.setdefault("FEDPS_HOME", tempfile.mkdtemp(prefix="fedps-home-"))
logging.getLogger("kafka").setLevel(logging.CRITICAL)
# Every JVM of the tests (the session's Spark, each party's, spark-submit's) runs small data for a short
# while: the C1 compiler alone halves the CPU a cold JVM spends (Spark start and the first layout, about
# 20 s to 10 s on 2 cores), which the C2 compiler would only repay on long jobs. C1 alone shrinks the
# JVM's default code cache to 48 MB, which the session's Spark (alive for the whole run) filled in CI:
# the JVM then failed a method-handle link inside a Spark call and the call never returned. So the
# cache is set back to the tiered default's size.
if "TieredStopAtLevel" not in os.environ.get("JAVA_TOOL_OPTIONS", ""):
    os.environ["JAVA_TOOL_OPTIONS"] = " ".join(filter(None, [
        os.environ.get("JAVA_TOOL_OPTIONS"), "-XX:TieredStopAtLevel=1", "-XX:ReservedCodeCacheSize=240m"]))


@pytest.fixture(scope="session")
def broker():
    """One embedded Kafka-compatible broker for the whole test session."""
    with EmbeddedBroker() as running:
        yield running


@pytest.fixture(scope="session")
def kafka_config(broker) -> KafkaConfig:
    return KafkaConfig(bootstrap_servers=broker.bootstrap_servers)


@pytest.fixture(scope="session")
def spark():
    """A local[2] SparkSession shared by all tests (executors use this interpreter)."""
    from fedps.engine.config import SparkConfig
    from fedps.engine.session import start_spark, stop_spark

    session = start_spark(SparkConfig(master="local[2]", conf={"spark.sql.shuffle.partitions": "2"}))
    yield session
    stop_spark(session)


@pytest.fixture(scope="session")
def ray_address():
    """A local Ray cluster shared by all tests; yields its GCS address."""
    from fedps.engine.config import RayConfig
    from fedps.engine.session import start_ray, stop_ray

    address = start_ray(RayConfig(object_store_mb=128, num_cpus=2))
    yield address
    stop_ray()


@pytest.fixture
def make_parties(tmp_path, kafka_config):
    """Factory: ``make_parties("a", "b")`` gives each party an identity and a ChannelConfig
    that pins every other party; ``chunk_bytes`` and timeouts may be overridden."""
    from fedps.messaging.config import ChannelConfig
    from fedps.messaging.identity import generate_identity

    def make(*names: str, **settings):
        public = {n: generate_identity(tmp_path / "keys" / f"{n}.key") for n in names}
        return {
            n: ChannelConfig(
                kafka=kafka_config,
                identity_key=str(tmp_path / "keys" / f"{n}.key"),
                peers={p: public[p] for p in names if p != n},
                state_dir=str(tmp_path / "state" / n),
                **settings,
            )
            for n in names
        }

    return make


@pytest.fixture
def job_id(request) -> str:
    """A job id unique to the test, so tests never share topics."""
    import uuid

    return f"t{uuid.uuid4().hex[:12]}"


_session: list = []


def pytest_sessionstart(session):
    _session.append(session)


@pytest.hookimpl(trylast=True)
def pytest_unconfigure(config):
    """A test thread wedged in a call that never returns (a timed-out test leaves it behind) would keep
    the interpreter from exiting after the summary, and CI would wait for it until its own limit. Name
    such threads and exit with pytest's status instead (1 if the session never got one)."""
    import threading

    def stuck():
        return [t for t in threading.enumerate()
                if t is not threading.main_thread() and t.is_alive() and not t.daemon]

    for thread in stuck():   # a thread about to finish (an idle pool's worker) gets a moment
        thread.join(1.0)
    left = stuck()
    if left:
        status = getattr(_session[0], "exitstatus", 1) if _session else 1
        sys.stdout.flush()
        sys.stderr.write("tests left non-daemon threads running, exiting without waiting for them: "
                         + ", ".join(t.name for t in left) + "\n")
        sys.stderr.flush()
        os._exit(int(status))
