"""SecureBoost: vertical gradient-boosted trees (guest holds labels, hosts hold features).

``job.algorithm = "secureboost"``. ``run(context)`` lays out this party's rows,
bins its features on its executors, and grows the trees with its peers on
the executor runtime (per-row work in Spark tasks; drivers on whole-node sums),
checkpointing after every tree; a restarted party resumes at its last tree.
The report in the output folder: ``model.json`` (the guest's trees with
host/id placeholders and its own split table; a host's split table only),
``metrics.json``, ``importance.png`` (this party's own features) and, on the
guest, ``loss.png`` and ``roc.png``. ``mode = "predict"`` scores new aligned
rows with a trained model (:mod:`.predict`).

A split table (``model.json["splits"]``) maps a split id ``"<round>.<node key>"``
to ``{"feature": name, "index": column of this party's features, "bin": b,
"threshold": t, "default_left": bool}``: a present value goes left when
``value <= t`` (``t`` null: every present value goes left), a missing one
(NaN) goes left when ``default_left``. A split on a column declared in
``job.params.categorical`` adds ``"categorical": true`` and ``"category": c``
and has ``"threshold": null``: a present value goes left when ``value == c``
(any other value, including one never seen in training, goes right). Tables
without categorical splits are unchanged. See :func:`.tree.go_left_raw`.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from pathlib import Path
from typing import Any

import numpy as np

from fedps.algorithms.secureboost.params import SBParams
from fedps.engine.vertical.checkpoint import JobRecords
from fedps.engine.vertical.job import JobSpec, VerticalJob, resolve
from fedps.errors import ConfigError, DataError

log = logging.getLogger(__name__)


def roles(me: str, role: str, peers: list[str], params: SBParams) -> tuple[str, list[str]]:
    if params.guest:
        return params.guest, list(params.hosts) or sorted(p for p in [me, *peers] if p != params.guest)
    if role == "guest":
        return me, list(params.hosts) or sorted(peers)
    if len(peers) == 1:
        return peers[0], [me]
    raise ConfigError("job.params.guest (and job.params.hosts) must name the parties when there are several hosts")


def preflight(config, output_dir: Path) -> None:
    """Checks that need no peer, before the channels open: settings and the output folder."""
    SBParams.from_mapping(dict(config.job.params))
    JobRecords(Path(output_dir) / "checkpoint", config.job.id).check_owner()


def run(context) -> None:
    params = SBParams.from_mapping(dict(context.config.job.params))
    records = JobRecords(context.output_dir / "checkpoint", context.config.job.id)
    records.check_owner()
    me = context.me
    guest, hosts = roles(me, context.role, sorted(context.channels), params)
    if set(context.channels) != {p for p in [guest, *hosts] if p != me}:
        raise ConfigError(f"[peers] must list exactly the other parties of the job: {guest}, {', '.join(hosts)}")
    if not params.train:
        raise ConfigError("job.params.train must name this party's data (PSI output or a file)")
    if params.mode == "predict":
        from fedps.algorithms.secureboost.predict import predict

        context.metrics["predict"] = predict(context, params, guest, hosts)
        return
    from fedps.engine.layout import build_layout

    started = time.perf_counter()
    layout = build_layout(context.spark, resolve(params.train, context.config.source),
                          folder=str(context.output_dir / "layout"), partitions=params.partitions,
                          id_column=params.id_column, label_column=params.label_column if me == guest else None,
                          feature_columns=params.feature_columns, missing_ok=True,
                          labels="binary" if params.objective == "binary:logistic" else "number")
    context.metrics["layout_seconds"] = round(time.perf_counter() - started, 3)
    context.ray_address  # noqa: B018 - the accumulator runs on this party's Ray
    trainer = open_trainer(context, params, layout, records, guest, hosts)
    try:
        started = time.perf_counter()
        trainer.run()
        write_report(context.output_dir, trainer, context.metrics, time.perf_counter() - started)
    finally:
        trainer.job.stop()


def _inspect(spark, layout, params: SBParams, is_guest: bool, name: str):
    """Bins (and on the guest the label range) before anything is announced; a problem is announced."""
    from fedps.algorithms.secureboost import objective
    from fedps.algorithms.secureboost.binning import compute_bins

    try:
        bins = compute_bins(spark, layout, params.max_bin, name, categorical=params.categorical)
        labels = _labels(spark, layout) if is_guest else None
        if labels is not None:
            objective.check_labels(params.objective, labels["values"], params.classes)
        return bins, labels, ""
    except (DataError, ConfigError) as exc:
        return None, None, exc


def _labels(spark, layout) -> dict[str, Any]:
    from fedps.engine.layout import read_partition

    def one(p: int):
        y = read_partition(layout, p).y
        return np.unique(y)[:1000], float(y.min()) if len(y) else 0.0, float(y.max()) if len(y) else 0.0

    parts = spark.sparkContext.parallelize(range(layout.partitions), layout.partitions).map(one).collect()
    return {"values": np.unique(np.concatenate([p[0] for p in parts])),
            "min": min(p[1] for p in parts), "max": max(p[2] for p in parts)}


def open_trainer(context, params: SBParams, layout, records: JobRecords, guest: str, hosts: list[str]):
    """Bin, set up (or restore) this party's side on the vertical skeleton, and make its trainer."""
    from fedps.algorithms.secureboost import objective
    from fedps.algorithms.secureboost.tasks import Plan
    from fedps.algorithms.secureboost.trainer import TrainState, Trainer
    from fedps.algorithms.secureboost.tree import SplitTable

    me = context.me
    is_guest = me == guest
    bins, labels, problem = _inspect(context.spark, layout, params, is_guest, me)
    # a peer learns only that this party cannot train, not which of its features is at fault
    public_problem = f"{me} cannot train on its data ({type(problem).__name__}; its own log says why)" \
        if problem else ""
    # hosts make a key pair too, unused but for its setup record: their secret (bin shuffles) and a restart
    # during setup replays it like any vertical job's
    spec = JobSpec(algorithm="secureboost", key_bits=params.key_bits,
                   shared=params.shared(), announce={"features": len(layout.feature_names), "problem": public_problem},
                   max_tasks=params.tasks, namespace=context.config.ray.namespace)
    job = VerticalJob.open(job=context.config.job.id, me=me, guest=guest, hosts=hosts, channels=context.channels,
                           spark=context.spark, layout=layout, records=records, spec=spec)
    try:
        if problem:
            raise problem
        for peer, info in sorted(job.peers.items()):
            if info.get("problem"):
                raise DataError(f"{peer} stopped the job before training: {info['problem']}")
        base = objective.base_margin(params.objective, np.array([]), params.classes)
        g_bound = 1.0
        if is_guest and params.objective == "reg:squarederror":
            base = labels_mean(context.spark, layout, params)
            g_bound = 4.0 * max(abs(labels["max"] - base), abs(labels["min"] - base)) + 1.0
        guest_n = int(job.public_keys[guest].n)
        own = (int(job.private_key.p), int(job.private_key.q)) if is_guest else None
        plan = Plan(job=job.job, me=me, guest=guest, hosts=tuple(hosts), params=params, guest_n=guest_n, own=own,
                    bins=bins, rows_max=max(layout.rows, 1), g_bound=g_bound, h_bound=1.0, base=base,
                    margins_dir=str(records.folder / "margins"))
        state = TrainState()
        if job.restored is not None:
            known = {f.name for f in dataclasses.fields(TrainState)}
            state = TrainState(**{k: v for k, v in job.restored["state"].items() if k in known})
        table = SplitTable(bins, me, dict(state.splits))
        return Trainer(job, params, plan, table, state, secret=job.secret)
    except BaseException:
        job.stop()
        raise


