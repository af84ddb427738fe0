"""Every party of a SecureBoost job in one process, one thread each (tests, benchmarks).

The parties still talk through real channels (a Kafka broker), run their
per-row work in Spark tasks of one shared local Spark and keep their
accumulators on one local Ray; only the processes are shared.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from fedps.algorithms.secureboost import model_json, open_trainer
from fedps.algorithms.secureboost.params import SBParams
from fedps.engine.vertical.checkpoint import JobRecords
from fedps.messaging.channel import Channel
from fedps.messaging.config import ChannelConfig


@dataclass
class PartyResult:
    model: dict | None = None
    state: Any = None
    metrics: dict[str, Any] = field(default_factory=dict)
    error: BaseException | None = None
    trainer: Any = None


def run_in_threads(job: str, configs: dict[str, ChannelConfig], layouts: dict[str, Any],
                   params: dict[str, SBParams], folder: Path, spark: Any, timeout_s: float = 1800,
                   channels_out: dict | None = None) -> dict[str, PartyResult]:
    """Train with ``guest`` and every other name in ``layouts`` as hosts; returns each party's result."""
    names = list(layouts)
    hosts = [n for n in names if n != "guest"]
    results = {name: PartyResult() for name in names}

    def party(name: str) -> None:
        result = results[name]
        channels = {peer: Channel(job, name, peer, configs[name]) for peer in names if peer != name}
        if channels_out is not None:
            channels_out[name] = channels
        try:
            openers = [threading.Thread(target=c.open) for c in channels.values()]
            for opener in openers:
                opener.start()
            for opener in openers:
                opener.join()
            context = SimpleNamespace(me=name, channels=channels, spark=spark,
                                      config=SimpleNamespace(job=SimpleNamespace(id=job),
                                                             ray=SimpleNamespace(namespace="fedps")))
            records = JobRecords(Path(folder) / name / "checkpoint", job)
            trainer = open_trainer(context, params[name], layouts[name], records, "guest", hosts)
            try:
                result.state = trainer.run()
                result.model = model_json(trainer)
                result.trainer = trainer
            finally:
                trainer.job.stop()
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
