"""One stage of executor tasks: the per-row work of a vertical job, gang-scheduled.

A stage runs ``T = min(N, slots)`` Spark tasks in barrier mode (all of them
start together or none does). Task ``t`` serves the layout partitions
``t, t + T, t + 2T, ...`` in increasing order, so the job finishes whatever
``N`` is: the lowest partition not yet done is always served by running
tasks on every side, whatever each side's ``T`` (see docs/operations.md,
"Executor stages"). A task talks to the peer task of the same partition
through :class:`fedps.messaging.partitioned.PartitionLink` and hands results
to its own driver through the party's accumulator actor.

The stage runs in a background thread of the driver, so the driver can do
its per-batch work (masking, decryption for peers, PS steps) while the
tasks run; a failed stage wakes the waiting driver through the accumulator.
"""

from __future__ import annotations

import logging
import os
import threading
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable

from fedps.engine.vertical.accumulator import AccumulatorRef
from fedps.errors import FedpsError, PeerError

if TYPE_CHECKING:
    from fedps.engine.layout import Layout

log = logging.getLogger(__name__)

#: Fault injection for tests: a task fails once when this file does not exist yet (it creates it).
FAIL_ONCE_ENV = "FEDPS_TEST_FAIL_TASK_ONCE"


def owned(partitions: int, tasks: int, task: int) -> list[int]:
    """The layout partitions task ``task`` of ``tasks`` serves, in increasing order."""
    return list(range(task, partitions, tasks))


@dataclass(frozen=True)
class StageSpec:
    """What every task of a party's stages needs (picklable; shipped in the closure)."""

    layout: "Layout"
    links: dict[str, Any]            # peer -> messaging.partitioned.LinkSpec
    accumulator: AccumulatorRef
    tasks: int
    env: dict[str, str] = field(default_factory=dict)


class TaskEnv:
    """A running task's view: its partitions, open links to peers, the accumulator."""

    def __init__(self, spec: StageSpec, task: int) -> None:
        from fedps.messaging.partitioned import PartitionLink

        self.spec = spec
        self.task = task
        self.partitions = owned(spec.layout.partitions, spec.tasks, task)
        self.accumulator = spec.accumulator
        self.links = {peer: PartitionLink(link).open() for peer, link in spec.links.items()}

    def rows(self, p: int) -> Any:
        from fedps.engine.layout import read_partition

        return read_partition(self.spec.layout, p)

    def seek(self, step: int) -> None:
        """Position every link on every partition of this task where step ``step`` can be replayed."""
        positions = self.accumulator.positions(step)
        for peer, link in self.links.items():
            for p in self.partitions:
                offset = positions.get(f"{peer}/{p}")
                if offset is not None:
                    link.seek(p, int(offset))

    def record(self, step: int, p: int) -> None:
        """Everything of partition ``p`` before step ``step`` was consumed: remember where that is."""
        self.accumulator.record_positions(step, {f"{peer}/{p}": link.position(p)
                                                 for peer, link in self.links.items()})

    def close(self) -> None:
        for link in self.links.values():
            try:
                link.close()
            except Exception as exc:  # noqa: BLE001 - closing must not hide the task's result
                log.debug("closing a link failed: %s", exc)


def _maybe_fail_once() -> None:
    marker = os.environ.get(FAIL_ONCE_ENV)
    if marker and not os.path.exists(marker):
        with open(marker, "w") as out:
            out.write("failed once\n")
        raise RuntimeError("injected task failure (test)")


def slots(spark: Any) -> int:
    """Task slots of this party's Spark: the most tasks a barrier stage may have."""
    return max(1, int(spark.sparkContext.defaultParallelism))


class Stage:
    """A barrier stage running ``work(env)`` in every task, in a background thread."""

    def __init__(self, spark: Any, spec: StageSpec, work: Callable[[TaskEnv], Any], name: str) -> None:
        self.spark, self.spec, self.work, self.name = spark, spec, work, name
        self.results: list[Any] | None = None
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name=f"stage-{name}", daemon=True)

    def start(self) -> Stage:
        self._thread.start()
        return self

    def _run(self) -> None:
        spec, work = self.spec, self.work

        def task(iterator: Any) -> Any:
            from pyspark import BarrierTaskContext

            context = BarrierTaskContext.get()
            for key, value in spec.env.items():
                os.environ.setdefault(key, value)
            env = TaskEnv(spec, context.partitionId())
            try:
                _maybe_fail_once()
                result = work(env)
            finally:
                env.close()
            yield result

        sc = self.spark.sparkContext
        sc.setJobDescription(f"fedps {self.name}")
        try:
            rdd = sc.parallelize(range(spec.tasks), spec.tasks)
            self.results = rdd.barrier().mapPartitions(task).collect()
        except BaseException as exc:  # handed to the driver thread
            self.error = exc
            try:
                import ray

                ray.get(spec.accumulator.actor().fail.remote(f"the {self.name} stage failed: {_short(exc)}"))
            except Exception:  # noqa: BLE001
                pass

    def join(self) -> list[Any]:
        """Wait for the tasks; their results in task order, or the stage's error."""
        self._thread.join()
        if self.error is not None:
            raise _as_fedps(self.error, self.name)
        return self.results or []

    @property
    def retriable(self) -> bool:
        """The stage failed for a reason of its own (a crashed worker, a lost executor), not fedps's."""
        if self.error is None or self._thread.is_alive():
            return False
        return not isinstance(self.error, FedpsError) and "fedps.errors." not in str(self.error)

    def restart(self) -> Stage:
        """The same stage once more: its tasks resume at the PS's step (nothing counts twice)."""
        import ray

        ray.get(self.spec.accumulator.actor().clear_failure.remote())
        return Stage(self.spark, self.spec, self.work, self.name).start()

    def settle(self, timeout_s: float) -> bool:
        """Give a stage that is failing ``timeout_s`` to finish; True if it still runs."""
        self._thread.join(timeout_s)
        return self._thread.is_alive()

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()


def _short(exc: BaseException) -> str:
    text = str(exc)
    for marker in ("fedps.errors.", "PeerError: ", "ProtocolError: ", "DataError: "):
        if marker in text:
            text = text[text.rindex(marker) + len(marker):]
    return text.strip().splitlines()[0][:500] if text.strip() else type(exc).__name__


def _as_fedps(exc: BaseException, name: str) -> BaseException:
    """A task's fedps error reaches the driver as itself (kind and message), not as a Java trace."""
    from fedps import errors

    if isinstance(exc, FedpsError):
        return exc
    text = str(exc)
    for kind in ("DataError", "ProtocolError", "PeerError", "ConfigError", "CryptoError"):
        marker = f"fedps.errors.{kind}: "
        if marker in text:
            message = text[text.rindex(marker) + len(marker):].strip().splitlines()[0]
            return getattr(errors, kind)(message)
    return PeerError(f"the {name} stage failed: {_short(exc)}")
