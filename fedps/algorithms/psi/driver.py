"""One party's PSI from its driver: the steps of :mod:`fedps.algorithms.psi`, and their resume.

The driver handles settings, counts, keys and the manifest; blinded values
go between the processes serving the buckets (:mod:`~fedps.algorithms.psi.tasks`).

The ids are staged with their rows, a folder per bucket, and once every
bucket is matched the output is written a bucket at a time where the rows
are (:mod:`~fedps.algorithms.psi.output`): no step gathers, joins or sorts
the party's rows as a whole.

Resume: once the ids are staged and the protocol's secret is chosen (and, for
RSA, the public key exchanged), the party writes ``state.json`` (mode 0600)
in its work folder: the agreed keys, its secret or RSA key, the peer's role.
A party restarted with the same command and its channel state finds it,
skips the exchanges already done, keeps the buckets already done
(``done/``), serves the others again and writes the output again. Before that point a restarted
party cannot resume (it would need messages it has consumed), and says so.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import resource
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa

from fedps.algorithms.psi import buckets, ids, incremental, output, params as params_module
from fedps.algorithms.psi.storage import Folder, is_uri
from fedps.algorithms.psi.stream import IDS, MATCHED
from fedps.algorithms.psi.tasks import BucketPlan, serve_watched
from fedps.errors import ConfigError, DataError, PeerError
from fedps.messaging.tags import Message, Scope

log = logging.getLogger(__name__)

SETTINGS = Message("settings", "either", "other", dict)
ID_TYPE = Message("id_type", "either", "other", dict)
STATE = "state.json"
STATE_VERSION = 2   # 2: rows staged by ranges of psi_hash, a private order key ("shuffle")
LINK_LABEL = "psi"


@dataclass
class PsiRun:
    """One party's side of a PSI run: what the protocol's driver steps need."""

    channel: Any
    scope: Scope
    params: params_module.PsiParams
    role: str
    peer: str
    peer_role: str
    wait_s: float
    timings: dict[str, float] = field(default_factory=dict)
    #: Incremental PSI: this party's persistent key for the peer (``incremental.agree``), or None.
    persistent: dict[str, Any] | None = None

    def step(self, name: str, started: float) -> None:
        self.timings[name] = round(time.perf_counter() - started, 3)
        log.info("psi/%s %s: %s took %.2fs", self.params.protocol, self.role, name, self.timings[name])


def output_folder(context: Any, params: params_module.PsiParams) -> Folder:
    if is_uri(params.output) or os.path.isabs(params.output):
        return Folder.at(params.output)
    return Folder.at(context.output_dir / params.output)


def work_folder(out: Folder, params: params_module.PsiParams) -> Folder:
    return Folder.at(params.work) if params.work else out.child("_work")


def load_state(work: Folder, job: str) -> dict[str, Any] | None:
    """The resume state of this job in ``work``, or None."""
    try:
        state = work.read_json(STATE)
    except DataError:
        return None
    if not state or state.get("version") != STATE_VERSION or state.get("job") != job:
        return None
    return state


def protocol_module(name: str) -> Any:
    if name == "ecdh":
        from fedps.algorithms.psi import ecdh as module
    elif name == "ot":   # optional extra (docs/operations.md, "OT PSI"): imports its library lazily
        from fedps.algorithms.psi import ot as module
    else:
        from fedps.algorithms.psi import rsa as module
    return module


def run_psi(context: Any, params: params_module.PsiParams, channel: Any, scope: Any, peer: str,
            out: Folder, work: Folder, saved: dict[str, Any] | None) -> None:
    timings: dict[str, float] = {}
    started = time.perf_counter()
    job = context.config.job.id
    if saved is None:
        work.remove()
        peer_role = _exchange_settings(context, params, channel, scope, peer)          # 1
        if params.dry_run:   # what every run pays before computing anything (bench/psi.py --small)
            context.spark.sparkContext.defaultParallelism
            context.metrics.update({"psi_dry_run": True, "psi_learned": False})
            return
        table = _load_and_compare(context.spark, params, channel, scope, peer)        # 2
        keys = buckets.agree_keys(channel, scope, context.me, peer)                   # 3
        keys, persistent = incremental.agree(channel, scope, params, context.me, peer, keys)
    else:
        peer_role = str(saved["peer_role"])
        persistent = None   # the resume state holds the protocol's secret (and its cache)
        table = ids.load_ids(context.spark, params)
        keys = buckets.PsiKeys(bytes.fromhex(saved["keys"]["bucket"]), bytes.fromhex(saved["keys"]["order"]))
        log.info("psi: %s resumes job %s from %s", context.me, job, work)
    timings["read_s"] = round(time.perf_counter() - started, 3)
    local = table.report["ids"] < params.local_below
    run = PsiRun(channel, scope.sub(params.protocol), params, context.role, peer, peer_role,
                 float(params.wait_s), timings, persistent=persistent)
    protocol = protocol_module(params.protocol)
    if saved is None:
        tick = time.perf_counter()                                                    # 4
        if local:
            _stage_local(table.frame.toArrow(), keys.order, params.buckets, work.child(IDS))
        else:
            _stage_spark(table.frame, keys.order, params.buckets, work.child(IDS))
        if not table.report["ids"]:   # nothing staged: keep the rows' columns for the output's empty file
            _stage_schema(table.frame, work.child(IDS))
        run.step("0_stage_ids", tick)
        state = {"version": STATE_VERSION, "job": job, "peer_role": peer_role,
                 "keys": {"bucket": keys.bucket.hex(), "order": keys.order.hex()},
                 "shuffle": os.urandom(32).hex(),   # the private order of this party's streams
                 "protocol": protocol.setup(run, None)}
        work.write_json(STATE, state, private=True)
    else:
        state = saved

    tick = time.perf_counter()                                                        # 5
    plan = dataclasses.replace(_plan(channel, run, work, params), shuffle_key=bytes.fromhex(state["shuffle"]))
    serve = protocol.server(run, state["protocol"])
    stats = serve_watched(context.spark if not local else None, plan, serve, local,
                          _abort_watch(channel, context.scope("psi").tag("abort")))
    run.step("buckets", tick)

    tick = time.perf_counter()                                                        # 6
    manifest = None
    if params.learns(context.role):
        extra = {"protocol": params.protocol, "id_column": params.id_column, "peer": peer, "job": job}
        manifest = output.write_output(None if local else context.spark, work, out,
                                       _matched_counts(stats, work), extra)
    timings["output_s"] = round(time.perf_counter() - tick, 3)
    if not params.keep_work:
        work.remove()
    timings["total_s"] = round(time.perf_counter() - started, 3)
    totals: dict[str, int] = {}
    for bucket in stats:
        for key, value in bucket.items():
            totals[key] = totals.get(key, 0) + int(value)
    context.metrics.update({
        "psi_protocol": params.protocol,
        "psi_buckets": params.buckets,
        "psi_mode": "driver" if local else "executors",
        "psi_learned": manifest is not None,
        "psi_intersection": manifest["count"] if manifest else None,
        "psi_rows_written": manifest["row_count"] if manifest else None,
        "psi_digest": manifest["digest"] if manifest else None,
        "psi_input": table.report,
        "psi_peer_ids": totals.get("peer_ids", 0),
        "psi_buckets_reused": totals.pop("reused", 0),
        # points this party blinded: its own ids, the peer's (an incremental run: only those new)
        "psi_blinded": {"own": totals.get("blinded_own", 0), "peer": totals.get("blinded_peer", 0)},
        # incremental PSI: "off", "new epoch" (fresh keys, kept for the next run) or "reused"
        "psi_key": "off" if not persistent else ("reused" if persistent.get("reused") else "new epoch"),
        "psi_resumed": saved is not None,
        "psi_messages": totals,
        "psi_driver_peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "psi_timings": {**timings, **run.timings},
    })
    log.info("psi: %s learned %s of %d ids in %.1fs", context.me,
             manifest["count"] if manifest else "nothing", table.report["ids"], timings["total_s"])


def _abort_watch(channel: Any, tag: Any) -> Any:
    """``aborted(seconds)``: the peer's abort as a PeerError if it came within ``seconds``, else None."""
    def aborted(seconds: float) -> BaseException | None:
        if getattr(channel, "stop_on", None) is None:
            time.sleep(seconds)
            return None
        try:   # run() watches this tag (stop_on): an abort that comes while waiting fails the receive
            # patient: called every half second for the whole bucket phase, and an abort is rare
            value = channel.recv(tag, timeout=seconds, patient=True)
        except PeerError as exc:
            return None if str(exc).startswith("timed out") else exc
        reason = value.get("abort") if isinstance(value, dict) else None
        return PeerError(f"peer {channel.peer!r} stopped job {tag.job!r}: {reason or 'no reason given'}")
    return aborted


