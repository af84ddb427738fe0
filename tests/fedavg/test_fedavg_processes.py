"""FedAvg end to end: a coordinator and two parties, each its own `fedps run` process, through the broker.

The coordinator is killed (kill -9, with its local Ray) in the middle of the
job and started again. The global model must be the one an uninterrupted run
gives: secure aggregation is exact in fixed point and local training is
seeded, so the oracle below recomputes it in numpy from the parties' own
laid-out rows. Its test AUC must be within 0.01 of the same model trained
centrally on all rows.
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

from fedps.algorithms.fedavg import secagg
from fedps.algorithms.fedavg.local import validation_mask
from fedps.algorithms.fedavg.model import ModelSpec, auc, train
from fedps.algorithms.fedavg.params import FedAvgParams
from fedps.messaging.identity import generate_identity

DATA = Path(__file__).parents[2] / "data"
FILES = {"bank1": DATA / "breast_homo_guest.csv", "bank2": DATA / "breast_homo_host.csv"}
SETTINGS = dict(rounds=4, local_epochs=2, batch_size=32, learning_rate=0.05, min_parties=2, deadline_s=60.0,
                partitions=2, executor_mode="single", validation_fraction=0.2, seed=3)


def write_configs(tmp: Path, job: str, servers: str) -> dict[str, Path]:
    names = ["coordinator", *FILES]
    keys = {n: generate_identity(tmp / "keys" / f"{n}.key") for n in names}
    confs = {}
    for name in names:
        params = dict(SETTINGS, **({"data": str(FILES[name])} if name in FILES else {}))
        rendered = ", ".join(f"{k} = {json.dumps(v)}" for k, v in params.items())
        peers = [p for p in FILES] if name == "coordinator" else ["coordinator"]
        pinned = "\n".join(f'{p} = "{keys[p]}"' for p in peers)
        conf = tmp / f"{name}.toml"
        conf.write_text(f"""
[job]
id = "{job}"
algorithm = "fedavg"
params = {{ {rendered} }}
[party]
name = "{name}"
role = "{'coordinator' if name == 'coordinator' else 'guest'}"
identity_key = "keys/{name}.key"
output_dir = "out/{name}"
[peers]
{pinned}
[kafka]
bootstrap_servers = "{servers}"
[channel]
recv_timeout_s = 300
[spark]
master = "local[1]"
[ray]
object_store_mb = 80
num_cpus = 1
""")
        confs[name] = conf
    return confs


def start(conf: Path) -> subprocess.Popen:
    """The party's process; its log goes to ``<name>.log`` beside its configuration (appended)."""
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
    with open(conf.with_suffix(".log"), "a") as log:
        return subprocess.Popen([sys.executable, "-m", "fedps.engine.cli", "run", "--conf", str(conf)],
                                stdout=subprocess.PIPE, stderr=log, text=True, env=env, start_new_session=True)


def stop(procs: dict[str, subprocess.Popen]) -> None:
    for proc in procs.values():
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def finish(procs: dict[str, subprocess.Popen], folder: Path, timeout: float = 600) -> dict[str, dict]:
    out = {}
    try:
        for name, proc in procs.items():
            stdout, _ = proc.communicate(timeout=timeout)
            assert proc.returncode == 0, f"{name} failed:\n{(folder / f'{name}.log').read_text()[-4000:]}"
            out[name] = json.loads(stdout.strip().splitlines()[-1])
    finally:
        stop(procs)
    return out


def party_rows(tmp: Path, name: str) -> tuple[np.ndarray, np.ndarray]:
    """The party's training rows in the order its executor task reads them."""
    from fedps.engine.layout import load_layout, read_partition

    layout = load_layout(str(tmp / "out" / name / "layout"))
    parts = [read_partition(layout, p) for p in range(layout.partitions)]
    keep = [~validation_mask(p.row_keys, SETTINGS["validation_fraction"]) for p in parts]
    return (np.concatenate([np.asarray(p.x)[k] for p, k in zip(parts, keep)]),
            np.concatenate([p.y[k] for p, k in zip(parts, keep)]))


def oracle(tmp: Path) -> np.ndarray:
    """The coordinator's model, recomputed from the parties' rows with exact fixed-point sums."""
    params = FedAvgParams(**SETTINGS)
    rows = {n: party_rows(tmp, n) for n in FILES}
    spec = ModelSpec("lr", rows["bank1"][0].shape[1])
    theta = spec.initial(params.seed)
    for r in range(params.rounds):
        total = np.zeros(theta.size + 1, dtype=np.uint64)
        for x, y in rows.values():
            trained = train(spec, theta, x, y, epochs=params.local_epochs, batch_size=params.batch_size,
                            learning_rate=params.learning_rate, seed=(params.seed * 100_003 + r) * 7919)
            update = np.concatenate([len(y) * (trained - theta), [float(len(y))]])
            total += secagg.quantise(update, params.frac_bits, 2.0 ** 36)
        plain = secagg.dequantise(total, params.frac_bits)
        theta = theta + plain[:-1] / plain[-1]
    return theta


@pytest.mark.timeout(900)
def test_coordinator_killed_mid_job_resumes_to_the_same_model_with_the_central_auc(tmp_path, broker, job_id):
    confs = write_configs(tmp_path, job_id, broker.bootstrap_servers)
    procs = {n: start(c) for n, c in confs.items()}
    rounds_file = tmp_path / "out" / "coordinator" / "rounds.json"
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline and procs["coordinator"].poll() is None:
        try:
            if len(json.loads(rounds_file.read_text())) >= 1:
                break
        except (OSError, ValueError):   # not there yet, or being written
            pass
        time.sleep(0.05)
    if procs["coordinator"].poll() is not None or not rounds_file.exists():
        stop(procs)
        raise AssertionError((tmp_path / "coordinator.log").read_text()[-3000:])
    os.killpg(procs["coordinator"].pid, signal.SIGKILL)     # the coordinator and its local Ray
    procs["coordinator"].wait()
    procs["coordinator"] = start(confs["coordinator"])
    metrics = finish(procs, tmp_path)

    out = tmp_path / "out" / "coordinator"
    theta = np.load(out / "model.npz")["theta"]
    np.testing.assert_allclose(theta, oracle(tmp_path), rtol=0, atol=1e-12)
    for name in FILES:
        assert np.array_equal(np.load(tmp_path / "out" / name / "model.npz")["theta"], theta)
    rounds = json.loads((out / "rounds.json").read_text())
    assert [r["round"] for r in rounds] == list(range(SETTINGS["rounds"]))
    assert all(r["participants"] == ["bank1", "bank2"] for r in rounds)
    assert metrics["coordinator"]["final_validation"]["rows"] == sum(
        metrics[n]["final_validation"]["rows"] for n in FILES)
    assert (out / "metrics.png").stat().st_size > 1000

    # the same model trained centrally on all rows (the oracle's trainer, every row, same epochs)
    x = np.vstack([party_rows(tmp_path, n)[0] for n in FILES])
    y = np.concatenate([party_rows(tmp_path, n)[1] for n in FILES])
    spec = ModelSpec("lr", x.shape[1])
    central = train(spec, spec.initial(0), x, y, epochs=SETTINGS["rounds"] * SETTINGS["local_epochs"],
                    batch_size=32, learning_rate=0.05, seed=1)
    test = pd.read_csv(DATA / "breast_homo_test.csv")
    tx, ty = test.drop(columns=["id", "y"]).to_numpy(), test["y"].to_numpy()
    assert auc(spec.scores(theta, tx), ty) >= auc(spec.scores(central, tx), ty) - 0.01
