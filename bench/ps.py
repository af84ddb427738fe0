"""Benchmark of the parameter server: keys per second and bytes per touched row.

Pulls and pushes ``--keys`` random keys (ids in [0, 2**62)) from 2 Spark
partitions into a 2-shard table, and does the same operations on a plain
in-process numpy-backed dict in the same run, for the overhead ratio. Also
times the shard's storage without Ray, and a separate process reaching the
shards directly (GCS address) and through the Ray client (``ray://``).

    .venv/bin/python bench/ps.py                 # prints a Markdown section
    .venv/bin/python bench/ps.py --keys 100000   # a quick run
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import platform
import socket
import subprocess
import sys
import time
import tracemalloc
import uuid

import numpy as np

from fedps.engine.config import RayConfig, SparkConfig
from fedps.engine.session import start_ray, start_spark, stop_ray, stop_spark
from fedps.ps import OptimizerConfig, ParameterServer, PSConfig, TableRef, TableSpec
from fedps.ps.shard import Shard

LR = 0.01


def _keys(n: int, part: int | None = None) -> np.ndarray:
    keys = np.random.default_rng(7).integers(0, 2**62, size=n, dtype=np.int64)
    return keys if part is None else np.array_split(keys, 2)[part]


def _grads(n: int, width: int) -> np.ndarray:
    return np.full((n, width), 0.5, dtype=np.float32)


# --- the baseline: a dict from key to row of a numpy array, in this process ---------------


class DictTable:
    """The plain in-process baseline: ``dict`` key -> row, rows in a growing numpy array."""

    def __init__(self, width: int) -> None:
        self.index: dict[int, int] = {}
        self.rows = np.zeros((1024, width), dtype=np.float32)

    def pull(self, keys: np.ndarray) -> np.ndarray:
        slots = np.fromiter((self.index.get(k, -1) for k in keys.tolist()), dtype=np.int64, count=keys.size)
        out = np.zeros((keys.size, self.rows.shape[1]), dtype=np.float32)
        hit = slots >= 0
        out[hit] = self.rows[slots[hit]]
        return out

    def push(self, keys: np.ndarray, grads: np.ndarray) -> None:
        index = self.index
        slots = np.fromiter((index.setdefault(k, len(index)) for k in keys.tolist()), dtype=np.int64, count=keys.size)
        if len(index) > self.rows.shape[0]:
            grown = np.zeros((max(len(index), 2 * self.rows.shape[0]), self.rows.shape[1]), dtype=np.float32)
            grown[: self.rows.shape[0]] = self.rows
            self.rows = grown
        np.add.at(self.rows, slots, -LR * grads)


def _timed(fn, keys: np.ndarray, batch: int, *extra) -> float:
    start = time.perf_counter()
    for i in range(0, keys.size, batch):
        fn(keys[i : i + batch], *[e[i : i + batch] for e in extra])
    return time.perf_counter() - start


def bench_dict(n: int, batch: int, width: int) -> dict:
    keys, grads = _keys(n), _grads(n, width)
    tracemalloc.start()
    table = DictTable(width)
    result = {"pull_cold": _timed(table.pull, keys, batch), "push_cold": _timed(table.push, keys, batch, grads)}
    result.update(pull_warm=_timed(table.pull, keys, batch), push_warm=_timed(table.push, keys, batch, grads))
    result["bytes_per_row"] = tracemalloc.get_traced_memory()[0] / len(table.index)
    tracemalloc.stop()
    return result


def bench_storage(n: int, batch: int, width: int) -> dict:
    """The shard's own code in this process: storage, merge and optimizer, no Ray."""
    spec = TableSpec("w", width=width, optimizer=OptimizerConfig("sgd", learning_rate=LR))
    shard = Shard(PSConfig("local", (spec,), num_shards=1), 0)
    keys, grads = _keys(n), _grads(n, width)

    def pull(k):
        return asyncio.run(shard.pull("w", k))

    def push(k, g):
        asyncio.run(shard.push("w", k, g, None, 0, 0))
        asyncio.run(shard.end_step(shard.step))

    result = {"pull_cold": _timed(pull, keys, batch), "push_cold": _timed(push, keys, batch, grads)}
    result.update(pull_warm=_timed(pull, keys, batch), push_warm=_timed(push, keys, batch, grads))
    rows = shard.tables["w"].rows
    result["bytes_per_row"] = rows.nbytes() / rows.count
    return result


