"""Private set intersection: align two parties' samples, revealing only the shared ids.

``job.algorithm = "psi"`` runs :func:`run` in each party. The protocols
(``ecdh`` and ``rsa``) are in their own modules; this module tells the steps
common to both, in order (docs/protocols.md, "Private set intersection"):

1. the parties compare the settings they must share (``params.SHARED``)
2. each reads and canonicalises its ids, refusing or dropping nulls and
   duplicates, and they compare id types: all before any cryptography
3. they agree on the bucket and order keys (``buckets.agree_keys``)
4. each splits its ids into buckets by keyed hash, in a private order
5. the protocol finds the intersection, bucket i meeting only bucket i
6. each party that learns the result writes its rows in the intersection
   and the manifest (``output.write_output``)

Training reads ``<output_dir>/<params.output>/rows`` and checks
``manifest.json`` with :func:`fedps.algorithms.psi.output.check_manifest`.

A PSI does not resume. A party restarted with the channel state of an earlier
run of the job either finds its result of that run (and keeps it), or tells
its peer with an ``abort`` message and stops; the peer's next receive of the
PSI fails at once (not after ``wait_s``), so both say: rerun under a new job id.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

from fedps.algorithms.psi import buckets, ids, output, params as params_module
from fedps.algorithms.psi.stream import PsiRun
from fedps.errors import ConfigError, DataError, PeerError, ProtocolError
from fedps.messaging.tags import Message

log = logging.getLogger(__name__)

SETTINGS = Message("settings", "either", "other", dict)
ID_TYPE = Message("id_type", "either", "other", dict)
#: Sent by a party restarted in the middle of the PSI; ends the peer's PSI at once.
ABORT = Message("abort", "either", "other", dict)

__all__ = ["run", "check_manifest", "load_manifest"]
check_manifest = output.check_manifest
load_manifest = output.load_manifest


def run(context: Any) -> None:
    """Entry point for ``fedps run``: this party's side of the PSI."""
    config = context.config
    base = Path(config.source).parent if config.source != "<memory>" else Path.cwd()
    params = params_module.from_mapping(config.job.params, base)
    if len(context.channels) != 1:
        raise ConfigError(f"psi runs between two parties; {context.me} has peers "
                          f"{', '.join(context.channels) or 'none'}")
    (peer,) = context.channels
    channel = context.channels[peer]
    scope = context.scope("psi")
    if getattr(channel, "resumed", False):
        _after_restart(context, params, channel, scope)
        return
    stop_on = getattr(channel, "stop_on", None)
    if stop_on is None:   # a transport without aborts (in-process tests)
        _run(context, params, channel, scope, peer)
        return
    with stop_on(scope.tag(ABORT.name)):
        _run(context, params, channel, scope, peer)


def _after_restart(context: Any, params: params_module.PsiParams, channel: Any, scope: Any) -> None:
    """This party ran this job before: keep the result of that run, or stop both parties."""
    job = context.config.job.id
    folder = context.output_dir / params.output
    try:
        manifest = output.load_manifest(folder)
    except (DataError, ValueError):   # none, or half written when the party was killed
        manifest = None
    if manifest is not None and manifest.get("job") == job:
        log.info("psi: %s already has the result of job %s in %s; keeping it", context.me, job, folder)
        context.metrics.update({"psi_protocol": params.protocol, "psi_learned": True,
                                "psi_intersection": manifest["count"], "psi_digest": manifest["digest"],
                                "psi_reused": True})
        return
    reason = (f"{context.me} restarted in the middle of the PSI of job {job!r}; a PSI cannot "
              "resume: rerun it under a new job id")
    channel.abort(scope.tag(ABORT.name), reason)
    raise ProtocolError(f"the PSI of job {job!r} was interrupted on {context.me} (this party has the "
                        "channel state of an earlier run but no PSI result); a PSI cannot resume: "
                        "rerun it under a new job id (the peer was told to stop)")


def _run(context: Any, params: params_module.PsiParams, channel: Any, scope: Any, peer: str) -> None:
    timings: dict[str, float] = {}
    started = time.perf_counter()

    # 1. shared settings
    channel.send(scope.tag(SETTINGS.name), SETTINGS.check({**params.agreed_view(), "role": context.role}))
    theirs = SETTINGS.check(channel.recv(scope.tag(SETTINGS.name)))
    params_module.check_agreement(params.agreed_view(), theirs, peer)
    peer_role = str(theirs.get("role"))
    if {context.role, peer_role} != {"guest", "host"}:
        raise ConfigError(f"psi needs one guest and one host; {context.me} is {context.role} "
                          f"and {peer} is {peer_role} (party.role)")

    # 2. ids, checked before any cryptography
    table = _load_and_compare(context.spark, params, channel, scope, peer)
    timings["read_s"] = time.perf_counter() - started
    log.info("psi: %s read %d ids (%s) in %.1fs", context.me, table.report["ids"], table.id_type,
             timings["read_s"])

    # 3. shared keys
    keys = buckets.agree_keys(channel, scope, context.me, peer)

    # 4. buckets
    work = context.output_dir / params.output / "_work"
    psi = PsiRun(context.spark, channel, scope.sub(params.protocol), params, context.role, peer,
                 peer_role, work, wait_s=float(params.wait_s))
    psi.stage_ids(buckets.bucketed(table.frame, keys.bucket, params.buckets))

    # 5. the protocol
    tick = time.perf_counter()
    if params.protocol == "ecdh":
        from fedps.algorithms.psi import ecdh as protocol
    else:
        from fedps.algorithms.psi import rsa as protocol
    matched = protocol.intersect(psi)
    timings["protocol_s"] = time.perf_counter() - tick

    # 6. output
    tick = time.perf_counter()
    manifest = None
    if matched is not None:
        manifest = output.write_output(
            context.spark, table.frame, matched, keys.order, context.output_dir / params.output,
            extra={"protocol": params.protocol, "id_column": params.id_column, "peer": peer,
                   "job": context.config.job.id})
    timings["output_s"] = time.perf_counter() - tick
    psi.cleanup()
    timings["total_s"] = time.perf_counter() - started
    context.metrics.update({
        "psi_protocol": params.protocol,
        "psi_buckets": params.buckets,
        "psi_learned": manifest is not None,
        "psi_intersection": manifest["count"] if manifest else None,
        "psi_digest": manifest["digest"] if manifest else None,
        "psi_input": table.report,
        "psi_peer_ids": psi.stats.get("peer_ids"),
        "psi_messages": psi.stats,
        "psi_timings": {**{k: round(v, 3) for k, v in timings.items()}, **psi.timings},
    })
    log.info("psi: %s learned %s of %d ids in %.1fs", context.me,
             manifest["count"] if manifest else "nothing", table.report["ids"], timings["total_s"])


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
