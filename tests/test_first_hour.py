"""The first hour of a new user: a mistake on one side stops both sides before the PSI.

One real two-process run (`fedps run` per party, through the embedded broker):
the guest's label holds counts 0–9; both parties stop with exit code 2,
without a traceback, each naming the reason, and neither ran a PSI stage.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from fedps.messaging.identity import generate_identity

DATA = Path(__file__).resolve().parents[1] / "data"


def write_job(tmp: Path, job: str, servers: str, inputs: dict[str, Path]) -> dict[str, Path]:
    keys = {n: generate_identity(tmp / "keys" / f"{n}.key") for n in inputs}
    confs = {}
    for name, path in inputs.items():
        peer = next(p for p in inputs if p != name)
        conf = tmp / f"{name}.toml"
        conf.write_text(f"""[job]
id = "{job}"
algorithm = "hetero_lr"
params = {{ id_column = "id", key_bits = 1024, psi = {{ input = "{path}", buckets = 2 }} }}
[party]
name = "{name}"
role = "{name}"
identity_key = "keys/{name}.key"
output_dir = "out/{name}"
[peers]
{peer} = "{keys[peer]}"
[kafka]
bootstrap_servers = "{servers}"
[spark]
master = "local[1]"
[ray]
object_store_mb = 80
num_cpus = 1
""")
        confs[name] = conf
    return confs


@pytest.mark.timeout(800)   # two Spark starts: ~40 s idle, minutes on a crowded machine
def test_a_count_label_on_the_guest_stops_both_parties_before_the_psi(tmp_path, broker, job_id):
    guest = pd.read_csv(DATA / "breast_hetero_guest.csv").iloc[:120]
    guest["y"] = [i % 10 for i in range(len(guest))]
    guest.to_csv(tmp_path / "guest.csv", index=False)
    inputs = {"guest": tmp_path / "guest.csv", "host": DATA / "breast_hetero_host.csv"}
    confs = write_job(tmp_path, job_id, broker.bootstrap_servers, inputs)
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
    procs = {name: subprocess.Popen([sys.executable, "-m", "fedps.engine.cli", "run", "--conf", str(conf)],
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
             for name, conf in confs.items()}
    errors = {}
    for name, proc in procs.items():
        _, stderr = proc.communicate(timeout=700)
        assert proc.returncode == 2, stderr[-3000:]
        assert "Traceback" not in stderr, stderr[-3000:]
        assert "Using incubator modules" not in stderr   # the JVM's banners are in spark.log, not here
        assert (tmp_path / "out" / name / "spark.log").exists()
        errors[name] = stderr
    assert "counts 0–9" in errors["guest"] and "this is not a binary label" in errors["guest"]
    assert ("guest stopped: DataError: its label column (job.params.label_column) is not a binary 0/1 label"
            in errors["host"]), errors["host"][-2000:]
    for name in procs:
        metrics = json.loads((tmp_path / "out" / name / "metrics.json").read_text())
        assert not [key for key in metrics if key.startswith("psi")], metrics   # no PSI stage ran
        assert not (tmp_path / "out" / name / "psi").exists()
