"""Incremental PSI: a persistent PSI key per partner, and the blinded sets it made, reused by the next run.

With ``job.params.key_file`` set on both parties, the first run with a
partner starts an *epoch*: each party draws a persistent ECDH secret, and
both keep the keys they agreed: the order key, whose hash of an id decides
its bucket (so an id stays in its bucket from run to run, and its
``psi_hash`` in the output is the same in every run of the epoch), and the
bucket key, which names the epoch. Each party writes its key file (mode 0600
where local)::

    {"version": 1, "partner": <peer>, "protocol": "ecdh" | "rsa", "buckets": N,
     "created": <unix time>, "epoch": <hex>, "bucket_key": <hex>, "order_key": <hex>,
     "secret": <hex>}

and, per bucket, beside it in ``<key_file>.cache/<epoch>/``: ``own/`` (its
ids and their ``H(x)^a``, and their ``H(x)^(ab)`` where it learns the result) and ``peer/``
(the peer's ``H(y)^b`` and their ``H(y)^(ab)``). A later run with the same partner, both key files of the
same epoch and younger than ``key_max_age_days`` on both sides, reuses them:
it blinds only ids it has not blinded before and raises to its secret only
peer points it has not seen before. With ECDH, a bucket whose two sides kept
the same view of each other sends only the points added and removed since
(:func:`fedps.algorithms.psi.ecdh.serve`); otherwise every point is sent again
(bandwidth, not cryptography) and an id removed since is simply not sent.
Either way the result equals a run from scratch. Any difference (a party without a key file or with another epoch,
an expired key, other ``buckets`` or ``protocol``) starts a new epoch on both
sides: fresh secrets, the fresh keys, the old cache deleted.

RSA (:mod:`fedps.algorithms.psi.rsa`): the signer adds the epoch's RSA key
to its key file (``"rsa"``), the requester the public half; ``own/`` holds
each party's tags, and the requester sends only ids without one; the
requester keeps the signer's tags (``peer/``), and where both kept the same
the signer sends only the tags added and removed since.

Each rewrite of a bucket's cache leaves a stamp (``stamps/``): a restarted
job refuses a cache that another run rewrote since
(:func:`fedps.algorithms.psi.stream.check_stamp`).

What reusing a key reveals is in docs/protocols.md ("Incremental PSI").
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
from pathlib import Path
from typing import Any

from fedps.algorithms.psi.buckets import PsiKeys
from fedps.algorithms.psi.storage import Folder, is_uri
from fedps.errors import ConfigError, DataError, ProtocolError
from fedps.messaging.tags import Message, Scope

log = logging.getLogger(__name__)

EPOCH = Message("psi_epoch", "either", "other", dict)
KEY_VERSION = 1
_DAY = 86400.0


def key_location(key_file: str) -> tuple[Folder, str]:
    """The folder of the key file and its name."""
    if is_uri(key_file):
        folder, _, name = key_file.rstrip("/").rpartition("/")
        return Folder.at(folder), name
    path = Path(key_file)
    return Folder.at(path.parent), path.name


def cache_root(key_file: str) -> Folder:
    folder, name = key_location(key_file)
    return folder.child(f"{name}.cache")


def epoch_of(bucket_key: bytes, protocol: str, buckets: int, parties: list[str]) -> str:
    """The epoch's name: a hash of what both parties share (the bucket key, the settings, the pair)."""
    text = f"{protocol}\0{buckets}\0{chr(0).join(sorted(parties))}".encode()
    return hashlib.sha256(b"fedps/psi/v1/epoch\0" + bucket_key + text).hexdigest()[:32]


