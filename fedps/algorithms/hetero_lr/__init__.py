"""Vertical logistic regression: ``job.algorithm = "hetero_lr"``.

``run(context)`` trains this party's part of the model with its peers, or
resumes the job from the party's last checkpoint, and writes the party's
report into its output folder: ``model.json`` (its own weights only),
``metrics.json``, and on the guest ``loss.png`` and ``roc.png``.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from pathlib import Path

from fedps.algorithms.hetero_lr import trainer
from fedps.algorithms.hetero_lr.checkpoints import JobCheckpoint
from fedps.algorithms.hetero_lr.data import load_party_data
from fedps.algorithms.hetero_lr.metrics import write_plots
from fedps.algorithms.hetero_lr.model import PartyModel
from fedps.algorithms.hetero_lr.params import LRParams
from fedps.algorithms.hetero_lr.predict import predict
from fedps.errors import ConfigError

log = logging.getLogger(__name__)


def roles(me: str, role: str, peers: list[str], params: LRParams) -> tuple[str, list[str]]:
    """The guest's name and the host chain, from the settings or the party's role."""
    if params.guest:
        hosts = list(params.hosts) or sorted(p for p in [me, *peers] if p != params.guest)
        return params.guest, hosts
    if role == "guest":
        return me, list(params.hosts) or sorted(peers)
    if len(peers) == 1:
        return peers[0], [me]
    raise ConfigError("job.params.guest (and job.params.hosts) must name the parties when there are several hosts")


def run(context) -> None:
    raw = dict(context.config.job.params)
    psi_params = raw.pop("psi", None)
    params = LRParams.from_mapping(raw)
    if psi_params is not None:
        aligned = context.output_dir / str(psi_params.get("output", "psi"))
        resuming = JobCheckpoint(context.output_dir / "checkpoint").exists() and (aligned / "manifest.json").exists()
        # A resumed party trains on the PSI result it already has: its peers are past the PSI.
        params = dataclasses.replace(params, train=str(aligned if resuming else _run_psi(context, psi_params)))
    me = context.me
    guest, hosts = roles(me, context.role, sorted(context.channels), params)
    if set(context.channels) != {p for p in [guest, *hosts] if p != me}:
        raise ConfigError(f"[peers] must list exactly the other parties of the job: {guest}, {', '.join(hosts)}")
    if not params.train:
        raise ConfigError("job.params.train must name this party's data (PSI output or a file)")
    train_path = Path(params.train)
    if not train_path.is_absolute():
        train_path = Path(context.config.source).parent / train_path
    if params.mode == "predict":
        model_path = Path(params.model)
        if not model_path.is_absolute():
            model_path = Path(context.config.source).parent / model_path
        columns = params.feature_columns or tuple(_saved_features(model_path))
        data = load_party_data(train_path, params.id_column, None, columns)
        context.metrics["predict"] = predict(me, guest, hosts, context.channels, data, model_path,
                                             context.config.job.id, context.output_dir)
        return
    data = load_party_data(train_path, params.id_column, params.label_column if me == guest else None,
                           params.feature_columns)
    context.ray_address  # the PS runs on this party's Ray
    xt_d = None
    if params.spark_partitions:
        from fedps.algorithms.hetero_lr.protocol import X_FIXED
        from fedps.engine.crypto.spark import xt_d_on_spark

        spark = context.spark
        context.metrics["spark_master"] = spark.sparkContext.master
        xt_d = lambda x, d: xt_d_on_spark(spark, x, d, X_FIXED, params.spark_partitions)  # noqa: E731
    checkpoint = JobCheckpoint(context.output_dir / "checkpoint")
    job = context.config.job.id

    def make_model(features: int, intercept: bool, sparse: bool) -> PartyModel:
        return PartyModel(f"{job}-{me}", features, params, intercept, checkpoint.ps_dir, sparse=sparse)

    started = time.perf_counter()
    session = trainer.setup(me, guest, hosts, context.channels, data, params, job, checkpoint, make_model, xt_d)
    try:
        state = trainer.train(session, on_batch=_progress(me))
        _write_report(context, session, state, time.perf_counter() - started)
    finally:
        session.model.stop()


def _saved_features(model_path: Path) -> list[str]:
    try:
        return json.loads(model_path.read_text()).get("features") or []
    except FileNotFoundError:
        raise ConfigError(f"job.params.model {model_path} does not exist: train first") from None


def _run_psi(context, psi_params: dict) -> Path:
    """Align the rows with PSI first (``job.params.psi`` holds its settings); returns its output."""
    from fedps.algorithms import psi

    if not isinstance(psi_params, dict):
        raise ConfigError("job.params.psi must be a table of PSI settings")
    original = context.config
    job = dataclasses.replace(original.job, params=psi_params)
    context.config = dataclasses.replace(original, job=job)
    try:
        started = time.perf_counter()
        psi.run(context)
        context.metrics["psi_seconds"] = round(time.perf_counter() - started, 3)
    finally:
        context.config = original
    return context.output_dir / psi_params.get("output", "psi")


def _progress(me: str):
    last = [0.0]

    def report(state) -> None:
        now = time.monotonic()
        if now - last[0] > 5:
            log.info("%s: epoch %d, batch %d (step %d)", me, state.epoch + 1, state.batch, state.step)
            last[0] = now

    return report


def _write_report(context, session: trainer.Session, state, seconds: float) -> None:
    if session.data.sparse:
        keys, weights = session.model.dump()
        _, intercept = session.model.weights(keys[:0])
        model = {"party": context.me, "feature_ids": keys.tolist(), "weights": weights.tolist(),
                 "intercept": intercept if session.model.intercept else None}
    else:
        weights, intercept = session.model.weights()
        model = {"party": context.me, "features": session.data.feature_names,
                 "weights": weights.tolist(), "intercept": intercept if session.model.intercept else None}
    (context.output_dir / "model.json").write_text(json.dumps(model, indent=2))
    context.metrics.update({"epochs": state.epoch, "steps": state.step, "train_seconds": round(seconds, 3),
                            "converged": state.done,
                            "seconds_by_work": {k: round(v, 3) for k, v in session.party.timings.items()}})
    if context.me == session.party.guest:
        context.metrics.update({"loss": state.losses, "validation": state.metrics,
                                "final": state.metrics[-1] if state.metrics else {}})
        y, u = session.last_validation or (None, None)
        write_plots(context.output_dir, state.losses, y, u)
        final = context.metrics["final"]
        if final:
            log.info("validation AUC %.4f, KS %.4f, accuracy %.4f", final["auc"], final["ks"], final["accuracy"])
