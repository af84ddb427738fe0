"""Private set intersection: align two parties' samples, revealing only the shared ids.

``job.algorithm = "psi"`` runs :func:`run` in each party. The protocols
(``ecdh``, ``rsa`` and ``ot``, the last in its own venv) are in their own modules;
this module tells the steps common to all, in order (docs/protocols.md, "Private set intersection"):

1. the parties compare the settings they must share (``params.SHARED``)
2. each reads and canonicalises its ids, refusing or dropping nulls and
   duplicates, and they compare id types: all before any cryptography
3. they agree on the bucket and order keys (``buckets.agree_keys``)
4. each splits its ids into buckets by keyed hash, in a private order
5. the protocol finds the intersection, bucket i meeting only bucket i, in
   executor tasks that talk to the peer's tasks over per-bucket partitions
   (or in the driver below ``local_below`` ids; ``tasks``)
6. each party that learns the result writes its rows in the intersection
   and the manifest (``output``)

The steps are told in :mod:`fedps.algorithms.psi.driver`. Training reads
``<output>/rows`` and checks ``manifest.json`` with
:func:`fedps.algorithms.psi.output.check_manifest`.

A PSI resumes: a party killed once its buckets have started, restarted with
the same command (and its channel state), keeps the buckets it had done and
serves the others (``driver``). A party restarted before that point tells its
peer with an ``abort`` message and stops; the peer's next receive of the PSI
fails at once (not after ``wait_s``), so both say: rerun under a new job id.
A party restarted after its PSI finished keeps its result.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from fedps.algorithms.psi import driver, output, params as params_module
from fedps.errors import ConfigError, DataError, ProtocolError
from fedps.messaging.tags import Message

log = logging.getLogger(__name__)

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
    out = driver.output_folder(context, params)
    work = driver.work_folder(out, params)
    saved = None
    if getattr(channel, "resumed", False):
        if _after_restart(context, params, channel, scope, out):
            return
        saved = driver.load_state(work, config.job.id)
    stop_on = getattr(channel, "stop_on", None)
    if stop_on is None:   # a transport without aborts
        driver.run_psi(context, params, channel, scope, peer, out, work, saved)
        return
    with stop_on(scope.tag(ABORT.name)):
        driver.run_psi(context, params, channel, scope, peer, out, work, saved)


def _after_restart(context: Any, params: params_module.PsiParams, channel: Any, scope: Any,
                   out: Any) -> bool:
    """This party ran this job before: keep that result (True), resume (False), or stop both."""
    job = context.config.job.id
    try:
        manifest = output.load_manifest(out)
    except (DataError, ValueError):   # none, or half written when the party was killed
        manifest = None
    if manifest is not None and manifest.get("job") == job:
        log.info("psi: %s already has the result of job %s in %s; keeping it", context.me, job, out)
        context.metrics.update({"psi_protocol": params.protocol, "psi_learned": True,
                                "psi_intersection": manifest["count"], "psi_digest": manifest["digest"],
                                "psi_reused": True})
        return True
    if driver.load_state(driver.work_folder(out, params), job) is not None:
        return False
    reason = (f"{context.me} restarted in the middle of the PSI of job {job!r} before its buckets "
              "started; such a PSI cannot resume: rerun it under a new job id")
    channel.abort(scope.tag(ABORT.name), reason)
    raise ProtocolError(f"the PSI of job {job!r} was interrupted on {context.me} before its buckets "
                        "started (this party has the channel state of an earlier run but no resume "
                        "state); rerun it under a new job id (the peer was told to stop)")




def agreed_settings(config) -> dict[str, Any]:
    """The settings both parties must share, compared before any data work (fedps.engine.agreement)."""
    from fedps.algorithms.psi.preflight import psi_settings

    return psi_settings(config, dict(config.job.params)).agreed_view()
