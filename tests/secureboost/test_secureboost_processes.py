"""SecureBoost end to end: each party its own `fedps run` process through the embedded broker.

One job (1024-bit keys, breast): the guest is killed with SIGKILL after its
first tree's checkpoint and restarted; both parties' models must still equal
the plaintext reference on the joined rows, split for split.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

from fedps.algorithms.secureboost import reference
from fedps.algorithms.secureboost.binning import merge, sketch
from fedps.algorithms.secureboost.params import SBParams
from fedps.messaging.identity import generate_identity

DATA = Path(__file__).parents[2] / "data"
FILES = {"guest": DATA / "breast_hetero_guest.csv", "host": DATA / "breast_hetero_host.csv"}
SETTINGS = {"trees": 3, "max_depth": 3, "max_bin": 16, "key_bits": 1024, "validation_fraction": 0.2,
            "subsample": 0.9, "partitions": 4}


def write_configs(tmp: Path, job: str, servers: str) -> dict[str, Path]:
    keys = {n: generate_identity(tmp / "keys" / f"{n}.key") for n in FILES}
    confs = {}
    for name in FILES:
        params = ", ".join(f"{k} = {json.dumps(v)}" for k, v in {"train": str(FILES[name]), **SETTINGS}.items())
        peer = "host" if name == "guest" else "guest"
        conf = tmp / f"{name}.toml"
        conf.write_text(f"""
[job]
id = "{job}"
algorithm = "secureboost"
params = {{ {params} }}
[party]
name = "{name}"
role = "{name}"
identity_key = "keys/{name}.key"
output_dir = "out/{name}"
[peers]
{peer} = "{keys[peer]}"
[kafka]
bootstrap_servers = "{servers}"
[channel]
recv_timeout_s = 300
[ray]
object_store_mb = 80
num_cpus = 1
""")
        confs[name] = conf
    return confs


def start(conf: Path) -> subprocess.Popen:
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
    return subprocess.Popen([sys.executable, "-m", "fedps.engine.cli", "run", "--conf", str(conf)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            start_new_session=True)


def finish(procs: dict[str, subprocess.Popen], timeout: float = 900) -> dict[str, dict]:
    out = {}
    for name, proc in procs.items():
        stdout, stderr = proc.communicate(timeout=timeout)
        assert proc.returncode == 0, f"{name} failed:\n{stderr[-4000:]}"
        out[name] = json.loads(stdout.strip().splitlines()[-1])
    return out


def oracle() -> reference.ReferenceModel:
    from fedps.engine.layout import id_digest

    guest = pd.read_csv(FILES["guest"])
    host = pd.read_csv(FILES["host"]).set_index("id").loc[guest["id"]]
    keys = np.array([int.from_bytes(id_digest(str(i))[:8], "big") >> 1 for i in guest["id"]], dtype=np.int64)
    params = SBParams(**SETTINGS)
    parties = {}
    for name, frame in (("guest", guest.drop(columns=["id", "y"])), ("host", host)):
        x = frame.to_numpy(dtype=np.float64)
        parties[name] = (merge([sketch(x)], tuple(frame.columns), params.max_bin, len(x)), x)
    return reference.train(parties, guest["y"].to_numpy(np.float64), keys, params)


def test_killed_guest_resumes_and_both_processes_build_the_reference_trees(tmp_path, broker, job_id):
    confs = write_configs(tmp_path, job_id, broker.bootstrap_servers)
    procs = {n: start(c) for n, c in confs.items()}
    checkpoints = tmp_path / "out" / "guest" / "checkpoint"
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline and not list(checkpoints.glob("job-*.json")):
        assert procs["guest"].poll() is None, procs["guest"].communicate()[1][-3000:]
        time.sleep(0.05)
    assert procs["guest"].poll() is None, "the guest finished before it could be killed"
    os.killpg(procs["guest"].pid, signal.SIGKILL)      # the party and its local Ray die at once
    procs["guest"].wait()
    procs["guest"] = start(confs["guest"])
    metrics = finish(procs)

    model = oracle()
    guest = json.loads((tmp_path / "out" / "guest" / "model.json").read_text())
    host = json.loads((tmp_path / "out" / "host" / "model.json").read_text())
    expected = [{"class": t["class"], "nodes": {str(n): s for n, s in t["nodes"].items()}} for t in model.trees]
    assert guest["trees"] == expected
    assert guest["splits"] == model.tables["guest"].to_json()
    assert host["splits"] == model.tables["host"].to_json() and "trees" not in host
    assert metrics["guest"]["trees"] == 3 and metrics["guest"]["final"]["valid_auc"] > 0.9
    assert (tmp_path / "out" / "guest" / "roc.png").stat().st_size > 1000
    assert (tmp_path / "out" / "host" / "importance.png").stat().st_size > 1000
