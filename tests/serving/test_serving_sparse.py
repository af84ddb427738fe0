"""Sparse vertical LR (features keyed by id): stores of sparse rows from LibSVM or tag:value files,
scores equal to the batch joint prediction (hetero_lr/predict.py, sparse plan)."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pyarrow.parquet as pq
import pytest
from scipy import sparse as sp

from fedps.engine.formats import tag_id
from fedps.errors import ConfigError
from fedps.serving import config as serving_config
from fedps.serving.client import GuestClient
from fedps.serving.keys import hasher
from fedps.serving.server import start
from fedps.serving.store import build_store
from serving_helpers import counter, one_partition_envs, party_toml, serve, write_model

JOB = "sparse-a"
UNKNOWN = 2


def host_pairs(parts) -> list[tuple[list[int], list[float]]]:
    """Each row's non-negligible host values, keyed by a LibSVM feature id."""
    return [([1000 + 7 * int(j) for j in np.flatnonzero(np.abs(row) > 0.4)], [float(row[j]) for j in
             np.flatnonzero(np.abs(row) > 0.4)]) for row in parts.xh]


def guest_pairs(parts) -> list[tuple[list[str], list[float]]]:
    return [([f"g{j}" for j in np.flatnonzero(np.abs(row) > 0.3)], [float(row[j]) for j in
             np.flatnonzero(np.abs(row) > 0.3)]) for row in parts.xg]


def write_libsvm(path, ids, pairs, drop_last: int = 0):
    lines = [f"{i} " + " ".join(f"{k}:{v!r}" for k, v in zip(*p)) for i, p in zip(ids, pairs)]
    path.write_text("\n".join(lines[:len(lines) - drop_last]) + "\n")
    return path


def write_tag_value(path, ids, pairs):
    path.write_text("id,features\n" + "\n".join(f"{i}," + ";".join(f"{t}:{v!r}" for t, v in zip(*p))
                                                  for i, p in zip(ids, pairs)) + "\n")
    return path


def sparse_model(folder, party: str, ids: list[int], seed: int, intercept: float | None):
    rng = np.random.default_rng(seed)
    (folder / "checkpoint").mkdir(parents=True, exist_ok=True)
    weights = rng.normal(0, 0.3, len(ids))
    (folder / "model.json").write_text(json.dumps({"party": party, "feature_ids": [int(i) for i in ids],
                                                   "weights": weights.tolist(), "intercept": intercept}))
    (folder / "checkpoint" / "setup.json").write_text(json.dumps({"job": JOB}))
    return dict(zip(ids, weights.tolist())), float(intercept or 0.0)


def csr(pairs, key=int):
    """The layout's sparse rows (read_partition): a CSR matrix over the sorted feature ids present."""
    keys = np.array([key(k) for p in pairs for k in p[0]], dtype=np.int64)
    values = np.array([v for p in pairs for v in p[1]])
    indptr = np.r_[0, np.cumsum([len(p[0]) for p in pairs])]
    feature_keys, columns = np.unique(keys, return_inverse=True)
    x = sp.csr_matrix((values, columns.ravel(), indptr), shape=(len(pairs), len(feature_keys)))
    x.sum_duplicates()
    return x, feature_keys


def batch_predict(parties: dict, out) -> np.ndarray:
    """predict.score_partition of both parties (sparse or dense plans) over in-process transports."""
    from fedps.algorithms.hetero_lr.predict import PredictPlan, score_partition
    from fedps.algorithms.hetero_lr.protocol import Roles

    envs = one_partition_envs(JOB, ["guest", "host"], {me: parties[me][0] for me in parties},
                              {me: parties[me][1] for me in parties})
    for me in ("host", "guest"):
        weights, b = parties[me][2:]
        score_partition(envs[me], PredictPlan(JOB, Roles(me, "guest", ["host"]), weights, b,
                                              isinstance(weights, dict), str(out)))
    return pq.read_table(out / "part-00000.parquet").column("score").to_numpy()


