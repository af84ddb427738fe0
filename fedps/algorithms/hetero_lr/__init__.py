"""Vertical logistic regression: ``job.algorithm = "hetero_lr"``.

``run(context)`` trains this party's part of the model with its peers on the
executor runtime (rows laid out in ``job.params.partitions`` partitions, per-row
work in Spark tasks, the driver on whole-batch sums only), or resumes the job
from the party's last checkpoint, and writes the party's report into its
output folder: ``model.json`` (its own weights only), ``metrics.json``, and
on the guest ``loss.png`` and ``roc.png``.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import time
from pathlib import Path
from typing import Any

from fedps.algorithms.hetero_lr import model
from fedps.algorithms.hetero_lr.params import LRParams
from fedps.algorithms.hetero_lr.protocol import Crypto, Roles
from fedps.algorithms.hetero_lr.setup import noise_seed, privacy_report, resolved, restored_state, transform_json
from fedps.algorithms.hetero_lr.trainer import Plan, Trainer, prepare
from fedps.engine.vertical.checkpoint import JobRecords
from fedps.engine.vertical.job import JobSpec, VerticalJob, resolve
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


#: Settings given once for the whole job: PSI and training both use them (``job.params.psi`` may
#: give them instead, or repeat them with the same value).
SHARED_WITH_PSI = ("id_column",)


def split_settings(params: dict, source: str = "<memory>") -> tuple[dict, dict | None]:
    """``job.params`` as (training settings, PSI settings or None), with the shared ones in both."""
    raw = dict(params)
    psi_raw = raw.pop("psi", None)
    if psi_raw is None:
        return raw, None
    if not isinstance(psi_raw, dict):
        raise ConfigError(f"job.params.psi in {source} must be a table of PSI settings")
    psi_raw = dict(psi_raw)
    for key in SHARED_WITH_PSI:
        if key in raw and key in psi_raw and raw[key] != psi_raw[key]:
            raise ConfigError(f"job.params.{key} = {raw[key]!r} but job.params.psi.{key} = {psi_raw[key]!r} "
                              f"in {source}: PSI and training read the same column; give it once")
        if key in raw:
            psi_raw.setdefault(key, raw[key])
        elif key in psi_raw:
            raw[key] = psi_raw[key]
    return raw, psi_raw


def preflight(config, output_dir: Path) -> list:
    """Every check of this party's job that needs no peer: settings, output folder, inputs.

    Returns the input checks for the runner's one pass over the data: the PSI
    input (when ``job.params.psi`` is set) or ``job.params.train``, with the
    label rule (binary 0/1) on the guest.
    """
    from fedps.algorithms.psi.preflight import check_protocol, psi_settings
    from fedps.engine.preflight import InputCheck, LabelRule, check_keys, with_public

    source = config.source
    check_keys(config.job.params, [f.name for f in dataclasses.fields(LRParams)] + ["psi"], "job.params", source)
    raw, psi_raw = split_settings(config.job.params, source)
    psi = psi_settings(config, psi_raw, "job.params.psi") if psi_raw is not None else None
    if psi is not None:
        check_protocol(psi, "job.params.psi")
    try:
        params = LRParams.from_mapping(raw)
    except ConfigError as exc:
        raise with_public(ConfigError(f"{exc} (in {source})"), str(exc)) from None
    JobRecords(Path(output_dir) / "checkpoint", config.job.id).check_owner()
    guest, _ = roles(config.party.name, config.party.role, sorted(config.peers), params)
    label = params.label_column if guest == config.party.name and params.mode == "train" else None
    rule = LabelRule.binary("vertical logistic regression") if label else None
    features = params.feature_columns
    if params.mode == "predict":
        model_file = resolve(params.model, source)
        if "://" not in model_file and not Path(model_file).exists():
            raise with_public(ConfigError(f"job.params.model {model_file} does not exist (in {source})"),
                              "the model named by job.params.model does not exist")
        if "://" not in model_file:   # the data must hold the model's features
            try:
                features = features or tuple(json.loads(Path(model_file).read_text()).get("features") or ())
            except (ValueError, AttributeError):
                raise with_public(ConfigError(f"job.params.model {model_file} is not a model.json"),
                                  "job.params.model is not a model.json") from None
    enough = {}
    if params.mode == "train" and params.batch_size > 0:
        enough = {"min_rows": math.ceil(params.batch_size / (1 - params.validation_fraction)),
                  "min_rows_reason": f"one batch of job.params.batch_size = {params.batch_size} rows after "
                                     f"the validation split (job.params.validation_fraction = "
                                     f"{params.validation_fraction:g})"}
    if psi is not None:
        return [InputCheck("the PSI input", psi.input, "job.params.psi.input", id_column=psi.id_column,
                           id_setting=_id_setting(config.job.params), format=psi.format, label_column=label,
                           label=rule, feature_columns=features, **enough)]
    if not params.train:
        raise with_public(ConfigError(f"job.params.train must name this party's data (PSI output or a file), "
                                      f"or job.params.psi its PSI settings (in {source})"),
                          "job.params.train is not set")
    return [InputCheck("the training data", resolve(params.train, source), "job.params.train",
                       id_column=params.id_column, label_column=label, label=rule,
                       feature_columns=features, **enough)]


def _id_setting(params) -> str:
    return "job.params.psi.id_column" if "id_column" in params.get("psi", {}) else "job.params.id_column"


def run(context) -> None:
    raw, psi_params = split_settings(context.config.job.params, context.config.source)
    params = LRParams.from_mapping(raw)
    records = JobRecords(context.output_dir / "checkpoint", context.config.job.id)
    records.check_owner()   # before any work: an output folder belongs to one job
    if psi_params is not None:
        aligned = _psi_output(context, psi_params)
        resuming = records.exists() and aligned.exists("manifest.json")
        # A resumed party trains on the PSI result it already has: its peers are past the PSI.
        params = dataclasses.replace(params, train=str(aligned if resuming else _run_psi(context, psi_params)))
    me = context.me
    guest, hosts = roles(me, context.role, sorted(context.channels), params)
    if set(context.channels) != {p for p in [guest, *hosts] if p != me}:
        raise ConfigError(f"[peers] must list exactly the other parties of the job: {guest}, {', '.join(hosts)}")
    if not params.train:
        raise ConfigError("job.params.train must name this party's data (PSI output or a file)")
    if params.mode == "predict":
        from fedps.algorithms.hetero_lr.predict import predict

        context.metrics["predict"] = predict(context, params, guest, hosts)
        return
    from fedps.engine.layout import build_layout

    source = resolve(params.train, context.config.source)
    started = time.perf_counter()
    layout = build_layout(context.spark, source, folder=str(context.output_dir / "layout"),
                          partitions=params.partitions, id_column=params.id_column,
                          label_column=params.label_column if me == guest else None,
                          feature_columns=params.feature_columns)
    context.metrics["layout_seconds"] = round(time.perf_counter() - started, 3)
    context.metrics["spark_master"] = context.spark.sparkContext.master
    context.ray_address  # noqa: B018 - the PS and the accumulator run on this party's Ray
    job = open_job(context, params, layout, records, guest, hosts)
    try:
        trainer = make_trainer(job, params)
        started = time.perf_counter()
        trainer.run(on_batch=_progress(me))
        _write_report(context, trainer, time.perf_counter() - started)
    finally:
        job.stop()


def open_job(context, params: LRParams, layout: Any, records: JobRecords, guest: str,
             hosts: list[str]) -> VerticalJob:
    """Set up (or restore) this party's side of the job on the vertical skeleton."""
    me = context.me
    params = resolved(params, layout.rows)   # the LR schedule's epoch length, from the rows
    _check_layout_fits(params, layout)
    intercept = me == guest and params.fit_intercept
    features = 0 if layout.sparse else len(layout.feature_names)
    ps_settings = context.config.ps
    spec = JobSpec(
        algorithm="hetero_lr", key_bits=params.key_bits, shared=params.shared(),
        announce={"features": features, "sparse": layout.sparse},
        tables=model.tables(params, features, intercept, layout.sparse),
        ps_shards=ps_settings.shards_for(features, layout.sparse), ps_wait_s=ps_settings.wait_timeout_s,
        max_tasks=params.tasks, namespace=context.config.ray.namespace)
    job = VerticalJob.open(job=context.config.job.id, me=me, guest=guest, hosts=hosts,
                           channels=context.channels, spark=context.spark, layout=layout, records=records,
                           spec=spec)
    try:
        _check_privacy(params, job, features)
    except BaseException:
        job.stop()
        raise
    return job


