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
