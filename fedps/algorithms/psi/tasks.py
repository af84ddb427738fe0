"""Serving the buckets: a barrier stage of executor tasks, or the driver alone for a small run.

Task ``t`` of ``T = min(buckets, slots)`` serves buckets ``t, t + T, ...`` in
increasing order (``fedps.engine.vertical.stage.owned``), so the PSI cannot
deadlock whatever the two parties' task counts: the lowest bucket not yet
done is always being served on both sides, and within a bucket every party
sends before it waits. A small run (``params.local_below``) serves every
bucket in the driver, in the same order, over the same link, so the peer
cannot tell and need not choose the same way.

A bucket is done when its outputs are in the work folder and everything the
peer needs from it is on the broker; then ``done/bucket=<b>.json`` (its
counts) is committed. A restarted party skips done buckets and serves the
others again (see :mod:`fedps.algorithms.psi.stream` on why that is safe).
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from typing import Any, Callable

from fedps.algorithms.psi.storage import Folder
from fedps.algorithms.psi.stream import BucketIO, executor_error
from fedps.engine.vertical.stage import owned, slots
from fedps.errors import ConfigError
from fedps.messaging.tags import Scope

log = logging.getLogger(__name__)

DONE = "done"
#: Fault injection for tests: seconds to sleep after each bucket is done (so a test can kill -9 mid-PSI).
PAUSE_ENV = "FEDPS_TEST_PSI_PAUSE_AFTER_BUCKET_S"

ServeFn = Callable[[BucketIO], None]


@dataclass(frozen=True)
class BucketPlan:
    """What every server of buckets needs (picklable; shipped to the tasks)."""

    link: Any            # messaging.partitioned.LinkSpec
    work: Folder
    scope: Scope
    buckets: int
    batch_size: int
    wait_s: float
    #: Most executor tasks (0: one per task slot).
    tasks: int = 0
    #: The private key of the order this party sends its ids in (``BucketIO.shuffle_key``).
    shuffle_key: bytes = b""


def done_buckets(work: Folder) -> dict[int, dict[str, int]]:
    """The buckets already done in ``work`` (by an earlier run of this job), with their counts."""
    found = {}
    for path in work.child(DONE).files(".json"):
        name = path.rsplit("/", 1)[-1]
        bucket = int(name[len("bucket="):-len(".json")])
        found[bucket] = work.child(DONE).read_json(name) or {}
    return found


def _serve_one(plan: BucketPlan, link: Any, bucket: int, fn: ServeFn, stop: Any = None) -> dict[str, int]:
    marker = f"bucket={bucket}.json"
    earlier = plan.work.child(DONE).read_json(marker)
    if earlier is not None:
        return {**earlier, "reused": 1}
    io = BucketIO(bucket, plan.work, link, plan.scope, plan.batch_size, plan.wait_s, stop=stop,
                  shuffle_key=plan.shuffle_key)
    started = time.perf_counter()
    fn(io)
    link.flush()
    io.stats["serve_ms"] = round(1000 * (time.perf_counter() - started))
    plan.work.child(DONE).write_json(marker, io.stats)
    pause = float(os.environ.get(PAUSE_ENV, "0") or 0)
    if pause > 0:
        time.sleep(pause)
    return dict(io.stats)


def serve_in_driver(plan: BucketPlan, fn: ServeFn, stop: Any = None) -> list[dict[str, int]]:
    """Every bucket, in order, in this process (a small run); ``stop`` (an Event) ends the waits."""
    from fedps.messaging.partitioned import PartitionLink

    with PartitionLink(plan.link) as link:
        return [_serve_one(plan, link, b, fn, stop) for b in range(plan.buckets)]


def serve_on_executors(spark: Any, plan: BucketPlan, fn: ServeFn, group: str | None = None) -> list[dict[str, int]]:
    """Every bucket in a barrier stage of ``min(buckets, slots)`` executor tasks.

    ``group``: the Spark job group, so that the driver can cancel the stage
    (``SparkContext.cancelJobGroup``) when the peer aborts.
    """
    tasks = min(plan.buckets, slots(spark), plan.tasks or plan.buckets)
    if plan.tasks > slots(spark):
        raise ConfigError(f"job.params.tasks is {plan.tasks} but this Spark has {slots(spark)} task slots; "
                          "a barrier stage needs all its tasks at once")

    def task(iterator: Any) -> Any:
        from pyspark import BarrierTaskContext

        from fedps.messaging.partitioned import PartitionLink

        t = BarrierTaskContext.get().partitionId()
        with PartitionLink(plan.link) as link:
            for bucket in owned(plan.buckets, tasks, t):
                yield bucket, _serve_one(plan, link, bucket, fn)

    sc = spark.sparkContext
    description = f"fedps psi {plan.scope.phase}: {plan.buckets} buckets in {tasks} tasks"
    if group is not None:
        sc.setJobGroup(group, description, interruptOnCancel=True)
    else:
        sc.setJobDescription(description)
    try:
        served = sc.parallelize(range(tasks), tasks).barrier().mapPartitions(task).collect()
    except Exception as exc:
        raise executor_error(exc) from None
    by_bucket = dict(served)
    return [by_bucket[b] for b in range(plan.buckets)]


def serve_watched(spark: Any, plan: BucketPlan, fn: ServeFn, local: bool,
                  aborted: Callable[[float], BaseException | None]) -> list[dict[str, int]]:
    """Serve the buckets in a thread while this one asks ``aborted(seconds)`` whether the peer
    stopped the job; on an abort the buckets stop (the stage is cancelled) and its error is raised."""
    import threading
    import uuid

    stop = threading.Event()
    group = f"fedps-psi-{uuid.uuid4().hex[:12]}"
    result: dict[str, Any] = {}

    def work() -> None:
        try:
            result["stats"] = serve_in_driver(plan, fn, stop) if local else serve_on_executors(spark, plan, fn, group)
        except BaseException as exc:  # noqa: BLE001 - handed to the waiting thread
            result["error"] = exc

    thread = threading.Thread(target=work, name="psi-buckets", daemon=True)
    thread.start()
    while thread.is_alive():
        error = aborted(0.5)
        if error is not None:
            stop.set()
            if not local:
                spark.sparkContext.cancelJobGroup(group)
            thread.join(30)
            raise error
        thread.join(0.05)
    if "error" in result:
        raise result["error"]
    return result["stats"]
