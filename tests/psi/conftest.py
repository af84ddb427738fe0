"""PSI between two parties as threads of this process, sharing the session's Spark.

``psi_pair(guest_ids, host_ids, **params)`` writes each party's ids (plus a
feature column) as CSV, runs ``fedps.algorithms.psi.run`` for both through
real channels on the embedded broker, and returns each party's outcome: its
metrics, the rows it wrote, its manifest, and every value it received.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import pytest

from fedps.engine import config as config_module
from fedps.engine.runner import PartyContext
from fedps.messaging.channel import Channel


@dataclass
class Outcome:
    metrics: dict[str, Any]
    rows: pd.DataFrame | None
    manifest: dict[str, Any] | None
    received: list[Any] = field(default_factory=list)
    error: BaseException | None = None
    job: str = ""


def write_ids(path: Path, ids: list[Any], fmt: str = "csv") -> Path:
    frame = pd.DataFrame({"id": ids, "x0": [float(i) for i in range(len(ids))]})
    if fmt == "parquet":
        path = path.with_suffix(".parquet")
        frame.to_parquet(path, index=False)
    else:
        path = path.with_suffix(".csv")
        frame.to_csv(path, index=False)
    return path


def _tap(channel: Channel, log: list[Any]) -> None:
    """Record every value the party receives (a fault-injection style tap on recv)."""
    real = channel.recv

    def recv(tag, timeout=None, **options):
        value = real(tag, timeout, **options)
        log.append(value)
        return value

    channel.recv = recv


def _tap_links(monkeypatch, logs: dict[str, list[Any]]) -> None:
    """Record what each party's bucket links receive (the driver serves the buckets of a small run)."""
    from fedps.messaging.partitioned import PartitionLink

    real = PartitionLink.recv

    def recv(self, p, tag, timeout=None):
        value = real(self, p, tag, timeout)
        logs.setdefault(self.spec.me, []).append(value)
        return value

    monkeypatch.setattr(PartitionLink, "recv", recv)


@pytest.fixture
def psi_pair(spark, make_parties, job_id, tmp_path, monkeypatch):
    channels = make_parties("guest", "host", recv_timeout_s=60.0)
    runs = []
    link_logs: dict[str, list[Any]] = {}
    _tap_links(monkeypatch, link_logs)

    def run(guest_ids: list[Any], host_ids: list[Any], fmt: str = "csv",
            inputs: dict[str, Path] | None = None, party_params: dict[str, dict] | None = None,
            **params: Any) -> dict[str, Outcome]:
        runs.append(len(runs))
        job = f"{job_id}r{len(runs)}"
        base = tmp_path / job
        base.mkdir()
        paths = inputs or {"guest": write_ids(base / "guest_ids", guest_ids, fmt),
                           "host": write_ids(base / "host_ids", host_ids, fmt)}
        outcomes: dict[str, Outcome] = {}

        def party(name: str, peer: str) -> None:
            received = link_logs.setdefault(name, [])
            received.clear()
            out = base / name
            config = config_module.from_mapping({
                "job": {"id": job, "algorithm": "psi",
                        "params": {"input": str(paths[name]), "batch_size": 100, "buckets": 4,
                                   "rsa_bits": 1024, **params, **(party_params or {}).get(name, {})}},
                "party": {"name": name, "role": name, "output_dir": str(out)},
            })
            channel = Channel(job, name, peer, channels[name]).open()
            _tap(channel, received)
            context = PartyContext(config, {peer: channel}, out, _spark=spark)
            try:
                from fedps.algorithms import psi

                psi.run(context)
                folder = out / config.job.params.get("output", "psi")
                learned = (folder / "manifest.json").exists()
                outcomes[name] = Outcome(
                    context.metrics,
                    pd.read_parquet(folder / "rows") if learned else None,
                    psi.load_manifest(folder) if learned else None, received, job=job)
            except BaseException as exc:  # reported to the test below
                outcomes[name] = Outcome(context.metrics, None, None, received, exc, job=job)
            finally:
                channel.close()

        threads = [threading.Thread(target=party, args=pair, daemon=True) for pair in
                   (("guest", "host"), ("host", "guest"))]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=240)
        return outcomes

    return run


def random_sets(n_guest: int, n_host: int, overlap: int, seed: int, integer: bool = False):
    """Two id lists with exactly ``overlap`` ids in common; returns (guest, host, shared as text)."""
    import random

    rng = random.Random(seed)
    pool = rng.sample(range(1, 10**12), n_guest + n_host - overlap)
    guest = pool[:overlap] + pool[overlap:n_guest]
    host = pool[:overlap] + pool[n_guest:]
    rng.shuffle(guest)
    rng.shuffle(host)
    make = (lambda v: v) if integer else (lambda v: f" user-{v:x} ")  # spaces: trimmed
    shared = {str(v) if integer else f"user-{v:x}" for v in pool[:overlap]}
    return [make(v) for v in guest], [make(v) for v in host], shared


def _as_bytes(value: Any) -> bytes:
    import json

    import numpy as np

    from fedps.messaging.codec import Blob

    if isinstance(value, np.ndarray):
        return value.tobytes()
    if isinstance(value, Blob):
        return bytes(value.data)
    return json.dumps(value).encode()


def assert_no_leak(outcomes: dict[str, Outcome], ids: dict[str, list[Any]], shared: set[str]) -> int:
    """Nothing one party received contains a recognisable form of the other's
    non-intersecting ids: raw text, SHA-256/512, the keyed bucket and order
    hashes, the hash-to-curve point, the RSA full-domain hash (first 8 bytes
    and whole). Returns the number of ids checked."""
    import hashlib

    import numpy as np

    from fedps.algorithms.psi import buckets, ecdh, rsa

    shares, public = {}, None
    for name, outcome in outcomes.items():
        peer = next(n for n in outcomes if n != name)
        for value in outcome.received:
            if isinstance(value, np.ndarray) and value.shape == (32,) and value.dtype == np.uint8 and peer not in shares:
                shares[peer] = value.tobytes()  # the first 32-byte array is the key share
            if isinstance(value, dict) and "n" in value and "e" in value:
                public = rsa.PublicKey(int(value["n"], 16), int(value["e"]))
    keys = buckets.derive_keys(shares, outcomes["guest"].job)
    checked = 0
    for name, outcome in outcomes.items():
        peer = next(n for n in outcomes if n != name)
        blob = b"\x00".join(_as_bytes(v) for v in outcome.received)
        for raw in ids[peer]:
            text = str(raw).strip()
            if text in shared:
                continue
            forms = [text.encode(), hashlib.sha256(text.encode()).digest(),
                     hashlib.sha512(text.encode()).digest(), ecdh.encode_to_curve(text.encode())]
            for key in (keys.bucket, keys.order):
                forms.append(buckets.keyed_hash(key, text))
            if public is not None:
                forms.append(int(public.fdh(text)).to_bytes(public.width, "big"))
            if isinstance(raw, int):
                forms += [raw.to_bytes(8, "little"), raw.to_bytes(8, "big")]
            for form in forms:
                assert form not in blob and form[:8] not in blob, f"{name} received a form of {text!r}"
            checked += 1
    return checked