def _plan(channel: Any, run: PsiRun, work: Folder, params: params_module.PsiParams) -> BucketPlan:
    if not hasattr(channel, "subkeys"):
        raise ConfigError("psi needs a Kafka channel (its buckets talk over per-bucket partitions); "
                          "this transport has none")
    from fedps.messaging.partitioned import ensure_topics, link_spec

    spec = link_spec(channel, params.buckets, label=LINK_LABEL)
    ensure_topics(spec)
    return BucketPlan(spec, work, run.scope, params.buckets, params.batch_size, float(params.wait_s),
                      params.tasks)


def _matched_counts(stats: list[dict[str, int]], work: Folder) -> list[int]:
    """Each bucket's number of intersection ids: its ``matched`` count, else its ``matched`` files."""
    counts = []
    for bucket, served in enumerate(stats):
        if MATCHED in served:
            counts.append(int(served[MATCHED]))
        else:
            found = work.child(MATCHED, f"bucket={bucket}").read_table(["id"])
            counts.append(0 if found is None else found.num_rows)
    return counts


def _stage_local(rows: pa.Table, order_key: bytes, count: int, folder: Folder) -> None:
    """The rows of a small run, as :func:`buckets.staged` stages them, written from this process."""
    texts = rows.column(ids.ID).to_pylist()
    hashes = [buckets.keyed_hash(order_key, v) for v in texts]
    if buckets.HASH in rows.column_names:
        rows = rows.drop_columns([buckets.HASH])
    rows = rows.append_column(buckets.HASH, pa.array(hashes, pa.binary()))
    of = np.fromiter((buckets.bucket_of_hash(h, count) for h in hashes), dtype=np.int64, count=len(hashes))
    for bucket in np.unique(of).tolist():
        folder.child(f"{buckets.BUCKET}={bucket}").write_table(
            "part-0.parquet", rows.filter(pa.array(of == bucket)))


