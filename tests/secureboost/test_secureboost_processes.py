"""SecureBoost end to end: each party its own `fedps run` process through the embedded broker.

One job (1024-bit keys, breast, 3 trees), three kills with SIGKILL, each
party restarted with the same command: the host during the first tree
(before any checkpoint: it replays setup and the tree from the start of its
topics), the guest after its first tree's checkpoint, the host after its
second. Both parties' models must still equal the plaintext reference on the
joined rows, split for split.
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
import pytest

from fedps.algorithms.secureboost import reference
from fedps.algorithms.secureboost.binning import merge, sketch
from fedps.algorithms.secureboost.params import SBParams
from fedps.messaging.identity import generate_identity

DATA = Path(__file__).parents[2] / "data"
FILES = {"guest": DATA / "breast_hetero_guest.csv", "host": DATA / "breast_hetero_host.csv"}
SETTINGS = {"trees": 3, "max_depth": 3, "max_bin": 16, "key_bits": 1024, "validation_fraction": 0.2,
            "subsample": 0.9, "partitions": 4}


def write_configs(tmp: Path, job: str, servers: str, settings: dict | None = None) -> dict[str, Path]:
    keys = {n: generate_identity(tmp / "keys" / f"{n}.key") for n in FILES}
    confs = {}
    for name in FILES:
        params = ", ".join(f"{k} = {json.dumps(v)}"
                           for k, v in {"train": str(FILES[name]), **(settings or SETTINGS)}.items())
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
recv_timeout_s = 600
[ray]
object_store_mb = 80
num_cpus = 1
""")
        confs[name] = conf
    return confs


def start(conf: Path) -> subprocess.Popen:
    """A party's ``fedps run``; its log goes to ``<conf>.<n>.log`` (one per start), which tests may watch."""
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
    n = len(list(conf.parent.glob(f"{conf.name}.*.log")))
    log = conf.with_name(f"{conf.name}.{n}.log")
    with open(log, "w") as err:
        proc = subprocess.Popen([sys.executable, "-m", "fedps.engine.cli", "run", "--conf", str(conf)],
                                stdout=subprocess.PIPE, stderr=err, text=True, env=env, start_new_session=True)
    proc.log = log   # type: ignore[attr-defined]
    return proc


def finish(procs: dict[str, subprocess.Popen], timeout: float = 900) -> dict[str, dict]:
    out = {}
    for name, proc in procs.items():
        stdout, _ = proc.communicate(timeout=timeout)
        assert proc.returncode == 0, f"{name} failed:\n{proc.log.read_text()[-4000:]}"
        out[name] = json.loads(stdout.strip().splitlines()[-1])
    return out


def wait_for(procs: dict[str, subprocess.Popen], name: str, ready, what: str, timeout: float = 600) -> None:
    deadline = time.monotonic() + timeout
    while not ready():
        assert procs[name].poll() is None, f"{name} ended before {what}:\n{procs[name].log.read_text()[-3000:]}"
        assert time.monotonic() < deadline, f"{name}: no {what} in {timeout} s"
        time.sleep(0.05)


def kill_and_restart(procs: dict[str, subprocess.Popen], name: str, conf: Path) -> None:
    os.killpg(procs[name].pid, signal.SIGKILL)      # the party and its local Ray die at once
    procs[name].wait()
    procs[name] = start(conf)


def oracle(settings: dict | None = None) -> reference.ReferenceModel:
    from fedps.engine.layout import id_digest

    guest = pd.read_csv(FILES["guest"])
    host = pd.read_csv(FILES["host"]).set_index("id").loc[guest["id"]]
    keys = np.array([int.from_bytes(id_digest(str(i))[:8], "big") >> 1 for i in guest["id"]], dtype=np.int64)
    params = SBParams(**(settings or SETTINGS))
    parties = {}
    for name, frame in (("guest", guest.drop(columns=["id", "y"])), ("host", host)):
        x = frame.to_numpy(dtype=np.float64)
        parties[name] = (merge([sketch(x)], tuple(frame.columns), params.max_bin, len(x)), x)
    return reference.train(parties, guest["y"].to_numpy(np.float64), keys, params)


@pytest.mark.timeout(1800)   # five process starts (Spark, Ray each): over 15 min at load average 30
def test_killed_parties_resume_and_both_processes_build_the_reference_trees(tmp_path, broker, job_id):
    confs = write_configs(tmp_path, job_id, broker.bootstrap_servers)
    procs = {n: start(c) for n, c in confs.items()}
    records = {n: tmp_path / "out" / n / "checkpoint" for n in confs}
    # 1. the host, set up (its tasks about to start the first tree) but no tree checkpointed yet: it replays
    #    setup and the first tree from the start of its topics
    wait_for(procs, "host", lambda: "partitions on" in procs["host"].log.read_text(), "end of setup")
    time.sleep(1.0)
    assert not list(records["host"].glob("job-*.json")), "the host finished its first tree before it was killed"
    kill_and_restart(procs, "host", confs["host"])
    # 2. the guest, after its first tree's checkpoint
    wait_for(procs, "guest", lambda: (records["guest"] / "job-0000000001.json").exists(), "first checkpoint")
    kill_and_restart(procs, "guest", confs["guest"])
    # 3. the host again, mid-training: after its second tree's checkpoint
    wait_for(procs, "host", lambda: (records["host"] / "job-0000000002.json").exists(), "second checkpoint")
    kill_and_restart(procs, "host", confs["host"])
    metrics = finish(procs)
    assert "resumed from the checkpoint of step 2" in procs["host"].log.read_text()
    assert "resumed from the checkpoint of step 1" in procs["guest"].log.read_text()
    assert_reference_models(tmp_path, oracle())
    assert metrics["guest"]["trees"] == 3 and metrics["host"]["trees"] == 3
    assert metrics["guest"]["final"]["valid_auc"] > 0.9
    assert (tmp_path / "out" / "guest" / "roc.png").stat().st_size > 1000
    assert (tmp_path / "out" / "host" / "importance.png").stat().st_size > 1000


def assert_reference_models(tmp_path: Path, model: reference.ReferenceModel) -> None:
    guest = json.loads((tmp_path / "out" / "guest" / "model.json").read_text())
    host = json.loads((tmp_path / "out" / "host" / "model.json").read_text())
    expected = [{"class": t["class"], "nodes": {str(n): s for n, s in t["nodes"].items()}} for t in model.trees]
    assert guest["trees"] == expected
    assert guest["splits"] == model.tables["guest"].to_json()
    assert host["splits"] == model.tables["host"].to_json() and "trees" not in host
