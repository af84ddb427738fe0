"""The embedded Spark and Ray sessions: executors run this interpreter; Ray answers."""

from __future__ import annotations

import sys

from fedps.engine.session import under_spark_submit


def test_spark_executors_use_the_driver_interpreter(spark):
    executables = spark.sparkContext.parallelize(range(4), 2).map(lambda _: __import__("sys").executable).collect()
    assert set(executables) == {sys.executable}
    assert spark.sparkContext.master == "local[2]"
    assert not under_spark_submit()


def test_ray_runs_remote_work_and_gives_an_address(ray_address):
    import ray

    @ray.remote
    def square(x: int) -> int:
        return x * x

    assert ray.get([square.remote(i) for i in range(4)]) == [0, 1, 4, 9]
    host, port = ray_address.rsplit(":", 1)
    assert host and int(port) > 0


class _FlakyRay:
    """Ray whose local node times out at start-up ``failures`` times (the fault of an overloaded machine)."""

    def __init__(self, failures: int) -> None:
        self.failures, self.inits, self.shutdowns = failures, 0, 0

    def init(self, **options) -> None:
        self.inits += 1
        if self.inits <= self.failures:
            raise Exception("The current node timed out during startup. This could happen because ...")

    def shutdown(self) -> None:
        self.shutdowns += 1


def test_a_local_ray_that_times_out_at_start_up_is_started_again():
    from fedps.engine.session import _init_ray

    ray = _FlakyRay(failures=2)
    _init_ray(ray, {}, local=True)
    assert (ray.inits, ray.shutdowns) == (3, 2)


def test_a_ray_that_never_starts_is_a_clear_error_naming_the_load():
    import pytest

    from fedps.engine.session import LOCAL_RAY_ATTEMPTS, _init_ray
    from fedps.errors import FedpsError

    ray = _FlakyRay(failures=99)
    with pytest.raises(FedpsError, match=r"could not start a local Ray: The current node timed out .*load average"):
        _init_ray(ray, {}, local=True)
    assert ray.inits == LOCAL_RAY_ATTEMPTS
    remote = _FlakyRay(failures=99)   # a cluster's Ray is not started again: its address is named
    with pytest.raises(FedpsError, match=r"Ray at '10.0.0.1:6379'.*check \[ray\] address"):
        _init_ray(remote, {"address": "10.0.0.1:6379"}, local=False)
    assert remote.inits == 1