def _stage_schema(frame: Any, folder: Folder) -> None:
    """No rows, with the staged columns, in ``<ids>/_schema/`` (read by :func:`output.empty_rows`;
    no bucket reads it, and Spark skips folders whose name starts with an underscore)."""
    fields = [f for f in frame.limit(0).toArrow().schema if f.name != buckets.HASH]
    schema = pa.schema([*fields, pa.field(buckets.HASH, pa.binary())])
    folder.child("_schema").write_table("part-0.parquet", schema.empty_table())


def _stage_spark(frame: Any, order_key: bytes, count: int, folder: Folder) -> None:
    """The rows, bucketed by Spark, as Parquet partitioned by bucket (``_psi_bucket=<b>/``).

    Timestamps are written as INT64 microseconds, UTC, not Spark's default INT96: the bucket tasks
    read them with pyarrow, which reads INT96 as nanoseconds (wrong outside 1677-2262)."""
    staged = buckets.staged(frame, order_key, count)
    (staged.write.mode("overwrite").option("spark.sql.parquet.outputTimestampType", "TIMESTAMP_MICROS")
     .partitionBy(buckets.BUCKET).parquet(folder.spark_path))


def _exchange_settings(context: Any, params: params_module.PsiParams, channel: Any, scope: Any,
                       peer: str) -> str:
    channel.send(scope.tag(SETTINGS.name), SETTINGS.check({**params.agreed_view(), "role": context.role}))
    theirs = SETTINGS.check(channel.recv(scope.tag(SETTINGS.name)))
    params_module.check_agreement(params.agreed_view(), theirs, peer)
    peer_role = str(theirs.get("role"))
    if {context.role, peer_role} != {"guest", "host"}:
        raise ConfigError(f"psi needs one guest and one host; {context.me} is {context.role} "
                          f"and {peer} is {peer_role} (party.role)")
    return peer_role


def _load_and_compare(spark: Any, params: params_module.PsiParams, channel: Any, scope: Any,
                      peer: str) -> ids.IdTable:
    """Read the ids; tell the peer their type (or that reading failed) and compare."""
    try:
        table = ids.load_ids(spark, params)
    except DataError as exc:
        channel.send(scope.tag(ID_TYPE.name), ID_TYPE.check({"ok": False, "error": type(exc).__name__}))
        channel.flush()
        raise
    channel.send(scope.tag(ID_TYPE.name), ID_TYPE.check({"ok": True, "id_type": table.id_type}))
    theirs = ID_TYPE.check(channel.recv(scope.tag(ID_TYPE.name), timeout=params.wait_s))
    if not theirs.get("ok"):
        raise PeerError(f"{peer} could not use its ids ({theirs.get('error')}); see its log")
    if theirs.get("id_type") != table.id_type:
        raise DataError(f"our ids ({params.id_column!r} in {params.input}) are {table.id_type}s but "
                        f"{peer}'s are {theirs.get('id_type')}s; set job.params.id_type to the same "
                        f"value on both sides")
    return table
