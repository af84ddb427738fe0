"""Serving fixtures: two parties' model folders, a host store, identities and configurations."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from fedps.messaging.identity import generate_identity

DATA = Path(__file__).parents[2] / "data"
ROWS = 120


@dataclass
class Parts:
    """Both parties' data of the rows served in tests, and the models' weights."""

    ids: list[str]
    xg: np.ndarray
    xh: np.ndarray
    guest_features: list[str]
    host_features: list[str]


def load_parts() -> Parts:
    guest = pd.read_csv(DATA / "breast_hetero_guest.csv").iloc[:ROWS]
    host = pd.read_csv(DATA / "breast_hetero_host.csv").set_index("id").loc[guest["id"]]
    gf = [c for c in guest.columns if c not in ("id", "y")]
    return Parts([str(i) for i in guest["id"]], guest[gf].to_numpy(np.float64), host.to_numpy(np.float64),
                 gf, list(host.columns))


def write_model(folder: Path, job: str, party: str, features: list[str], weights: np.ndarray,
                intercept: float | None) -> Path:
    """A party's output folder as training leaves it: model.json and the job's setup record."""
    (folder / "checkpoint").mkdir(parents=True, exist_ok=True)
    (folder / "model.json").write_text(json.dumps({"party": party, "features": features,
                                                   "weights": [float(w) for w in weights],
                                                   "intercept": intercept}))
    (folder / "checkpoint" / "setup.json").write_text(json.dumps({"job": job}))
    return folder


def weights_for(parts: Parts, seed: int) -> tuple[np.ndarray, float, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.normal(0, 0.05, len(parts.guest_features)), float(rng.normal()), \
        rng.normal(0, 0.05, len(parts.host_features))


def host_parquet(parts: Parts, path: Path, drop_last: int = 0) -> Path:
    table = pa.table({"id": parts.ids[:len(parts.ids) - drop_last],
                      **{f: parts.xh[:len(parts.ids) - drop_last, i] for i, f in enumerate(parts.host_features)}})
    pq.write_table(table, path)
    return path


def one_partition_envs(job: str, names: list[str], xs: dict, feature_keys: dict | None = None) -> dict:
    """Each party's task environment over one partition of ``xs[name]``, linked by in-process transports.

    What predict's partition functions (hetero_lr's ``score_partition``,
    secureboost's ``predict_partition``) need: ``partitions``, ``links`` and ``rows``.
    """
    from fedps.engine.layout import PartitionRows
    from fedps.messaging.transport import in_process_mesh

    mesh = in_process_mesh(job, names)

    class Link:
        def __init__(self, transport) -> None:
            self.t = transport

        def send(self, p, tag, value):
            self.t.send(tag, value)

        def recv(self, p, tag):
            return self.t.recv(tag)

        def flush(self):
            pass

    class Env:
        def __init__(self, me) -> None:
            self.partitions, self.x = [0], xs[me]
            self.fk = (feature_keys or {}).get(me)
            self.links = {peer: Link(t) for peer, t in mesh[me].items()}

        def rows(self, p):
            return PartitionRows(row_keys=np.arange(self.x.shape[0], dtype=np.int64), y=None, x=self.x,
                                 feature_keys=self.fk)

    return {name: Env(name) for name in names}


def batch_predict(job: str, parts: Parts, wg: np.ndarray, b: float, wh: np.ndarray, out: Path) -> np.ndarray:
    """The scores of the batch joint prediction (hetero_lr/predict.py) of these rows, run in-process."""
    return batch_predict_hosts(job, parts.xg, wg, b, {"host": (parts.xh, wh)}, out)


def batch_predict_hosts(job: str, xg: np.ndarray, wg: np.ndarray, b: float,
                        hosts: dict[str, tuple[np.ndarray, np.ndarray]], out: Path) -> np.ndarray:
    """predict.score_partition of every party over one partition, through in-process transports."""
    from fedps.algorithms.hetero_lr.predict import PredictPlan, score_partition
    from fedps.algorithms.hetero_lr.protocol import Roles

    names = sorted(hosts)
    envs = one_partition_envs(job, ["guest", *names], {"guest": xg, **{n: hosts[n][0] for n in names}})
    for name in names:   # hosts only send: run them first
        w = hosts[name][1]
        score_partition(envs[name], PredictPlan(job, Roles(name, "guest", names), tuple(w), 0.0, False, str(out)))
    score_partition(envs["guest"], PredictPlan(job, Roles("guest", "guest", names), tuple(wg), b, False, str(out)))
    return pq.read_table(out / "part-00000.parquet").column("score").to_numpy()


def party_toml(folder: Path, job: str, name: str, role: str, peers: dict[str, str], serving: dict) -> Path:
    rendered = "\n".join(f"{k} = {_toml(v)}" for k, v in serving.items())
    pinned = "\n".join(f'{p} = "{key}"' for p, key in peers.items())
    conf = folder / f"{name}.toml"
    conf.write_text(f"""
[job]
id = "{job}"
algorithm = "hetero_lr"
[party]
name = "{name}"
role = "{role}"
identity_key = "keys/{name}.key"
[peers]
{pinned}
[serving]
{rendered}
""")
    return conf


def _toml(value) -> str:
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{k} = {_toml(v)}" for k, v in value.items()) + " }"
    return json.dumps(value)


@dataclass
class Proc:
    proc: subprocess.Popen
    port: int = 0
    ops: int = 0
    log: Path = field(default_factory=Path)

    def metrics(self) -> str:
        import urllib.request

        return urllib.request.urlopen(f"http://127.0.0.1:{self.ops}/metrics", timeout=5).read().decode()

    def ready(self) -> dict:
        import urllib.request

        return json.loads(urllib.request.urlopen(f"http://127.0.0.1:{self.ops}/readyz", timeout=5).read())

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGCONT)
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


def counter(text: str, name: str, **labels: str) -> float:
    """A Prometheus counter's value, summed over the series that have ``labels``."""
    total = 0.0
    for line in text.splitlines():
        if line.startswith(f"fedps_serving_{name}") and all(f'{k}="{v}"' in line for k, v in labels.items()):
            total += float(line.rsplit(" ", 1)[1])
    return total


def serve(conf: Path, model: Path, ports: Path, timeout: float = 60) -> Proc:
    log = conf.with_suffix(".log")
    env = {**os.environ, "GRPC_VERBOSITY": "ERROR"}
    proc = subprocess.Popen([sys.executable, "-m", "fedps.engine.cli", "serve", "--conf", str(conf),
                             "--model", str(model)], stdout=subprocess.DEVNULL, stderr=log.open("w"), env=env,
                            start_new_session=True)
    deadline = time.monotonic() + timeout
    while not ports.exists() or not ports.read_text():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise AssertionError(f"{conf.name} did not start:\n{log.read_text()[-3000:]}")
        time.sleep(0.05)
    bound = json.loads(ports.read_text())
    return Proc(proc, bound["listen"], bound["ops"], log)


@pytest.fixture(scope="session")
def parts() -> Parts:
    return load_parts()


@pytest.fixture(scope="module")
def identities(tmp_path_factory) -> tuple[Path, dict[str, str]]:
    folder = tmp_path_factory.mktemp("serving")
    keys = {n: generate_identity(folder / "keys" / f"{n}.key") for n in ("guest", "host", "intruder")}
    return folder, keys
