"""Spark and Ray sessions: embedded by default, a real cluster when configured.

``spark_session`` starts ``local[2]`` unless the process runs under
``spark-submit``, in which case it uses the master it was given. ``ray_session``
starts a local Ray with a small object store unless ``ray.address`` names a
cluster. Both are quiet by default and shut down cleanly as context managers.
"""

from __future__ import annotations

import logging
import os
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Iterator

from fedps.engine.config import RayConfig, SparkConfig
from fedps.errors import ConfigError

if TYPE_CHECKING:
    from pyspark.sql import SparkSession

log = logging.getLogger(__name__)

_LOG4J = Path(__file__).with_name("resources") / "log4j2.properties"


def under_spark_submit() -> bool:
    """True when this Python driver was launched by ``spark-submit``."""
    return "PYSPARK_GATEWAY_PORT" in os.environ or "SPARK_SUBMIT_OPTS" in os.environ


def start_spark(config: SparkConfig | None = None) -> SparkSession:
    """Start (or join) a SparkSession configured for fedps."""
    config = config or SparkConfig()
    # Executors must run the driver's interpreter, or they miss the virtualenv.
    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
    os.environ.setdefault("PYSPARK_DRIVER_PYTHON", sys.executable)
    os.environ.setdefault("SPARK_LOCAL_IP", "127.0.0.1")
    try:
        from pyspark.sql import SparkSession
    except ImportError as exc:
        raise ConfigError("pyspark is not installed; `pip install fedps` brings it") from exc
    builder = SparkSession.builder.appName(config.app_name)
    if not under_spark_submit():
        builder = builder.master(config.master)
        defaults = {
            "spark.ui.enabled": "false",
            "spark.ui.showConsoleProgress": "false",
            "spark.sql.shuffle.partitions": "4",
            "spark.driver.bindAddress": "127.0.0.1",
            "spark.driver.host": "127.0.0.1",
            "spark.python.worker.reuse": "true",
            "spark.driver.extraJavaOptions": f"-Dlog4j2.configurationFile={_LOG4J}",
        }
        for key, value in {**defaults, **config.conf}.items():
            builder = builder.config(key, value)
    else:
        for key, value in config.conf.items():
            builder = builder.config(key, value)
    spark = builder.getOrCreate()
    spark.sparkContext.setLogLevel(config.log_level)
    log.info("spark session on %s", spark.sparkContext.master)
    return spark


def stop_spark(spark: SparkSession) -> None:
    spark.stop()


@contextmanager
def spark_session(config: SparkConfig | None = None) -> Iterator[SparkSession]:
    spark = start_spark(config)
    try:
        yield spark
    finally:
        stop_spark(spark)


def start_ray(config: RayConfig | None = None) -> str:
    """Connect to Ray (starting a local one by default); returns the GCS address.

    Spark executors on the same machine reach the local cluster with
    ``ray.init(address=<returned address>)``.
    """
    config = config or RayConfig()
    import ray

    if ray.is_initialized():
        return ray.get_runtime_context().gcs_address
    options: dict = {
        "namespace": config.namespace,
        "logging_level": logging.WARNING,
        "log_to_driver": False,
        "configure_logging": True,
    }
    if config.address:
        options["address"] = config.address
    else:
        options.update(
            include_dashboard=False,
            object_store_memory=config.object_store_mb * 1024 * 1024,
        )
        if config.num_cpus:
            options["num_cpus"] = config.num_cpus
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    ray.init(**options)
    address = ray.get_runtime_context().gcs_address
    log.info("ray connected at %s", address)
    return address


def stop_ray() -> None:
    import ray

    if ray.is_initialized():
        ray.shutdown()


@contextmanager
def ray_session(config: RayConfig | None = None) -> Iterator[str]:
    address = start_ray(config)
    try:
        yield address
    finally:
        stop_ray()
