"""PSI between two party processes started as `fedps run --conf <party>.toml`, through the broker."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

from fedps.messaging.identity import generate_identity

DATA = Path(__file__).resolve().parents[2] / "data"


def _toml(job: str, name: str, peer: str, peer_key: str, servers: str, data: str, params: str) -> str:
    return f"""[job]
id = "{job}"
algorithm = "psi"
params = {{ input = "{data}", id_column = "id", buckets = 3, batch_size = 64, {params} }}

[party]
name = "{name}"
role = "{name}"
identity_key = "keys/{name}.key"
output_dir = "{name}"

[peers]
{peer} = "{peer_key}"

[kafka]
bootstrap_servers = "{servers}"

[spark]
master = "local[1]"
conf = {{ "spark.sql.shuffle.partitions" = "2" }}
"""


def _command(conf: Path, folder: Path, submit: bool) -> list[str]:
    """``fedps run``, or spark-submit of jobs/psi.py with fedps shipped as ``make dist``'s zip."""
    if not submit:
        return [sys.executable, "-m", "fedps.engine.cli", "run", "--conf", str(conf)]
    root = Path(__file__).resolve().parents[2]
    sys.path.insert(0, str(root / "scripts"))
    import dist

    return [str(Path(sys.executable).with_name("spark-submit")), "--master", "local[1]",
            "--conf", "spark.ui.enabled=false", "--py-files", str(dist.build_zip(folder)),
            str(root / "jobs" / "psi.py"), "--conf", str(conf), "--role", "guest"]


def _start(folder: Path, job: str, servers: str, protocol: str, extra: str,
           submit: bool = False, uris: bool = False) -> dict[str, subprocess.Popen]:
    folder.mkdir()
    guest = pd.read_csv(DATA / "breast_hetero_guest.csv").iloc[:400]
    host = pd.read_csv(DATA / "breast_hetero_host.csv").iloc[250:]
    guest.to_csv(folder / "guest.csv", index=False)
    host.to_csv(folder / "host.csv", index=False)
    keys = {n: generate_identity(folder / "keys" / f"{n}.key") for n in ("guest", "host")}
    procs = {}
    for name, peer in (("guest", "host"), ("host", "guest")):
        conf = folder / f"{name}.toml"
        where = (f'output = "file://{folder}/{name}/psi", work = "file://{folder}/{name}/work", '
                 if uris else "")
        conf.write_text(_toml(job, name, peer, keys[peer], servers, f"{name}.csv",
                              f'{where}protocol = "{protocol}", {extra.replace("<name>", name)}'.rstrip(", ")))
        env = {**os.environ, "PYSPARK_PYTHON": sys.executable, "PYSPARK_DRIVER_PYTHON": sys.executable}
        procs[name] = subprocess.Popen(_command(conf, folder, submit and name == "guest"),
                                       stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    return procs


def _check(folder: Path, procs: dict[str, subprocess.Popen], deadline: float) -> None:
    shared = set(pd.read_csv(folder / "guest.csv")["id"]) & set(pd.read_csv(folder / "host.csv")["id"])
    results = {}
    for name, proc in procs.items():
        out, err = proc.communicate(timeout=max(10.0, deadline - time.monotonic()))
        assert proc.returncode == 0, err[-3000:]
        results[name] = json.loads(out.strip().splitlines()[-1])
    for name, columns in (("guest", {"y", "x9"}), ("host", {"x19"})):
        assert results[name]["psi_intersection"] == len(shared) == 150
        rows = pd.read_parquet(folder / name / "psi" / "rows").sort_values("psi_index")
        assert set(rows["id"].astype(int)) == shared and columns <= set(rows.columns)
        assert list(rows["psi_index"]) == list(range(len(shared)))
        results[name]["order"] = list(rows["id"])
        assert not (folder / name / "psi" / "_work").exists() and not (folder / name / "work").exists()
    assert results["guest"]["order"] == results["host"]["order"]
    assert results["guest"]["psi_digest"] == results["host"]["psi_digest"]


@pytest.mark.timeout(900)
def test_two_process_pairs_align_the_breast_data_with_both_protocols(tmp_path, broker, job_id):
    """Four processes at once: an ECDH pair and an RSA pair (key at the guest; output and work
    folder as file:// URIs). A killed party's resume is tests/psi/test_psi_resume.py."""
    runs = {
        # the ECDH guest under spark-submit, fedps shipped with --py-files (as on a cluster)
        "ecdh": _start(tmp_path / "ecdh", f"{job_id}e", broker.bootstrap_servers, "ecdh", "", submit=True),
        "rsa": _start(tmp_path / "rsa", f"{job_id}r", broker.bootstrap_servers, "rsa",
                      'rsa_bits = 1024, rsa_key_holder = "guest"', uris=True),
    }
    deadline = time.monotonic() + 840  # each process starts its own Spark: slow on a busy machine
    for protocol, procs in runs.items():
        _check(tmp_path / protocol, procs, deadline)


@pytest.mark.timeout(900)
def test_two_processes_align_incrementally_with_ids_added_and_removed(tmp_path, broker, job_id):
    """A first run starts an epoch (each party its own key file); between the runs the guest drops
    shared and unshared ids and the host adds ids the guest has: the second run reuses the epoch,
    sends only the changes, and finds the plain intersection of the new sets."""
    folder = tmp_path / "incremental"
    first = _start(folder, f"{job_id}a", broker.bootstrap_servers, "ecdh", 'key_file = "<name>_psi_key.json"')
    _check(folder, first, time.monotonic() + 400)
    guest, host = pd.read_csv(folder / "guest.csv"), pd.read_csv(folder / "host.csv")
    before = set(guest["id"]) & set(host["id"])
    gone = sorted(before)[:10] + sorted(set(guest["id"]) - before)[:10]   # 10 shared ids, 10 of the guest's own
    guest = guest[~guest["id"].isin(gone)]
    host = pd.concat([host, pd.read_csv(DATA / "breast_hetero_host.csv").iloc[100:110]])   # 10 new ids
    guest.to_csv(folder / "guest.csv", index=False)
    host.to_csv(folder / "host.csv", index=False)
    shared = set(guest["id"]) & set(host["id"])
    assert before - shared and shared - before   # ids left the intersection and others joined it
    procs = {}
    for name in ("guest", "host"):
        conf = folder / f"{name}.toml"
        conf.write_text(conf.read_text().replace(f'id = "{job_id}a"', f'id = "{job_id}b"'))
        procs[name] = subprocess.Popen(_command(conf, folder, False), stdout=subprocess.PIPE,
                                       stderr=subprocess.PIPE, text=True,
                                       env={**os.environ, "PYSPARK_PYTHON": sys.executable})
    for name, proc in procs.items():
        out, err = proc.communicate(timeout=400)
        assert proc.returncode == 0, err[-3000:]
        result = json.loads(out.strip().splitlines()[-1])
        assert result["psi_key"] == "reused" and result["psi_intersection"] == len(shared)
        assert result["psi_messages"]["changes_only"] == 3   # every bucket sent only its changes
        rows = pd.read_parquet(folder / name / "psi" / "rows")
        assert set(rows["id"].astype(int)) == shared
    assert result["psi_blinded"] == {"own": 10, "peer": 0}   # the host's: its 10 new ids, no new guest id
