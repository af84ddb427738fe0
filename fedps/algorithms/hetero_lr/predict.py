"""Joint prediction with a trained model, on the executor runtime.

Each party lays out the rows to score (the same ids on every side, as for
training), and scores its own partitions with its own part of the model in
its executor tasks; each host task sends its scores ``u_hk`` for partition
``p`` to the guest's task ``p``, which writes the joint log-odds and the
probability of its rows to ``predictions/part-<p>.parquet``. The guest
learns the hosts' scores on these rows, which is the point of the job; hosts
learn nothing. No driver holds the rows or the scores. A party whose model
carries a row ``transform`` (its standardisation and row clip from training)
applies it to its rows first.
"""

from __future__ import annotations

import functools
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fedps.algorithms.hetero_lr.params import LRParams
from fedps.algorithms.hetero_lr.protocol import Port, Roles
from fedps.algorithms.hetero_lr.trainer import _OnPartition
from fedps.engine.vertical.checkpoint import JobRecords
from fedps.engine.vertical.job import JobSpec, VerticalJob, resolve
from fedps.engine.vertical.scores import sigmoid
from fedps.engine.vertical.stage import TaskEnv
from fedps.engine.vertical.standardize import RowTransform
from fedps.errors import ConfigError, DataError
from fedps.messaging.tags import Message, Scope

SCORES = Message("predict_u", "host", "guest", np.ndarray)


@dataclass(frozen=True)
class PredictPlan:
    job: str
    roles: Roles
    weights: tuple[float, ...] | dict[int, float]
    intercept: float
    sparse: bool
    output: str
    transform: RowTransform | None = None


def _load_model(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"job.params.model {path} does not exist: train first") from None
    except ValueError as exc:
        raise DataError(f"job.params.model {path} is not a model.json: {exc}") from None


def score_partition(env: TaskEnv, plan: PredictPlan) -> int:
    """Score this task's partitions; the guest's tasks write the predictions."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    scope = Scope(plan.job, "predict")
    written = 0
    for p in env.partitions:
        rows = env.rows(p)
        if plan.sparse:
            w = np.array([plan.weights.get(int(k), 0.0) for k in rows.feature_keys])
        else:
            w = np.asarray(plan.weights)
        x = plan.transform.apply(rows.x) if plan.transform is not None and len(rows.row_keys) else rows.x
        u = np.asarray(x @ w).ravel() + plan.intercept if len(rows.row_keys) else np.zeros(0)
        port = Port({peer: _OnPartition(link, p) for peer, link in env.links.items()}, scope, p)
        if not plan.roles.is_guest:
            port.send(plan.roles.guest, SCORES, u)
            continue
        for host in plan.roles.hosts:
            theirs = np.asarray(port.recv(host, SCORES), dtype=np.float64)
            if theirs.shape != u.shape:
                raise DataError(f"{host} scored {len(theirs)} rows of partition {p}, the guest {len(u)}")
            u = u + theirs
        os.makedirs(plan.output, exist_ok=True)
        table = pa.table({"row_key": rows.row_keys, "score": u, "probability": sigmoid(u)})
        pq.write_table(table, os.path.join(plan.output, f"part-{p:05d}.parquet"))
        written += len(u)
    for link in env.links.values():
        link.flush()
    return written


def predict(context: Any, params: LRParams, guest: str, hosts: list[str]) -> dict:
    """Run this party's side of a joint prediction; returns a summary for ``metrics.json``."""
    me = context.me
    from fedps.engine.layout import build_layout

    saved = _load_model(Path(resolve(params.model, context.config.source)))
    sparse = "feature_ids" in saved
    columns = params.feature_columns or tuple(saved.get("features") or ())
    layout = build_layout(context.spark, resolve(params.train, context.config.source),
                          folder=str(context.output_dir / "predict_layout"), partitions=params.partitions,
                          id_column=params.id_column, label_column=None, feature_columns=columns)
    if not sparse and list(layout.feature_names) != list(saved.get("features") or []):
        raise DataError(f"the model was trained on features {saved.get('features')} but the data has "
                        f"{list(layout.feature_names)}")
    weights: Any = (dict(zip(saved["feature_ids"], saved["weights"])) if sparse
                    else tuple(saved["weights"]))
    context.ray_address  # noqa: B018 - the accumulator runs on this party's Ray
    records = JobRecords(context.output_dir / "checkpoint", context.config.job.id)
    spec = JobSpec(algorithm="hetero_lr.predict", key_bits=0, shared={"partitions": params.partitions},
                   namespace=context.config.ray.namespace)
    job = VerticalJob.open(job=context.config.job.id, me=me, guest=guest, hosts=hosts, channels=context.channels,
                           spark=context.spark, layout=layout, records=records, spec=spec)
    try:
        output = context.output_dir / "predictions"
        transform = RowTransform.from_json(saved["transform"]) if saved.get("transform") else None
        plan = PredictPlan(context.config.job.id, Roles(me, guest, hosts), weights,
                           float(saved.get("intercept") or 0.0), sparse, str(output), transform)
        written = sum(job.stage(functools.partial(score_partition, plan=plan), "predict").join())
    finally:
        job.stop()
    summary = {"rows": layout.rows}
    if me == guest:
        summary.update(predictions=str(output), written=written)
    return summary
