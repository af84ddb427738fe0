"""Vertical LR end to end: each party its own `fedps run` process, through the embedded broker."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from processes import finish, kill, party_files, start, stopped

DATA = Path(__file__).parents[2] / "data"


def write_configs(tmp: Path, job: str, servers: str, files: dict[str, Path], **params) -> dict[str, Path]:
    settings = {"epochs": 3, "batch_size": 96, "learning_rate": 0.3, "l2": 0.001, "key_bits": 1024,
                "validation_fraction": 0.3, "optimizer": "sgd", "schedule": "constant", "label_dp": False,
                **params}
    names = list(files)
    chain = dict(guest="guest", hosts=[n for n in names if n != "guest"]) if len(names) > 2 else {}
    return party_files(tmp, job, servers, "hetero_lr",
                       {name: {"train": str(files[name]), **settings, **chain} for name in names},
                       sections="[channel]\nrecv_timeout_s = 300\n")


def row_keys(ids) -> np.ndarray:
    from fedps.engine.layout import id_digest

    return np.array([int.from_bytes(id_digest(str(i))[:8], "big") >> 1 for i in ids], dtype=np.int64)


def model(tmp: Path, name: str) -> dict:
    return json.loads((tmp / "out" / name / "model.json").read_text())


@pytest.mark.timeout(600)   # two process starts, one of them spark-submit's, and eight epochs
def test_two_processes_train_to_the_central_models_auc_with_the_guest_under_spark_submit(tmp_path, broker,
                                                                                          job_id):
    """The guest runs under spark-submit with fedps shipped as `make dist`'s --py-files zip (as on a
    cluster): the submit command's master (local[2]) wins over its file's (local[1]), and the rows'
    products run in its executors' tasks."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import roc_auc_score

    from fedps.engine.vertical.plan import validation_rows

    files = {"guest": DATA / "breast_hetero_guest.csv", "host": DATA / "breast_hetero_host.csv"}
    confs = write_configs(tmp_path, job_id, broker.bootstrap_servers, files, epochs=8)
    confs["guest"].write_text(confs["guest"].read_text() + '[spark]\nmaster = "local[1]"\n')
    metrics = finish({"guest": submit(tmp_path, confs["guest"]), "host": start(confs["host"])})

    guest = pd.read_csv(files["guest"])
    host = pd.read_csv(files["host"]).set_index("id").loc[guest["id"]]
    y = guest["y"].to_numpy()
    valid = validation_rows(row_keys(guest["id"]), 0.3, 0)
    x = np.hstack([guest.drop(columns=["id", "y"]).to_numpy(), host.to_numpy()])
    central = LogisticRegression(C=1.0 / (0.001 * (~valid).sum()), max_iter=2000).fit(x[~valid], y[~valid])
    central_auc = roc_auc_score(y[valid], central.decision_function(x[valid]))
    federated = metrics["guest"]["final"]
    assert federated["rows"] == int(valid.sum())
    assert federated["auc"] >= central_auc - 0.01
    assert len(metrics["guest"]["loss"]) == 8 and metrics["guest"]["loss"][-1] < metrics["guest"]["loss"][0]
    assert metrics["guest"]["spark_master"] == "local[2]"      # the submit command's, not the config's
    assert metrics["guest"]["partitions"] == 4 and metrics["guest"]["tasks"] == 2    # N above the slots
    assert metrics["guest"]["task_seconds_by_work"]["encrypt"] > 0               # the rows' crypto ran in tasks
    assert (tmp_path / "out" / "guest" / "roc.png").stat().st_size > 1000
    assert len(model(tmp_path, "host")["weights"]) == host.shape[1]
    assert model(tmp_path, "host")["intercept"] is None