def load_key(params: Any, peer: str, now: float | None = None) -> dict[str, Any] | None:
    """This party's key for ``peer``, if it may be reused now; None (and why, logged) if not."""
    folder, name = key_location(params.key_file)
    stored = folder.read_json(name)
    if stored is None:
        log.info("psi: no key file %s yet: a new epoch with %s", params.key_file, peer)
        return None
    if stored.get("version") != KEY_VERSION or not {"partner", "epoch", "secret", "bucket_key"} <= set(stored):
        raise DataError(f"job.params.key_file {params.key_file} is not a fedps PSI key file (version "
                        f"{KEY_VERSION}); delete it to start a new epoch")
    if stored["partner"] != peer:
        raise ConfigError(f"job.params.key_file {params.key_file} holds the PSI key for partner "
                          f"{stored['partner']!r}, not {peer!r}: give each partner its own key file")
    age_days = ((now or time.time()) - float(stored.get("created", 0))) / _DAY
    if age_days >= params.key_max_age_days:
        log.info("psi: the PSI key for %s is %.1f days old (job.params.key_max_age_days = %d): rotating it",
                 peer, age_days, params.key_max_age_days)
        return None
    if "order_key" not in stored:   # written before the buckets were ranges of the order key's hash
        log.info("psi: the PSI key for %s has no order key (an older fedps made it): a new epoch", peer)
        return None
    if stored.get("protocol") != params.protocol or int(stored.get("buckets", 0)) != params.buckets:
        log.info("psi: the PSI key for %s was made for protocol %s with %s buckets: a new epoch", peer,
                 stored.get("protocol"), stored.get("buckets"))
        return None
    return stored


def save_key(persistent: dict[str, Any], more: dict[str, Any]) -> None:
    """Add ``more`` to this party's key file (the RSA key of the epoch)."""
    folder, name = key_location(persistent["key_file"])
    stored = folder.read_json(name) or {}
    stored.update(more)
    folder.write_json(name, stored, private=True)
    persistent.update(more)


def agree(channel: Any, scope: Scope, params: Any, me: str, peer: str,
          fresh: PsiKeys) -> tuple[PsiKeys, dict[str, Any] | None]:
    """Decide with the peer whether this run reuses an epoch; returns the keys and this party's key
    (with ``cache``: the folder of its cached sets), or None for a run from scratch."""
    keeps = bool(params.key_file)
    stored = load_key(params, peer) if keeps else None
    offer = stored["epoch"] if stored else None
    channel.send(scope.tag(EPOCH.name), EPOCH.check({"keeps": keeps, "epoch": offer}))
    theirs = EPOCH.check(channel.recv(scope.tag(EPOCH.name), timeout=params.wait_s))
    if not isinstance(theirs.get("keeps"), bool) or not isinstance(theirs.get("epoch"), (str, type(None))):
        raise ProtocolError(f"{peer}'s psi_epoch message is malformed")
    if not keeps:
        return fresh, None
    if not theirs["keeps"]:
        log.warning("psi: %s keeps no PSI key (job.params.key_file): this run is from scratch", peer)
        return fresh, None
    if offer is not None and theirs["epoch"] == offer:
        key = {**stored, "cache": str(cache_root(params.key_file).child(offer)), "reused": True,
               "key_file": params.key_file}
        log.info("psi: reusing the PSI key of epoch %s with %s (incremental run)", offer[:12], peer)
        # the order key decides each id's bucket, so the cached sets stay in their buckets
        return PsiKeys(bytes.fromhex(stored["bucket_key"]), bytes.fromhex(stored["order_key"])), key
    epoch = epoch_of(fresh.bucket, params.protocol, params.buckets, [me, peer])
    key = {"version": KEY_VERSION, "partner": peer, "protocol": params.protocol, "buckets": params.buckets,
           "created": time.time(), "epoch": epoch, "bucket_key": fresh.bucket.hex(),
           "order_key": fresh.order.hex(), "secret": os.urandom(32).hex()}
    cache_root(params.key_file).remove()
    folder, name = key_location(params.key_file)
    folder.write_json(name, key, private=True)
    log.info("psi: a new PSI key epoch %s with %s in %s", epoch[:12], peer, params.key_file)
    return fresh, {**key, "cache": str(cache_root(params.key_file).child(epoch)), "reused": False,
                   "key_file": params.key_file}