def make_trainer(job: VerticalJob, params: LRParams) -> Trainer:
    roles_ = Roles(job.me, job.guest, list(job.hosts))
    crypto = Crypto(job.private_key, job.public_keys, job.me, params.frac_bits)
    intercept = job.is_guest and params.fit_intercept
    features = 0 if job.layout.sparse else len(job.layout.feature_names)
    plan = Plan(job=job.job, roles=roles_, params=params,
                public={name: int(key.n) for name, key in job.public_keys.items()},
                own=(int(job.private_key.p), int(job.private_key.q)),
                noise_seed=noise_seed(job.secret) if job.is_guest else 0,
                w=job.ps.ref("w"), bias=job.ps.ref("bias") if intercept else None,
                features=features, sparse=job.layout.sparse)
    params, plan = prepare(job, params, plan)   # batch size, row transform, label-DP noise
    state = restored_state(job.restored)
    trainer = Trainer(job, params, roles_, plan, crypto, state)
    if job.restored is None and params.checkpoint_every:
        trainer.save()
    return trainer


def _check_layout_fits(params: LRParams, layout: Any) -> None:
    if layout.rows * (1 - params.validation_fraction) < params.batch_size:
        raise ConfigError(f"only {layout.rows} aligned rows: too few for one batch of {params.batch_size} "
                          f"(job.params.batch_size) after the validation split")