def submit(tmp: Path, conf: Path) -> subprocess.Popen:
    """The guest's jobs/hetero_lr.py under spark-submit --master local[2], fedps in a --py-files zip."""
    root = Path(__file__).parents[2]
    env = {**os.environ, "PYSPARK_PYTHON": sys.executable, "PYSPARK_DRIVER_PYTHON": sys.executable,
           "RAY_USAGE_STATS_ENABLED": "0"}
    sys.path.insert(0, str(root / "scripts"))
    import dist   # `make dist`'s --py-files zip: the driver and its executors import fedps from it

    return subprocess.Popen([str(Path(sys.executable).with_name("spark-submit")), "--master", "local[2]",
                             "--conf", "spark.ui.enabled=false", "--py-files", str(dist.build_zip(tmp)),
                             str(root / "jobs" / "hetero_lr.py"), "--conf", str(conf)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            start_new_session=True)


def test_three_processes_guest_and_two_hosts(tmp_path, broker, job_id):
    host = pd.read_csv(DATA / "breast_hetero_host.csv")
    first, second = tmp_path / "h1.csv", tmp_path / "h2.csv"
    host.iloc[:, :11].to_csv(first, index=False)
    host[["id", *host.columns[11:]]].to_csv(second, index=False)
    files = {"guest": DATA / "breast_hetero_guest.csv", "host1": first, "host2": second}
    confs = write_configs(tmp_path, job_id, broker.bootstrap_servers, files, epochs=2)
    metrics = finish({n: start(c) for n, c in confs.items()})
    assert metrics["guest"]["final"]["auc"] > 0.97
    assert len(model(tmp_path, "host1")["weights"]) == 10 and len(model(tmp_path, "host2")["weights"]) == 10


RESUME_FILES = {"guest": DATA / "breast_hetero_guest.csv", "host": DATA / "breast_hetero_host.csv"}
RESUME_SETTINGS = dict(epochs=3, checkpoint_every=2)


@pytest.fixture(scope="module")
def uninterrupted(broker, tmp_path_factory) -> Path:
    """The models of a run that never stopped (shared by the resume tests)."""
    import uuid

    folder = tmp_path_factory.mktemp("reference")
    confs = write_configs(folder, f"r{uuid.uuid4().hex[:10]}", broker.bootstrap_servers, RESUME_FILES,
                          **RESUME_SETTINGS)
    finish({n: start(c) for n, c in confs.items()})
    return folder


#: One job, three kill -9s in turn, each party restarted with the same command: the guest in setup (keys
#: persisted and about to be announced, no step checkpoint yet), then the host mid-training (once it has
#: saved step 4), then the guest again (once it has saved step 8).
KILLS = (("guest", "setup"), ("host", 4), ("guest", 8))


@pytest.mark.timeout(1200)   # five process starts (Spark, Ray each)
def test_killed_parties_resume_to_the_same_model(tmp_path, broker, job_id, uninterrupted):
    confs = write_configs(tmp_path, job_id, broker.bootstrap_servers, RESUME_FILES, **RESUME_SETTINGS)
    procs = {n: start(c) for n, c in confs.items()}
    for victim, when in KILLS:
        checkpoints = tmp_path / "out" / victim / "checkpoint"
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            if when == "setup":
                if (checkpoints / "setup.json").exists():
                    break
            else:
                steps = [int(p.stem.split("-")[1]) for p in checkpoints.glob("job-*.json")]
                if steps and max(steps) >= when:
                    break
            time.sleep(0.05)
        assert procs[victim].poll() is None, f"{victim} finished before it could be killed ({when})"
        kill(procs[victim])      # the party and its local Ray die at once
        procs[victim] = start(confs[victim])
    logs: dict[str, str] = {}
    finish(procs, stderr=logs)
    for name in RESUME_FILES:
        assert model(tmp_path, name) == model(uninterrupted, name), f"{name}'s model differs after resume"
    for name, step in (("host", 4), ("guest", 8)):   # each last start resumed from a step checkpoint
        resumed = re.search(rf"{name} resumed from the checkpoint of step (\d+)", logs[name])
        assert resumed and int(resumed.group(1)) >= step, logs[name][-3000:]


def test_an_output_folder_of_another_job_is_refused_by_name(tmp_path, broker, job_id, uninterrupted):
    old_job = json.loads((uninterrupted / "out" / "guest" / "checkpoint" / "setup.json").read_text())["job"]
    confs = write_configs(tmp_path, job_id, broker.bootstrap_servers, RESUME_FILES, **RESUME_SETTINGS)
    text = confs["guest"].read_text().replace('output_dir = "out/guest"',
                                              f'output_dir = "{uninterrupted / "out" / "guest"}"')
    confs["guest"].write_text(text)
    proc = start(confs["guest"])
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 2
    assert f"belongs to job '{old_job}', not '{job_id}'" in stderr and "Traceback" not in stderr


def test_trained_model_predicts_new_rows_jointly(tmp_path, broker, job_id, uninterrupted):
    files = RESUME_FILES   # the models of the uninterrupted run were trained on these
    # new rows of the same 60 ids on both sides (PSI output or aligned files; the demo covers PSI)
    new = {"guest": tmp_path / "guest_new.csv", "host": tmp_path / "host_new.csv"}
    pd.read_csv(files["guest"]).iloc[40:100].drop(columns=["y"]).to_csv(new["guest"], index=False)
    pd.read_csv(files["host"]).iloc[40:100].to_csv(new["host"], index=False)
    folder = tmp_path / "predict"
    confs = write_configs(folder, job_id + "p", broker.bootstrap_servers, new, mode="predict")
    for name in confs:
        model_file = uninterrupted / "out" / name / "model.json"
        confs[name].write_text(confs[name].read_text().replace(
            'mode = "predict"', f'mode = "predict", model = "{model_file}"'))
    metrics = finish({n: start(c) for n, c in confs.items()})
    assert metrics["guest"]["predict"]["rows"] == 60 and metrics["guest"]["predict"]["written"] == 60
    predictions = pd.read_parquet(folder / "out" / "guest" / "predictions")
    rows = pd.read_csv(files["guest"]).iloc[40:100]
    by_key = dict(zip(row_keys(rows["id"]).tolist(), rows["y"]))
    assert sorted(predictions["row_key"]) == sorted(by_key)
    labels = predictions["row_key"].map(by_key).to_numpy()
    assert ((predictions["probability"] > 0.5) == (labels == 1)).mean() > 0.85


def test_a_layout_that_differs_stops_both_parties_before_any_cryptography(tmp_path, broker, job_id):
    host = tmp_path / "host.csv"
    pd.read_csv(DATA / "breast_hetero_host.csv").iloc[1:].to_csv(host, index=False)
    files = {"guest": DATA / "breast_hetero_guest.csv", "host": host}
    confs = write_configs(tmp_path, job_id, broker.bootstrap_servers, files, epochs=1)
    errors = stopped({n: start(c) for n, c in confs.items()}, timeout=300)
    for name, stderr in errors.items():
        assert "partition" in stderr and "both parties must lay out" in stderr, stderr[-2000:]
        assert not (tmp_path / "out" / name / "checkpoint" / "ps").exists()   # stopped before the PS