def build(conf, source, *extra) -> dict:
    run = subprocess.run([sys.executable, "-m", "fedps.engine.cli", "serve", "--conf", str(conf), "--build-store",
                          str(source), *extra], capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    return json.loads(run.stdout)


def test_a_sparse_host_is_served_from_its_libsvm_rows(identities, parts):
    folder, keys = identities
    pairs = host_pairs(parts)
    present = sorted({k for p in pairs for k in p[0]})
    model_ids = present[1:] + [999_999, 5]           # one present id unknown to the model, two ids never seen
    wh, bh = sparse_model(folder / JOB / "host", "host", model_ids, 3, 0.25)
    wg = np.random.default_rng(4).normal(0, 0.05, len(parts.guest_features))
    write_model(folder / JOB / "guest", JOB, "guest", parts.guest_features, wg, -0.5)
    host_conf = party_toml(folder, JOB, "host", "host", {"guest": keys["guest"]},
                           {"store": "sparse-host.sqlite", "port_file": "sparse-host.ports.json"})
    summary = build(host_conf, write_libsvm(folder / "host.libsvm", parts.ids, pairs, drop_last=UNKNOWN))
    assert summary["sparse"] is True and summary["rows"] == len(parts.ids) - UNKNOWN
    host = serve(host_conf, folder / JOB / "host", folder / "sparse-host.ports.json")
    guest_conf = party_toml(folder, JOB, "guest", "guest", {"host": keys["host"]},
                            {"hosts": {"host": f"127.0.0.1:{host.port}"}, "host_timeout_s": 2.0,
                             "port_file": "sparse-guest.ports.json"})
    try:
        guest = serve(guest_conf, folder / JOB / "guest", folder / "sparse-guest.ports.json")
    except BaseException:
        host.stop()
        raise
    client = GuestClient(f"127.0.0.1:{guest.port}")
    try:
        known = len(parts.ids) - UNKNOWN
        x, fk = csr(pairs[:known])
        want = batch_predict({"host": (x, fk, wh, bh), "guest": (parts.xg[:known], None, tuple(wg), -0.5)},
                             folder / "sparse-predict")
        reply = client.score(parts.ids[:known], parts.xg[:known])
        np.testing.assert_allclose(reply.scores, want, rtol=0, atol=1e-9)
        one = client.score(parts.ids[3:4], parts.xg[3:4])
        assert abs(one.scores[0] - want[3]) < 1e-12
        unknown = client.score(parts.ids[known:], parts.xg[known:])     # serving.unknown_score: 0
        np.testing.assert_allclose(unknown.scores, parts.xg[known:] @ wg - 0.5, atol=1e-12)
        assert counter(host.metrics(), "unknown_ids_total") == UNKNOWN
    finally:
        client.close()
        assert guest.stop() == 0 and host.stop() == 0


def test_a_sparse_guest_reads_its_tag_value_rows_and_mismatched_stores_are_refused(identities, parts):
    folder, keys = identities
    job_dir = folder / "sparse-both"
    gpairs, hpairs = guest_pairs(parts), host_pairs(parts)
    gids = sorted({tag_id(t) for p in gpairs for t in p[0]})
    wg, bg = sparse_model(job_dir / "guest", "guest", gids, 5, -0.1)
    wh, bh = sparse_model(job_dir / "host", "host", sorted({k for p in hpairs for k in p[0]}), 6, None)
    host_conf = party_toml(folder, JOB, "host", "host", {"guest": keys["guest"]},
                           {"store": "both-host.sqlite", "guest": "guest"})
    build_store(write_libsvm(folder / "both-host.txt", parts.ids, hpairs), folder / "both-host.sqlite",
                id_column="id", key_of=hasher("sha256"), id_hash="sha256", fmt="libsvm")   # the command's function
    host = start(*serving_config.load(host_conf), job_dir / "host")
    try:
        guest_conf = party_toml(folder, JOB, "guest", "guest", {"host": keys["host"]},
                                {"hosts": {"host": f"127.0.0.1:{host.port}"}, "store": "both-guest.sqlite"})
        build(guest_conf, write_tag_value(folder / "both-guest.csv", parts.ids, gpairs), "--format", "tag_value")
        guest = start(*serving_config.load(guest_conf), job_dir / "guest")
        try:
            xg, fg = csr(gpairs, tag_id)
            xh, fh = csr(hpairs)
            want = batch_predict({"host": (xh, fh, wh, bh), "guest": (xg, fg, wg, bg)}, folder / "both-predict")
            client = GuestClient(f"127.0.0.1:{guest.port}")
            np.testing.assert_allclose(client.score(parts.ids).scores, want, rtol=0, atol=1e-9)
            client.close()
        finally:
            guest.stop()
        # a dense model on a sparse store, and a sparse model on a dense store: refused at load, by name
        write_model(folder / "dense-host", JOB, "host", parts.host_features, np.zeros(len(parts.host_features)), None)
        with pytest.raises(ConfigError, match="holds sparse rows: build it from the party's Parquet"):
            start(*serving_config.load(host_conf), folder / "dense-host")
    finally:
        host.stop()
