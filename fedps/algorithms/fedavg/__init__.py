"""FedAvg: horizontal federated learning with secure aggregation (``job.algorithm = "fedavg"``).

The party with ``party.role = "coordinator"`` pins every data party as a peer
and keeps the global model in its parameter server; each data party
(``guest`` or ``host``) pins only the coordinator and trains on its own rows
(``params.data``) with its own Spark. The protocol is in :mod:`.protocol`,
the masking maths in :mod:`.secagg`, what each side learns in
docs/protocols.md ("FedAvg").
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import numpy as np

from fedps.algorithms.fedavg.model import ModelSpec
from fedps.algorithms.fedavg.params import FedAvgParams
from fedps.errors import ConfigError, DataError

log = logging.getLogger(__name__)


def data_source(config: Any, params: FedAvgParams) -> str:
    """``params.data``; a relative local path is read from the configuration file's folder."""
    if "://" in params.data or Path(params.data).is_absolute() or config.source.startswith("<"):
        return params.data
    return str((Path(config.source).parent / params.data).resolve())


#: What one fetch of a coordinator's incoming channel brings: one update slice (``stream``), not a
#: chunk; every idle channel may hold one fetch response, and the coordinator holds one per party.
COORDINATOR_FETCH_BYTES = 64 * 1024


def channel_settings(config: Any) -> dict[str, Any]:
    """Channel settings of this party's role: the coordinator's fetches stay small."""
    return {"fetch_bytes": COORDINATOR_FETCH_BYTES} if config.party.role == "coordinator" else {}


def preflight(config: Any, output_dir: Path) -> None:
    """Settings checks before any channel opens: a clear error instead of a peer waiting."""
    params = FedAvgParams.from_mapping(config.job.params)
    peers = sorted(config.peers)
    if config.party.role == "coordinator":
        if len(peers) < params.min_parties:
            raise ConfigError(f"the coordinator pins {len(peers)} parties ({', '.join(peers) or 'none'}), fewer "
                              f"than params.min_parties = {params.min_parties}")
        return
    if len(peers) != 1:
        raise ConfigError(f"a FedAvg party pins exactly one peer, its coordinator; {config.source} pins "
                          f"{len(peers)}: {', '.join(peers) or 'none'}")
    if not params.data:
        raise ConfigError(f"params.data (this party's training rows) is not set in {config.source}")
    source = data_source(config, params)
    if "://" not in source and not Path(source).exists():
        raise ConfigError(f"params.data {source} does not exist (in {config.source})")


def run(context: Any) -> None:
    params = FedAvgParams.from_mapping(context.config.job.params)
    if context.role == "coordinator":
        _coordinate(context, params)
    else:
        _participate(context, params)


def _coordinate(context: Any, params: FedAvgParams) -> None:
    from fedps.algorithms.fedavg import report
    from fedps.algorithms.fedavg.protocol import Coordinator
    from fedps.algorithms.fedavg.state import FileJournal, PSStore

    job = context.config.job.id
    _ = context.ray_address   # start (or join) Ray while the parties build their layouts
    journal = FileJournal(context.output_dir / "state" / "fedavg-journal.json")
    servers: list[Any] = []

    def start_store(features: list[str], restore: bool) -> PSStore:
        from fedps.ps import OptimizerConfig, ParameterServer, PSConfig, TableSpec

        spec = ModelSpec(params.model, len(features), params.hidden)
        _ = context.ray_address
        table = TableSpec(PSStore.TABLE, width=1, kind="dense", dim=spec.size, dtype="float64",
                          optimizer=OptimizerConfig(name="sgd", learning_rate=1.0))
        config = PSConfig(name=f"fedavg-{job}"[:64], tables=(table,), num_shards=context.config.ps.shards_for(spec.size, False),
                          namespace=context.config.ray.namespace, checkpoint_dir=str(context.output_dir / "checkpoints"),
                          checkpoint_every=1, wait_timeout_s=context.config.ps.wait_timeout_s)
        server = ParameterServer.start(config)
        servers.append(server)
        if restore:
            server.restore()
        return PSStore(server, spec.size, restored=restore)

    class Store:
        """The PS store, started once the parties' columns are known (or at once on a resume)."""

        inner: PSStore | None = None

        def current(self):
            return self.inner.current() if self.inner is not None else (0, None)

        def apply(self, round_: int, step: np.ndarray) -> np.ndarray:
            return self.inner.apply(round_, step)

    store = Store()
    if journal.features is not None:
        try:
            store.inner = start_store(journal.features, restore=True)
        except DataError as exc:
            raise DataError(f"the coordinator of job {job} stopped during its setup ({exc}); start the job "
                            f"again under a new job id") from None

    def initial(features: tuple[str, ...]) -> np.ndarray:
        journal.set_features(list(features))
        store.inner = start_store(list(features), restore=False)
        return ModelSpec(params.model, len(features), params.hidden).initial(params.seed)

    rounds: list[dict] = list(json.loads((context.output_dir / "rounds.json").read_text())) \
        if (context.output_dir / "rounds.json").exists() else []

    def on_round(result: Any) -> None:
        rounds[:] = [r for r in rounds if r["round"] < result.round]
        rounds.append(report.round_record(result))
        report.write_rounds(context.output_dir, rounds)

    from fedps.algorithms.fedavg.protocol import BROADCAST_CHUNK_BYTES
    from fedps.messaging.broadcast import BroadcastSender

    broadcast = BroadcastSender.beside(next(iter(context.channels.values())), BROADCAST_CHUNK_BYTES).open()
    coordinator = Coordinator(job, context.channels, params, store, journal=journal, on_round=on_round,
                              initial=initial, broadcast=broadcast)
    try:
        theta = coordinator.run()
        features = journal.features or []
        report.write_model(context.output_dir, params, features, theta)
        report.plot(context.output_dir, rounds, coordinator.final_evaluation)
        context.metrics.update(rounds=rounds, final_validation=report.clean(coordinator.final_evaluation),
                               parameters=int(theta.size), secure=params.secure)
    finally:
        broadcast.close()
        for server in servers:
            server.stop()


def _participate(context: Any, params: FedAvgParams) -> None:
    from fedps.algorithms.fedavg import report
    from fedps.algorithms.fedavg.local import SparkData
    from fedps.algorithms.fedavg.protocol import Party
    from fedps.algorithms.fedavg.state import PartyState
    from fedps.engine.layout import build_layout

    (coordinator,) = context.channels
    layout = build_layout(context.spark, data_source(context.config, params), folder=str(context.output_dir / "layout"),
                          partitions=params.partitions, id_column=params.id_column,
                          label_column=params.label_column)
    data = SparkData(context.spark, layout, params)
    state = PartyState(context.output_dir / "state" / "fedavg-party.json")
    first = state.next_round
    if first:
        log.info("fedavg %s: restarted; skipping round %d, waiting for round %d", context.me, first - 1, first)
        context.channels[coordinator].drop(lambda tag: tag.phase == "fedavg" and 0 <= tag.iteration < first)
    from fedps.messaging.broadcast import BroadcastReceiver

    with BroadcastReceiver.beside(context.channels[coordinator]) as broadcast:
        party = Party(context.config.job.id, context.me, context.channels[coordinator], params, data,
                      first_round=first, parties=state.parties,
                      on_round_done=lambda started: state.save(started, party.parties), broadcast=broadcast)
        theta = party.run()
    report.write_model(context.output_dir, params, list(data.features), theta)
    context.metrics.update(final_validation=report.clean(party.final_evaluation), dropped_rounds=party.dropped_rounds,
                           training_rows=data.train_rows, local_training=data.mode)