# --- the parameter server from two Spark partitions ----------------------------------------


def _task(ref: TableRef, n: int, batch: int, width: int, op: str, step: int):
    def run(part: int, _rows):
        start = time.perf_counter()
        client = ref.client()
        connected = time.perf_counter()
        keys = _keys(n, part)
        if op == "pull":
            _timed(client.pull, keys, batch)
        elif op == "push":
            grads, seq = _grads(keys.size, width), iter(range(10**9))
            _timed(lambda k, g: client.push(k, g, step=step, worker=part, seq=next(seq)), keys, batch, grads)
        yield {"connect_s": connected - start, "op_s": time.perf_counter() - connected}

    return run


def bench_spark(spark, server: ParameterServer, n: int, batch: int, width: int) -> dict:
    ref = server.ref("w")
    rdd = spark.sparkContext.parallelize([0, 1], 2)

    def job(op: str) -> tuple[float, list[dict]]:
        start = time.perf_counter()
        parts = rdd.mapPartitionsWithIndex(_task(ref, n, batch, width, op, server.step)).collect()
        return time.perf_counter() - start, parts

    _, first = job("connect")
    result = {"first_connect_s": max(p["connect_s"] for p in first)}
    result["empty_job_s"], again = job("connect")
    result["later_connect_s"] = sorted(p["connect_s"] for p in again)
    before = server.table("w").stats()
    for phase in ("cold", "warm"):
        wall, parts = job("pull")
        result[f"pull_{phase}"], result[f"pull_{phase}_tasks"] = wall, max(p["op_s"] for p in parts)
        wall, parts = job("push")
        start = time.perf_counter()
        server.end_step()  # the barrier: shards apply the step's pushes
        result[f"push_{phase}_apply"] = time.perf_counter() - start
        result[f"push_{phase}"] = wall + result[f"push_{phase}_apply"]
        result[f"push_{phase}_tasks"] = max(p["op_s"] for p in parts)
    after = server.table("w").stats()
    rows = sum(s["rows"] for s in after)
    result["rows"] = rows
    result["bytes_per_row"] = sum(s["nbytes"] for s in after) / rows
    result["rss_per_row"] = sum(a["rss"] - b["rss"] for a, b in zip(after, before)) / rows
    return result


# --- a separate process: direct GCS connection vs Ray client ---------------------------------

