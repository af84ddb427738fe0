"""Every party of a vertical LR job in one process, one thread each.

For tests, benchmarks and simulations: the parties still talk through real
channels (a Kafka broker), run their per-row work in Spark tasks of one
shared local Spark, and keep their models in real parameter servers on one
local Ray; only the processes are shared. Production runs one ``fedps run``
per party.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from fedps.algorithms.hetero_lr import make_trainer, model_json, open_job
from fedps.algorithms.hetero_lr.params import LRParams, TrainState
from fedps.engine.config import PSSettings
from fedps.engine.vertical.checkpoint import JobRecords
from fedps.messaging.channel import Channel
from fedps.messaging.config import ChannelConfig


@dataclass
class PartyResult:
    state: TrainState | None = None
    model: dict | None = None                    # what model.json would hold
    metrics: dict[str, Any] = field(default_factory=dict)
    error: BaseException | None = None


def run_in_threads(job: str, configs: dict[str, ChannelConfig], layouts: dict[str, Any],
                   params: dict[str, LRParams], folder: Path, spark: Any, timeout_s: float = 1800,
                   hosts: list[str] | None = None) -> dict[str, PartyResult]:
    """Train with ``guest`` and every other name in ``layouts`` as hosts; returns each party's result."""
    names = list(layouts)
    hosts = hosts or [n for n in names if n != "guest"]
    results = {name: PartyResult() for name in names}

    def party(name: str) -> None:
        result = results[name]
        channels = {peer: Channel(job, name, peer, configs[name]) for peer in names if peer != name}
        try:
            openers = [threading.Thread(target=c.open) for c in channels.values()]
            for opener in openers:
                opener.start()
            for opener in openers:
                opener.join()
            context = SimpleNamespace(
                me=name, channels=channels, spark=spark,
                config=SimpleNamespace(job=SimpleNamespace(id=job), ps=PSSettings(),
                                       ray=SimpleNamespace(namespace="fedps")))
            records = JobRecords(Path(folder) / name / "checkpoint", job)
            vertical = open_job(context, params[name], layouts[name], records, "guest", hosts)
            try:
                trainer = make_trainer(vertical, params[name])
                result.state = trainer.run()
                result.model = model_json(trainer)
                result.metrics = {"seconds_by_work": dict(trainer.crypto.timings),
                                  "task_seconds_by_work": dict(trainer.task_seconds),
                                  "refused": dict(trainer.refused),
                                  "final": trainer.state.metrics[-1] if trainer.state.metrics else {}}
            finally:
                vertical.stop()
        except BaseException as exc:  # handed to the caller, per party
            result.error = exc
        finally:
            for channel in channels.values():
                channel.close()

    threads = [threading.Thread(target=party, args=(name,), daemon=True) for name in names]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=timeout_s)
    return results
