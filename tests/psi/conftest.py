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

    def recv(tag, timeout=None):
        value = real(tag, timeout)
        log.append(value)
        return value

    channel.recv = recv


@pytest.fixture
def psi_pair(spark, make_parties, job_id, tmp_path):
    def run(guest_ids: list[Any], host_ids: list[Any], fmt: str = "csv",
            inputs: dict[str, Path] | None = None, **params: Any) -> dict[str, Outcome]:
        channels = make_parties("guest", "host", recv_timeout_s=60.0)
        paths = inputs or {"guest": write_ids(tmp_path / "guest_ids", guest_ids, fmt),
                           "host": write_ids(tmp_path / "host_ids", host_ids, fmt)}
        outcomes: dict[str, Outcome] = {}

        def party(name: str, peer: str) -> None:
            received: list[Any] = []
            out = tmp_path / name
            config = config_module.from_mapping({
                "job": {"id": job_id, "algorithm": "psi",
                        "params": {"input": str(paths[name]), "batch_size": 100, "buckets": 4,
                                   "rsa_bits": 1024, **params}},
                "party": {"name": name, "role": name, "output_dir": str(out)},
            })
            channel = Channel(job_id, name, peer, channels[name]).open()
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
                    psi.load_manifest(folder) if learned else None, received)
            except BaseException as exc:  # reported to the test below
                outcomes[name] = Outcome(context.metrics, None, None, received, exc)
            finally:
                channel.close()

        threads = [threading.Thread(target=party, args=pair) for pair in
                   (("guest", "host"), ("host", "guest"))]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=240)
        return outcomes

    return run
