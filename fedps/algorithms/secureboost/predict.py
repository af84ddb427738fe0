"""Federated prediction with a trained SecureBoost model, batched over the executors.

Each party lays out the rows to score (the same ids on every side). In one
stage, each host task evaluates every split of its table on its partition's
rows and sends the guest task of the partition one bit per (row, split)
(``PREDICT_BITS``, packed); the guest task routes every row through every
tree, using its own splits' rules and the hosts' bits at theirs, and writes
``predictions/part-<p>.parquet``. The guest learns, for these rows, the
outcome of each host split (not its feature or threshold); hosts learn
nothing. No driver holds the rows or the scores.
"""

from __future__ import annotations

import functools
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fedps.algorithms.secureboost import objective
from fedps.algorithms.secureboost.params import SBParams
from fedps.algorithms.secureboost.tree import go_left_raw
from fedps.engine.vertical.checkpoint import JobRecords
from fedps.engine.vertical.job import JobSpec, VerticalJob, resolve
from fedps.engine.vertical.stage import TaskEnv
from fedps.errors import ConfigError, DataError
from fedps.messaging.tags import Message, Scope

PREDICT_BITS = Message("predict_bits", "host", "guest", np.ndarray)   # rows x splits, packed per row


@dataclass(frozen=True)
class PredictPlan:
    job: str
    me: str
    guest: str
    hosts: tuple[str, ...]
    model: dict
    output: str


def load_model(path: Path) -> dict:
    try:
        model = json.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"job.params.model {path} does not exist: train first") from None
    except ValueError as exc:
        raise DataError(f"job.params.model {path} is not a model.json: {exc}") from None
    if model.get("algorithm") != "secureboost":
        raise DataError(f"job.params.model {path} is not a SecureBoost model")
    return model


def host_split_ids(model: dict, host: str) -> list[str]:
    """The ids of ``host``'s splits the guest's trees use, in the order the host sends their bits."""
    return sorted({spec["split"] for tree in model["trees"] for spec in tree["nodes"].values()
                   if spec.get("party") == host})


def margins_of(model: dict, x: np.ndarray, bits: dict[str, tuple[list[str], np.ndarray]]) -> np.ndarray:
    """The guest's routing of every row through every tree: margins (rows x classes)."""
    rows, classes = len(x), int(model["num_class"])
    margins = np.full((rows, classes), float(model["base_margin"]))
    columns = {host: {sid: j for j, sid in enumerate(ids)} for host, (ids, _) in bits.items()}
    for tree in model["trees"]:
        node = np.zeros(rows, dtype=np.int64)
        for n in sorted(int(k) for k in tree["nodes"]):
            spec = tree["nodes"][str(n)]
            at = node == n
            if "leaf" in spec:
                margins[at, tree["class"]] += spec["leaf"]
                continue
            if spec["party"] == model["party"]:
                left = go_left_raw(model["splits"][spec["split"]], x)
            else:
                left = bits[spec["party"]][1][:, columns[spec["party"]][spec["split"]]]
            node[at] = np.where(left[at], 2 * n + 1, 2 * n + 2)
    return margins


def predict_partition(env: TaskEnv, plan: PredictPlan) -> int:
    import pyarrow as pa
    import pyarrow.parquet as pq

    scope = Scope(plan.job, "predict")
    written = 0
    for p in env.partitions:
        rows = env.rows(p)
        tag = scope.tag(f"{PREDICT_BITS.name}_p{p}")
        if plan.me != plan.guest:
            ids = sorted(plan.model["splits"])
            bits = np.zeros((len(rows.row_keys), len(ids)), dtype=bool)
            for j, sid in enumerate(ids):
                bits[:, j] = go_left_raw(plan.model["splits"][sid], rows.x)
            env.links[plan.guest].send(p, tag, PREDICT_BITS.check(np.packbits(bits, axis=1)))
            continue
        bits = {}
        for host in plan.hosts:
            ids = host_split_ids(plan.model, host)
            packed = PREDICT_BITS.check(env.links[host].recv(p, tag))
            if packed.ndim != 2 or packed.shape[0] != len(rows.row_keys) or packed.shape[1] * 8 < len(ids):
                raise DataError(f"{host} sent direction bits of shape {packed.shape} for partition {p} "
                                f"({len(rows.row_keys)} rows, {len(ids)} splits): the layouts or models differ")
            # the host's table holds exactly the splits of the guest's trees, and both sort their ids alike
            bits[host] = (ids, np.unpackbits(packed, axis=1, count=len(ids)).astype(bool))
        margins = margins_of(plan.model, rows.x, bits)
        os.makedirs(plan.output, exist_ok=True)
        pq.write_table(pa.table(_columns(plan.model, rows.row_keys, margins)),
                       os.path.join(plan.output, f"part-{p:05d}.parquet"))
        written += len(margins)
    for link in env.links.values():
        link.flush()
    return written


def _columns(model: dict, keys: np.ndarray, margins: np.ndarray) -> dict[str, Any]:
    out: dict[str, Any] = {"row_key": keys}
    kind = model["objective"]
    if kind == "binary:logistic":
        out.update(score=margins[:, 0], probability=objective.sigmoid(margins[:, 0]))
    elif kind == "multi:softmax":
        p = objective.softmax(margins) if len(margins) else margins
        out["class"] = p.argmax(axis=1) if len(margins) else np.zeros(0, np.int64)
        for k in range(margins.shape[1]):
            out[f"probability_{k}"] = p[:, k]
    else:
        out["value"] = margins[:, 0]
    return out


def predict(context: Any, params: SBParams, guest: str, hosts: list[str]) -> dict:
    """Run this party's side of a joint prediction; returns a summary for ``metrics.json``."""
    from fedps.engine.layout import build_layout

    me = context.me
    saved = load_model(Path(resolve(params.model, context.config.source)))
    layout = build_layout(context.spark, resolve(params.train, context.config.source),
                          folder=str(context.output_dir / "predict_layout"), partitions=params.partitions,
                          id_column=params.id_column, label_column=None,
                          feature_columns=tuple(saved["features"]), missing_ok=True)
    context.ray_address  # noqa: B018 - the accumulator runs on this party's Ray
    records = JobRecords(context.output_dir / "checkpoint", context.config.job.id)
    spec = JobSpec(algorithm="secureboost.predict", key_bits=0, shared={"partitions": params.partitions},
                   max_tasks=params.tasks, namespace=context.config.ray.namespace)
    job = VerticalJob.open(job=context.config.job.id, me=me, guest=guest, hosts=hosts, channels=context.channels,
                           spark=context.spark, layout=layout, records=records, spec=spec)
    try:
        output = context.output_dir / "predictions"
        plan = PredictPlan(context.config.job.id, me, guest, tuple(hosts), saved, str(output))
        written = sum(job.stage(functools.partial(predict_partition, plan=plan), "predict").join())
    finally:
        job.stop()
    return {"rows": layout.rows, "written": written if me == guest else 0,
            "output": str(output) if me == guest else None}