def labels_mean(spark, layout, params: SBParams) -> float:
    """Mean label of the training rows (the base margin of a regression), summed by the tasks."""
    from fedps.algorithms.secureboost.reference import training_rows
    from fedps.engine.layout import read_partition

    def one(p: int):
        rows = read_partition(layout, p)
        train = training_rows(rows.row_keys, params)
        return float(np.sum(rows.y[train])), int(train.sum())

    parts = spark.sparkContext.parallelize(range(layout.partitions), layout.partitions).map(one).collect()
    return sum(p[0] for p in parts) / max(sum(p[1] for p in parts), 1)


def model_json(trainer) -> dict[str, Any]:
    job, params, s = trainer.job, trainer.params, trainer.state
    out: dict[str, Any] = {"party": job.me, "algorithm": "secureboost", "features": list(trainer.plan.bins.names),
                           "splits": trainer.table.to_json()}
    if job.is_guest:
        out.update({"objective": params.objective, "num_class": params.classes, "base_margin": trainer.plan.base,
                    "learning_rate": params.learning_rate, "hosts": list(job.hosts), "trees": s.trees})
    return out


def importance(trainer) -> dict[str, dict[str, float]]:
    """Per own feature: split count and (on the guest, which knows the gains) total gain; per host on the guest."""
    out: dict[str, dict[str, float]] = {}
    gains = {}
    for tree in trainer.state.trees:
        for spec in tree["nodes"].values():
            if "split" in spec:
                gains[(spec["party"], spec["split"])] = spec["gain"]
    for sid, spec in trainer.table.splits.items():
        entry = out.setdefault(spec["feature"], {"splits": 0, "gain": 0.0})
        entry["splits"] += 1
        entry["gain"] += gains.get((trainer.job.me, sid), 0.0)
    if trainer.job.is_guest:
        for (party, _), gain in gains.items():
            if party != trainer.job.me:
                entry = out.setdefault(f"[{party}]", {"splits": 0, "gain": 0.0})
                entry["splits"] += 1
                entry["gain"] += gain
    if not trainer.job.is_guest:
        for entry in out.values():
            entry.pop("gain")
    return out


def write_report(folder: Path, trainer, metrics: dict, seconds: float) -> None:
    from fedps.algorithms.secureboost.plots import write_plots

    s = trainer.state
    (folder / "model.json").write_text(json.dumps(model_json(trainer), indent=1))
    metrics.update({"trees": s.tree, "train_seconds": round(seconds, 3), "early_stopped": s.done,
                    "partitions": trainer.job.partitions, "tasks": trainer.job.stage_spec.tasks,
                    "importance": importance(trainer)})
    if trainer.job.is_guest:
        metrics.update({"rounds": s.metrics, "final": s.metrics[-1] if s.metrics else {},
                        "best_round": s.best + 1 if s.best >= 0 else None})
    write_plots(folder, s.metrics, trainer.summary, metrics["importance"])


__all__ = ["run", "preflight", "roles", "open_trainer", "model_json", "write_report"]


def agreed_settings(config) -> dict:
    """The settings every party must share, compared before any data work (fedps.engine.agreement)."""
    settings = SBParams.from_mapping(dict(config.job.params)).shared()
    settings["parties"] = sorted([config.party.name, *config.peers])   # every party talks to every other
    return settings
