"""Every party of a vertical LR job in one process, one thread each.

For tests, benchmarks and simulations: the parties still talk through real
channels (a Kafka broker) and keep their models in a real parameter server;
only the processes are shared. Production runs one ``fedps run`` per party.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedps.algorithms.hetero_lr import trainer
from fedps.algorithms.hetero_lr.checkpoints import JobCheckpoint
from fedps.algorithms.hetero_lr.model import PartyModel
from fedps.algorithms.hetero_lr.params import LRParams, TrainState
from fedps.messaging.channel import Channel
from fedps.messaging.config import ChannelConfig


@dataclass
class PartyResult:
    state: TrainState | None = None
    weights: tuple[Any, float] | None = None     # dense parties: (weights, intercept)
    stored_rows: int = 0
    validation: tuple[Any, Any] | None = None    # guest: (labels, scores) of the validation rows
    error: BaseException | None = None
    received: list[tuple[Any, Any]] = field(default_factory=list)


def _record(channel: Channel, into: list) -> None:
    original = channel.recv

    def recv(tag, timeout=None):
        value = original(tag, timeout)
        into.append((tag, value))
        return value

    channel.recv = recv


def run_in_threads(job: str, configs: dict[str, ChannelConfig], data: dict[str, trainer.PartyData],
                   params: dict[str, LRParams], folder: Path, record: bool = False,
                   timeout_s: float = 3600) -> dict[str, PartyResult]:
    """Train with ``guest`` and every other name in ``data`` as hosts; returns each party's result."""
    names = list(data)
    hosts = [n for n in names if n != "guest"]
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
            if record:
                for channel in channels.values():
                    _record(channel, result.received)

            def make_model(features: int, intercept: bool, sparse: bool) -> PartyModel:
                return PartyModel(f"{job}-{name}", features, params[name], intercept,
                                  str(Path(folder) / name / "ps"), sparse=sparse)

            session = trainer.setup(name, "guest", hosts, channels, data[name], params[name], job,
                                    JobCheckpoint(Path(folder) / name), make_model)
            try:
                result.state = trainer.train(session)
                result.weights = None if data[name].sparse else session.model.weights()
                result.stored_rows = session.model.stored_rows()
                result.validation = session.last_validation
            finally:
                session.model.stop()
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
