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


def done_buckets(work: Folder) -> dict[int, dict[str, int]]:
    """The buckets already done in ``work`` (by an earlier run of this job), with their counts."""
    found = {}
    for path in work.child(DONE).files(".json"):
        name = path.rsplit("/", 1)[-1]
        bucket = int(name[len("bucket="):-len(".json")])
        found[bucket] = work.child(DONE).read_json(name) or {}
    return found


def _serve_one(plan: BucketPlan, link: Any, bucket: int, fn: ServeFn) -> dict[str, int]:
    marker = f"bucket={bucket}.json"
    earlier = plan.work.child(DONE).read_json(marker)
    if earlier is not None:
        return {**earlier, "reused": 1}
    io = BucketIO(bucket, plan.work, link, plan.scope, plan.batch_size, plan.wait_s)
    fn(io)
    link.flush()
    plan.work.child(DONE).write_json(marker, io.stats)
    pause = float(os.environ.get(PAUSE_ENV, "0") or 0)
    if pause > 0:
        time.sleep(pause)
    return dict(io.stats)


def serve_in_driver(plan: BucketPlan, fn: ServeFn) -> list[dict[str, int]]:
    """Every bucket, in order, in this process (a small run)."""
    from fedps.messaging.partitioned import PartitionLink

    with PartitionLink(plan.link) as link:
        return [_serve_one(plan, link, b, fn) for b in range(plan.buckets)]


def serve_on_executors(spark: Any, plan: BucketPlan, fn: ServeFn) -> list[dict[str, int]]:
    """Every bucket in a barrier stage of ``min(buckets, slots)`` executor tasks."""
    tasks = min(plan.buckets, slots(spark))

    def task(iterator: Any) -> Any:
        from pyspark import BarrierTaskContext

        from fedps.messaging.partitioned import PartitionLink

        t = BarrierTaskContext.get().partitionId()
        with PartitionLink(plan.link) as link:
            for bucket in owned(plan.buckets, tasks, t):
                yield bucket, _serve_one(plan, link, bucket, fn)

    sc = spark.sparkContext
    sc.setJobDescription(f"fedps psi {plan.scope.phase}: {plan.buckets} buckets in {tasks} tasks")
    try:
        served = sc.parallelize(range(tasks), tasks).barrier().mapPartitions(task).collect()
    except Exception as exc:
        raise executor_error(exc) from None
    by_bucket = dict(served)
    return [by_bucket[b] for b in range(plan.buckets)]