_REMOTE = """
import json, sys, time, numpy as np, ray
from fedps.ps import TableRef
ps_name, address, n, batch = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
start = time.perf_counter()
ray.init(address=address, namespace="fedps", log_to_driver=False)
client = TableRef(ps_name, "w", "fedps").client()
connect = time.perf_counter() - start
keys = np.random.default_rng(7).integers(0, 2**62, size=n, dtype=np.int64)
grads = np.full((n, client.spec.width), 0.5, dtype=np.float32)
client.pull(keys[:10]); t = time.perf_counter()
for i in range(0, n, batch): client.pull(keys[i:i+batch])
pull = time.perf_counter() - t; t = time.perf_counter()
for i in range(0, n, batch): client.push(keys[i:i+batch], grads[i:i+batch], worker=9, seq=i)
push = time.perf_counter() - t
print(json.dumps({"connect_s": connect, "pull": pull, "push": push}))
"""


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _rss(pid: int) -> int:
    with open(f"/proc/{pid}/status", encoding="ascii") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def bench_remote(server: ParameterServer, gcs: str, n: int, batch: int) -> dict:
    env = {**os.environ, "RAY_AUTH_MODE": os.environ.get("RAY_AUTH_MODE", "disabled")}

    def run(address: str) -> dict:
        args = [sys.executable, "-c", _REMOTE, server.config.name, address, str(n), str(batch)]
        done = subprocess.run(args, env=env, capture_output=True, text=True, timeout=600, check=True)
        return json.loads(done.stdout.strip().splitlines()[-1])

    result = {"direct": run(gcs)}
    port = _free_port()
    proxy = subprocess.Popen(
        [sys.executable, "-m", "ray.util.client.server", "--mode", "legacy", "--address", gcs,
         "--host", "127.0.0.1", "--port", str(port)],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        time.sleep(8)  # the client server connects to the cluster
        result["ray_client"] = run(f"ray://127.0.0.1:{port}")
        result["ray_client_server_rss"] = _rss(proxy.pid)
    finally:
        proxy.kill()
        proxy.wait()
    return result


# --- report --------------------------------------------------------------------------------


def _rate(n: int, seconds: float) -> str:
    return f"{n / seconds / 1e6:.2f} M" if n / seconds >= 1e6 else f"{n / seconds / 1e3:.0f} k"


def report(args, ps: dict, storage: dict, base: dict, remote: dict | None) -> str:
    n = args.keys
    lines = [
        f"{n:,} random keys in [0, 2^62), width {args.width} (float32, SGD), batches of {args.batch:,} keys; "
        "keys/s (higher is better). *cold*: keys never touched (pull computes initial values, push creates "
        "rows); *warm*: the same keys again. PS push includes the step barrier that applies the update.",
        "",
        "| operation | PS: 2 Spark partitions -> 2 shards, whole Spark job | PS: time inside the 2 tasks "
        "| shard code in-process, no Ray | numpy-backed dict in-process | overhead: PS job / dict "
        "| PS tasks / dict |",
        "|---|---|---|---|---|---|---|",
    ]
    for op in ("pull_cold", "push_cold", "pull_warm", "push_warm"):
        lines.append(
            f"| {op.replace('_', ' ')} | {_rate(n, ps[op])} | {_rate(n, ps[op + '_tasks'])} | "
            f"{_rate(n, storage[op])} | {_rate(n, base[op])} | {ps[op] / base[op]:.2f} x "
            f"| {ps[op + '_tasks'] / base[op]:.2f} x |"
        )
    lines += [
        "",
        f"Memory per touched row ({ps['rows']:,} rows): PS row storage {ps['bytes_per_row']:.1f} B "
        f"(shard process RSS growth {ps['rss_per_row']:.1f} B); numpy-backed dict {base['bytes_per_row']:.1f} B "
        "(tracemalloc). First `ray.init(address=...)` + shard lookup in a Spark task: "
        f"{ps['first_connect_s']:.2f} s; in the next job's two tasks "
        f"{' and '.join(f'{t * 1e3:.1f} ms' for t in ps['later_connect_s'])} (a task on a reused Python worker "
        "finds Ray joined and the client cached; one on a new worker joins again). "
        f"A Spark job that only connects takes {ps['empty_job_s']:.2f} s end to end, which bounds the "
        "PS column from below; the *inside the tasks* column is the time the tasks spent pulling or pushing.",
    ]
    if remote:
        d, c = remote["direct"], remote["ray_client"]
        lines += [
            "",
            "From a separate Python process (the executor's view), same keys and batches:",
            "",
            "| path | connect | pull keys/s | push keys/s |",
            "|---|---|---|---|",
            f"| `ray.init(address=<gcs>)` (process on a Ray node) | {d['connect_s']:.2f} s | "
            f"{_rate(n, d['pull'])} | {_rate(n, d['push'])} |",
            f"| Ray client `ray://` (legacy client server) | {c['connect_s']:.2f} s | {_rate(n, c['pull'])} | "
            f"{_rate(n, c['push'])} |",
            "",
            f"The Ray client server process held {remote['ray_client_server_rss'] / 2**20:.0f} MiB RSS "
            "with one client.",
        ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--keys", type=int, default=1_000_000)
    parser.add_argument("--batch", type=int, default=100_000)
    parser.add_argument("--width", type=int, default=1)
    parser.add_argument("--no-remote", action="store_true", help="skip the direct vs ray:// comparison")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    base = bench_dict(args.keys, args.batch, args.width)
    storage = bench_storage(args.keys, args.batch, args.width)
    gcs = start_ray(RayConfig(object_store_mb=256, num_cpus=2))
    spark = start_spark(SparkConfig(master="local[2]"))
    spec = TableSpec("w", width=args.width, optimizer=OptimizerConfig("sgd", learning_rate=LR))
    server = ParameterServer.start(PSConfig(f"bench-{uuid.uuid4().hex[:8]}", (spec,), num_shards=2))
    try:
        ps = bench_spark(spark, server, args.keys, args.batch, args.width)
        remote = None if args.no_remote else bench_remote(server, gcs, args.keys, args.batch)
    finally:
        server.stop()
        stop_spark(spark)
        stop_ray()
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    machine = f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}, load average {load}"
    print(report(args, ps, storage, base, remote))
    print(f"\nMachine: {machine}.")
    print(json.dumps({"ps": ps, "storage": storage, "dict": base, "remote": remote}), file=sys.stderr)


if __name__ == "__main__":
    main()
