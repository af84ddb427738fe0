"""The first hour of a new user: a mistake on one side stops both sides before the PSI.

One real two-process run (`fedps run` per party, through the embedded broker):
the guest's label holds counts 0–9; both parties stop with exit code 2,
without a traceback, each naming the reason, and neither ran a PSI stage.
"""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

from processes import party_files, start, stopped

DATA = Path(__file__).resolve().parents[1] / "data"


def write_job(tmp: Path, job: str, servers: str, inputs: dict[str, Path]) -> dict[str, Path]:
    params = {name: {"id_column": "id", "key_bits": 1024, "psi": {"input": str(path), "buckets": 2}}
              for name, path in inputs.items()}
    return party_files(tmp, job, servers, "hetero_lr", params, sections='[spark]\nmaster = "local[1]"\n')


@pytest.mark.timeout(800)   # two Spark starts: ~40 s idle, minutes on a crowded machine
def test_a_count_label_on_the_guest_stops_both_parties_before_the_psi(tmp_path, broker, job_id):
    guest = pd.read_csv(DATA / "breast_hetero_guest.csv").iloc[:120]
    guest["y"] = [i % 10 for i in range(len(guest))]
    guest.to_csv(tmp_path / "guest.csv", index=False)
    inputs = {"guest": tmp_path / "guest.csv", "host": DATA / "breast_hetero_host.csv"}
    confs = write_job(tmp_path, job_id, broker.bootstrap_servers, inputs)
    errors = stopped({name: start(conf) for name, conf in confs.items()}, timeout=700)
    for name, stderr in errors.items():
        assert "Using incubator modules" not in stderr   # the JVM's banners are in spark.log, not here
        assert (tmp_path / "out" / name / "spark.log").exists()
    assert "counts 0–9" in errors["guest"] and "this is not a binary label" in errors["guest"]
    assert ("guest stopped: DataError: its label column (job.params.label_column) is not a binary 0/1 label"
            in errors["host"]), errors["host"][-2000:]
    for name in confs:
        metrics = json.loads((tmp_path / "out" / name / "metrics.json").read_text())
        assert not [key for key in metrics if key.startswith("psi")], metrics   # no PSI stage ran
        assert not (tmp_path / "out" / name / "psi").exists()