def _check_privacy(params: LRParams, job: VerticalJob, features: int) -> None:
    import math

    counts = {job.me: features, **{peer: int(info.get("features", 0)) for peer, info in job.peers.items()}}
    widest = max(counts.values())
    needed = math.ceil(params.min_batch_ratio * widest)
    if params.batch_size and params.batch_size < needed:   # 0: automatic, at least the floor
        raise ConfigError(f"job.params.batch_size = {params.batch_size} is below the privacy floor of "
                          f"{needed} rows (min_batch_ratio {params.min_batch_ratio} x {widest} features): "
                          "a smaller batch lets a party solve its gradient for the other side's data")
    sparse = job.layout.sparse or any(info.get("sparse") for info in job.peers.values())
    if sparse and params.d_noise == 0 and not params.label_dp:
        raise ConfigError("a party has sparse features: a feature seen in one row of a batch reveals that "
                          "row's d to it, so set job.params.d_noise (for example 0.01) to blur it")


def _psi_output(context, psi_params: dict) -> Any:
    """Where the inline PSI writes its result: PSI's own rule (relative to output_dir, or absolute, or a URI)."""
    from fedps.algorithms.psi.storage import Folder, is_uri

    output = str(psi_params.get("output", "psi"))
    return Folder.at(output if is_uri(output) or Path(output).is_absolute() else context.output_dir / output)


def _run_psi(context, psi_params: dict) -> str:
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
    return str(_psi_output(context, psi_params))


def _progress(me: str):
    last = [0.0]

    def report(state) -> None:
        now = time.monotonic()
        if now - last[0] > 5:
            log.info("%s: epoch %d, batch %d (step %d)", me, state.epoch + 1, state.batch, state.step)
            last[0] = now

    return report


def model_json(trainer: Trainer) -> dict:
    job, plan = trainer.job, trainer.plan
    intercept = plan.bias is not None
    if plan.sparse:
        keys, weights, b = model.dump(job.ps, intercept)
        return {"party": job.me, "feature_ids": keys.tolist(), "weights": weights.tolist(),
                "intercept": b if intercept else None}
    weights, b = model.weights(job.ps, plan.features, intercept)
    return {"party": job.me, "features": list(job.layout.feature_names), "weights": weights.tolist(),
            "intercept": b if intercept else None, **transform_json(trainer)}


def _write_report(context, trainer: Trainer, seconds: float) -> None:
    from fedps.algorithms.hetero_lr.metrics import write_plots

    state = trainer.state
    (context.output_dir / "model.json").write_text(json.dumps(model_json(trainer), indent=2))
    context.metrics.update({
        "epochs": state.epoch, "steps": state.step, "train_seconds": round(seconds, 3),
        "converged": state.done, "partitions": trainer.job.partitions,
        "tasks": trainer.job.stage_spec.tasks,
        "seconds_by_work": {k: round(v, 3) for k, v in trainer.crypto.timings.items()},
        "task_seconds_by_work": {k: round(v, 3) for k, v in trainer.task_seconds.items()},
        "refused_partition_records": trainer.refused,
        "stopped": state.stopped, "batch_size": trainer.params.batch_size, "label_dp": privacy_report(trainer)})
    if trainer.roles.is_guest:
        context.metrics.update({"loss": state.losses, "validation": state.metrics,
                                "final": state.metrics[-1] if state.metrics else {}})
        write_plots(context.output_dir, state.losses, trainer.summary)
        final = context.metrics["final"]
        if final.get("auc") is not None:
            log.info("validation AUC %.4f, KS %.4f, accuracy %.4f", final["auc"], final.get("ks", float("nan")),
                     final.get("accuracy", float("nan")))
        elif not final:
            log.info("no validation rows (job.params.validation_fraction = %g): no validation metrics",
                     trainer.params.validation_fraction)


__all__ = ["run", "roles", "open_job", "make_trainer"]


def agreed_settings(config) -> dict[str, Any]:
    """The settings every party must share, compared before any data work (fedps.engine.agreement)."""
    raw, psi_raw = split_settings(config.job.params, config.source)
    settings = LRParams.from_mapping(raw).shared()
    settings["parties"] = sorted([config.party.name, *config.peers])   # every party talks to every other
    if psi_raw is not None:
        from fedps.algorithms.psi.preflight import psi_settings

        settings.update({f"psi.{key}": value
                         for key, value in psi_settings(config, psi_raw, "job.params.psi").agreed_view().items()})
    return settings
