"""Vertical LR on the executor runtime at growing row counts: driver memory, linearity, task speed-up.

    .venv/bin/python bench/scale.py [--rows 100000,1000000] [--key-bits 2048] [--epochs 1]
                                    [--batch 1024] [--quick] [--no-append]

For each row count it writes a synthetic sparse CTR-like data set per party
(LibSVM ``<id> [<label>] <feature id>:<value> ...``, generated with numpy in
chunks into a temporary folder): 20 binary non-zeros a row per party, one per
field, each field a skewed (Zipf-like) vocabulary of ``--vocab`` values whose
ids are hashed into [0, 2^40); the guest's label is drawn from a known
logistic model over both parties' 40 features. Then:

(a)/(b) it trains with two ``fedps run`` processes (guest, host) through an
    embedded broker, each party with one Spark core (``local[1]``, one task a
    stage) and a one-CPU Ray, and records each driver's peak RSS (VmHWM of the
    ``fedps run`` Python process itself, not its JVM or Ray children, polled
    from /proc) and the guest's training seconds per 10^5 rows;
(c) it times one party's executor work of a batch (encrypt the rows' values
    under its own key with CRT, then ``X_pᵀ[[d]]``) as Spark tasks on
    ``local[2]``: the rows in 1 task against the same rows in 2 tasks, warm
    workers, alternated, best of rounds (wall clock);
(d) the default_credit comparison against the commit before the runtime is
    not run by this script (see docs/benchmarks.md).

It also measures the per-core rates that docs/scaling.md sizes a large job
from: CRT encryptions/s, ``Xᵀ[[d]]`` non-zeros/s, decryptions/s, and raw
Kafka bytes/s through the embedded broker. It prints a Markdown section and
appends it, with the command, to docs/benchmarks.md (unless --no-append).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from fedps.messaging.broker import EmbeddedBroker  # noqa: E402
from fedps.messaging.identity import generate_identity  # noqa: E402

FIELDS = 20          # non-zeros a row per party (one per field)
ID_BITS = 40         # hashed feature ids in [0, 2^40)
M64 = np.uint64(0xFFFFFFFFFFFFFFFF)


# ------------------------------------------------------------------ data
def _mix(x: np.ndarray) -> np.ndarray:
    """splitmix64 finaliser over uint64 (wrapping arithmetic)."""
    with np.errstate(over="ignore"):
        x = x + np.uint64(0x9E3779B97F4A7C15)
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return x ^ (x >> np.uint64(31))


def feature_ids(party: int, field: int, index: np.ndarray) -> np.ndarray:
    salt = np.uint64((party << 56) | (field << 40))
    return (_mix(index.astype(np.uint64) | salt) >> np.uint64(64 - ID_BITS)).astype(np.int64)


def generate(folder: Path, rows: int, vocab: int, seed: int = 0, chunk: int = 50_000) -> dict[str, Path]:
    """guest.libsvm (id, label, 20 features) and host.libsvm (id, 20 features); the true model is seeded."""
    rng = np.random.default_rng(seed)
    weights = rng.normal(0.0, 0.25, size=(2, FIELDS, vocab))     # the known logistic model
    bias = -1.0
    files = {"guest": folder / "guest.libsvm", "host": folder / "host.libsvm"}
    handles = {name: path.open("w") for name, path in files.items()}
    fmt = {"guest": "%d %d" + " %d:1" * FIELDS, "host": "%d" + " %d:1" * FIELDS}
    positives = 0
    try:
        for start in range(0, rows, chunk):
            n = min(chunk, rows - start)
            ids = np.arange(start, start + n, dtype=np.int64)
            # skewed vocabulary: index = floor(V * u^3), a few values in most rows, a long tail
            index = np.minimum((vocab * rng.random((2, n, FIELDS)) ** 3).astype(np.int64), vocab - 1)
            logit = bias + sum(weights[p, f][index[p, :, f]] for p in range(2) for f in range(FIELDS))
            y = (rng.random(n) < 1.0 / (1.0 + np.exp(-logit))).astype(np.int64)
            positives += int(y.sum())
            cols = {p: np.stack([feature_ids(p, f, index[p, :, f]) for f in range(FIELDS)], axis=1)
                    for p in range(2)}
            np.savetxt(handles["guest"], np.column_stack([ids, y, cols[0]]), fmt=fmt["guest"])
            np.savetxt(handles["host"], np.column_stack([ids, cols[1]]), fmt=fmt["host"])
    finally:
        for h in handles.values():
            h.close()
    return files | {"positive_rate": positives / rows}


# ------------------------------------------------------------------ two `fedps run` processes
class PeakRSS(threading.Thread):
    """Polls /proc/<pid>/status of one process: the last VmHWM seen is its peak RSS."""

    def __init__(self, pid: int, every: float = 0.2) -> None:
        super().__init__(daemon=True)
        self.pid, self.every, self.hwm_kb, self.alive = pid, every, 0, True

    def run(self) -> None:
        path = f"/proc/{self.pid}/status"
        while self.alive:
            try:
                with open(path) as f:
                    for line in f:
                        if line.startswith("VmHWM:"):
                            self.hwm_kb = max(self.hwm_kb, int(line.split()[1]))
            except (FileNotFoundError, ProcessLookupError):
                return
            time.sleep(self.every)


def run_pair(files: dict[str, Path], settings: dict, folder: Path, tag: str, master: str = "local[1]",
             timeout: float = 3600) -> dict[str, dict]:
    folder.mkdir(parents=True, exist_ok=True)
    keys = {n: generate_identity(folder / f"{n}.key") for n in ("guest", "host")}
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
    with EmbeddedBroker() as broker:
        procs, watchers = {}, {}
        for name in ("guest", "host"):
            other = "host" if name == "guest" else "guest"
            params = ", ".join(f"{k} = {json.dumps(v)}" for k, v in {"train": str(files[name]), **settings}.items())
            conf = folder / f"{name}.toml"
            conf.write_text(f"""[job]\nid = "scale{tag}{int(time.time())}"\nalgorithm = "hetero_lr"
params = {{ {params} }}
[party]\nname = "{name}"\nrole = "{name}"\nidentity_key = "{name}.key"\noutput_dir = "out/{name}"
[peers]\n{other} = "{keys[other]}"\n[kafka]\nbootstrap_servers = "{broker.bootstrap_servers}"
[channel]\nrecv_timeout_s = 3600\n[spark]\nmaster = "{master}"\n[ray]\nobject_store_mb = 100\nnum_cpus = 1
""")
            procs[name] = subprocess.Popen([sys.executable, "-m", "fedps.engine.cli", "run", "--conf", str(conf)],
                                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                           env=env, start_new_session=True, cwd=folder)
            watchers[name] = PeakRSS(procs[name].pid)
            watchers[name].start()
        out = {}
        for name, proc in procs.items():
            stdout, stderr = proc.communicate(timeout=timeout)
            watchers[name].alive = False
            if proc.returncode:
                raise SystemExit(f"{name} failed:\n{stderr[-4000:]}")
            out[name] = json.loads(stdout.strip().splitlines()[-1])
            out[name]["peak_rss_mb"] = watchers[name].hwm_kb / 1024
    return out


# ------------------------------------------------------------------ per-core rates
def _sparse_rows(rows: int, vocab: int, seed: int = 1):
    import scipy.sparse as sp

    rng = np.random.default_rng(seed)
    cols = np.minimum((vocab * rng.random((rows, FIELDS)) ** 3).astype(np.int64), vocab - 1)
    cols = cols + np.arange(FIELDS) * vocab           # one feature per field
    x = sp.csr_matrix((np.ones(rows * FIELDS), cols.ravel(), np.arange(0, rows * FIELDS + 1, FIELDS)),
                      shape=(rows, FIELDS * vocab))
    touched = np.unique(x.indices)
    return x[:, touched]


def rates(key_bits: int, n: int, vocab: int) -> dict[str, float]:
    """Per-core rates in this process (CPU seconds of this thread)."""
    from fedps.algorithms.hetero_lr.protocol import X_FIXED
    from fedps.engine.crypto import Decryptor, Encryptor, generate_keypair, xt_d

    pub, priv = generate_keypair(key_bits)
    enc, dec = Encryptor(pub, private_key=priv), Decryptor(priv)
    enc.encrypt(np.zeros(8))
    values = np.random.default_rng(3).normal(0, 0.5, size=n)
    clock = time.thread_time
    t = clock(); d = enc.encrypt(values); t_enc = clock() - t
    x = _sparse_rows(n, vocab)
    t = clock(); xt_d(x, d, X_FIXED); t_xt = clock() - t
    small = d if n <= 200 else enc.encrypt(values[:200])
    t = clock(); dec.decrypt_exact(small); t_dec = clock() - t
    t = clock(); d.add_plain(values); t_add = clock() - t
    return {"encrypt_per_s": n / t_enc, "xtd_nnz_per_s": x.nnz / t_xt, "xtd_rows_per_s": n / t_xt,
            "decrypt_per_s": 200 / t_dec, "add_plain_per_s": n / t_add, "xtd_columns": x.shape[1]}


def kafka_rate(mb: int = 64, message_kb: int = 512) -> float:
    """Bytes/s of raw kafka-python through the embedded broker, producer and consumer in this process."""
    from kafka import KafkaConsumer, KafkaProducer, TopicPartition
    from kafka.admin import KafkaAdminClient, NewTopic

    payload = os.urandom(message_kb * 1024)
    count = mb * 1024 // message_kb
    with EmbeddedBroker() as broker:
        servers = [broker.bootstrap_servers]
        admin = KafkaAdminClient(bootstrap_servers=servers)
        admin.create_topics([NewTopic("scale-rate", 1, 1)])
        admin.close()
        producer = KafkaProducer(bootstrap_servers=servers, max_request_size=2 << 20, linger_ms=0)
        consumer = KafkaConsumer(bootstrap_servers=servers, enable_auto_commit=False, fetch_max_wait_ms=5,
                                 max_partition_fetch_bytes=8 << 20)
        consumer.assign([TopicPartition("scale-rate", 0)])
        consumer.seek_to_beginning()
        started = time.perf_counter()

        def produce() -> None:
            for _ in range(count):
                producer.send("scale-rate", payload)
            producer.flush()

        sender = threading.Thread(target=produce)
        sender.start()
        got = 0
        deadline = time.monotonic() + 300
        while got < count and time.monotonic() < deadline:
            for records in consumer.poll(timeout_ms=1000).values():
                got += len(records)
        seconds = time.perf_counter() - started
        sender.join()
        count = got
        producer.close()
        consumer.close()
    return count * len(payload) / seconds


# ------------------------------------------------------------------ (c) executor speed-up
def _party_batch_task(n: int, pq: tuple[int, int]):
    def work(payload) -> float:
        from fedps.algorithms.hetero_lr.protocol import X_FIXED
        from fedps.engine.crypto import xt_d
        from fedps.engine.crypto.spark import _worker_encryptor

        values, x = payload
        started = time.process_time()
        d = _worker_encryptor(n, pq, None).encrypt(values)
        xt_d(x, d, X_FIXED)
        return time.process_time() - started

    return work


def task_speedup(key_bits: int, rows: int, vocab: int, rounds: int = 3) -> dict[str, float]:
    from pyspark.sql import SparkSession

    from fedps.engine.crypto import generate_keypair
    from fedps.engine.crypto.spark import run_partitions

    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
    pub, priv = generate_keypair(key_bits)
    work = _party_batch_task(int(pub.n), (int(priv.p), int(priv.q)))
    values = np.random.default_rng(5).normal(0, 0.5, size=rows)
    x = _sparse_rows(rows, vocab, seed=2)
    halves = [(values[: rows // 2], x[: rows // 2]), (values[rows // 2:], x[rows // 2:])]
    spark = (SparkSession.builder.master("local[2]").config("spark.ui.enabled", "false")
             .config("spark.python.worker.reuse", "true").getOrCreate())
    spark.sparkContext.setLogLevel("ERROR")
    best = {1: float("inf"), 2: float("inf")}
    cpu = {1: float("inf"), 2: float("inf")}
    try:
        for _ in range(2):   # warm both Python workers (fixed-base tables)
            run_partitions(spark, work, [(values[:16], x[:16]), (values[16:32], x[16:32])])
        for _ in range(rounds):
            for tasks, payloads in ((1, [(values, x)]), (2, halves)):
                t = time.perf_counter()
                seconds = run_partitions(spark, work, payloads)
                best[tasks] = min(best[tasks], time.perf_counter() - t)
                cpu[tasks] = min(cpu[tasks], max(seconds))
    finally:
        spark.stop()
    return {"rows": rows, "wall_1": best[1], "wall_2": best[2], "speedup": best[1] / best[2],
            "cpu_critical_1": cpu[1], "cpu_critical_2": cpu[2], "cpu_speedup": cpu[1] / cpu[2]}


# ------------------------------------------------------------------ main
def loadavg() -> str:
    return ", ".join(f"{v:.1f}" for v in os.getloadavg())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", default="100000,1000000", help="two row counts, small,large")
    parser.add_argument("--key-bits", type=int, default=2048)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--batch", type=int, default=1024)
    parser.add_argument("--partitions", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=5000, help="values per field (20 fields a party)")
    parser.add_argument("--speedup-rows", type=int, default=1600)
    parser.add_argument("--quick", action="store_true", help="smoke run: 4000,8000 rows, 1024-bit keys")
    parser.add_argument("--no-append", action="store_true")
    args = parser.parse_args()
    if args.quick:
        args.rows, args.key_bits, args.speedup_rows, args.vocab = "4000,8000", 1024, 400, 1000
    counts = [int(r) for r in args.rows.split(",")]
    command = "    .venv/bin/python bench/scale.py " + " ".join(sys.argv[1:])
    loads = [loadavg()]
    settings = {"epochs": args.epochs, "batch_size": args.batch, "learning_rate": 0.15, "l2": 0.0001,
                "key_bits": args.key_bits, "d_noise": 0.01, "validation_fraction": 0.1,
                "partitions": args.partitions, "tasks": 1, "loss_every": 1}
    runs = {}
    with tempfile.TemporaryDirectory(prefix="fedps-scale-") as tmp:
        for rows in counts:
            started = time.perf_counter()
            (Path(tmp) / f"data{rows}").mkdir()
            data = generate(Path(tmp) / f"data{rows}", rows, args.vocab)
            gen_s = time.perf_counter() - started
            started = time.perf_counter()
            out = run_pair(data, settings, Path(tmp) / f"run{rows}", str(rows))
            wall = time.perf_counter() - started
            runs[rows] = {"data": data, "out": out, "gen_s": gen_s, "wall_s": wall}
            g = out["guest"]
            print(f"# {rows} rows: wall {wall:.1f} s, guest train {g['train_seconds']} s, "
                  f"peak RSS guest {out['guest']['peak_rss_mb']:.0f} MB host {out['host']['peak_rss_mb']:.0f} MB, "
                  f"AUC {g.get('final', {}).get('auc')}", file=sys.stderr, flush=True)
            loads.append(loadavg())
    per_core = rates(args.key_bits, 400 if args.quick else 1000, args.vocab)
    kafka = kafka_rate(16 if args.quick else 64)
    speed = task_speedup(args.key_bits, args.speedup_rows, args.vocab)
    loads.append(loadavg())
    (ROOT / "out").mkdir(exist_ok=True)
    (ROOT / "out" / "scale.json").write_text(json.dumps(
        {"rows": {r: {k: v for k, v in run.items() if k != "data"} for r, run in runs.items()},
         "rates": per_core, "kafka_bytes_per_s": kafka, "speedup": speed, "args": vars(args)}, indent=1, default=str))
    report = render(args, counts, runs, per_core, kafka, speed, command, loads)
    print(report)
    if not args.no_append:
        with (ROOT / "docs" / "benchmarks.md").open("a") as f:
            f.write("\n" + report)


def render(args, counts, runs, per_core, kafka, speed, command, loads) -> str:
    small, large = counts[0], counts[-1]
    train_rows = {r: r * 0.9 for r in counts}

    def per_1e5(r: int) -> float:
        return runs[r]["out"]["guest"]["train_seconds"] / train_rows[r] * 1e5

    rss = {r: {p: runs[r]["out"][p]["peak_rss_mb"] for p in ("guest", "host")} for r in counts}
    lines = [
        "## Executor runtime (bench/scale.py)", "",
        "Command:", "", command, "",
        f"{platform.machine()}, {os.cpu_count()} cores shared with other engineers' jobs, Python "
        f"{platform.python_version()}, load average (1, 5, 15 min) before / after each run / at the end: "
        + " | ".join(loads) + ".", "",
        f"Synthetic CTR-like data: {FIELDS} binary non-zeros a row per party (one per field, a skewed vocabulary "
        f"of {args.vocab} values per field, ids hashed into [0, 2^40)), the guest's label drawn from a known "
        f"logistic model over all {2 * FIELDS} features (positive rate "
        f"{runs[large]['data']['positive_rate']:.3f}). Two `fedps run` processes through the embedded broker, each "
        f"with `local[1]` Spark (one task a stage) and a 1-CPU Ray; {args.epochs} epoch(s), batches of "
        f"{args.batch}, {args.partitions} partitions, 90% of the rows trained on, {args.key_bits}-bit keys. "
        "Peak RSS is VmHWM of each `fedps run` Python process (the driver), not its JVM or Ray processes.", "",
        "| | " + " | ".join(f"{r:,} rows" for r in counts) + " | ratio | target |",
        "|---|" + "---|" * (len(counts) + 2),
        "| guest driver peak RSS (MB) | " + " | ".join(f"{rss[r]['guest']:.0f}" for r in counts)
        + f" | **{rss[large]['guest'] / rss[small]['guest']:.2f}x** | ≤ 1.2x |",
        "| host driver peak RSS (MB) | " + " | ".join(f"{rss[r]['host']:.0f}" for r in counts)
        + f" | **{rss[large]['host'] / rss[small]['host']:.2f}x** | ≤ 1.2x |",
        "| guest training seconds | " + " | ".join(f"{runs[r]['out']['guest']['train_seconds']:.1f}" for r in counts)
        + " | | |",
        "| seconds per 10^5 training rows | " + " | ".join(f"{per_1e5(r):.1f}" for r in counts)
        + f" | **{per_1e5(large) / per_1e5(small):.2f}x** | ≤ 1.25x |",
        "| whole run, wall (s; layout, keys, evaluation included) | "
        + " | ".join(f"{runs[r]['wall_s']:.0f}" for r in counts) + " | | |",
        "| validation AUC (true model's features, 1 epoch) | "
        + " | ".join(f"{runs[r]['out']['guest'].get('final', {}).get('auc', float('nan')):.4f}" for r in counts)
        + " | | |",
        "",
        f"Where the time went at {large:,} rows (seconds; *task* = summed over the executor tasks, *driver* = "
        "the driver's batch steps):", "",
        "| party | " + " | ".join(["task encrypt", "task X^T d", "driver seal", "driver decrypt", "driver ps"])
        + " |", "|---|---|---|---|---|---|",
    ]
    for p in ("guest", "host"):
        o = runs[large]["out"][p]
        t, d = o.get("task_seconds_by_work", {}), o.get("seconds_by_work", {})
        lines.append(f"| {p} | {t.get('encrypt', 0):.1f} | {t.get('x_times_d', 0):.1f} | {d.get('seal', 0):.1f} | "
                     f"{d.get('decrypt', 0):.1f} | {d.get('ps', 0):.1f} |")
    lines += [
        "",
        f"One party's executor work of a batch ({speed['rows']:,} rows: CRT encryption of one value a row, then "
        f"X_pᵀ[[d]] over {FIELDS} non-zeros a row) as Spark tasks on `local[2]`, the rows in 1 task against "
        "the same rows split over 2 tasks, warm workers, alternated, best of 3:", "",
        "| | 1 task | 2 tasks | speed-up | target |", "|---|---|---|---|---|",
        f"| wall (s) | {speed['wall_1']:.2f} | {speed['wall_2']:.2f} | **{speed['speedup']:.2f}x** | ≥ 1.7x (idle machine) |",
        f"| CPU of the slowest task (s) | {speed['cpu_critical_1']:.2f} | {speed['cpu_critical_2']:.2f} | "
        f"{speed['cpu_speedup']:.2f}x | |",
        "",
        f"Per-core rates in the same run ({args.key_bits}-bit keys, thread CPU time; docs/scaling.md sizes "
        "a large job from these):", "",
        "| operation | per core |", "|---|---|",
        f"| CRT fixed-base encryption | {per_core['encrypt_per_s']:,.0f} /s |",
        f"| X^T[[d]], binary features | {per_core['xtd_nnz_per_s']:,.0f} non-zeros/s "
        f"({per_core['xtd_rows_per_s']:,.0f} rows/s at {FIELDS} a row) |",
        f"| adding a plaintext to a ciphertext | {per_core['add_plain_per_s']:,.0f} /s |",
        f"| CRT decryption | {per_core['decrypt_per_s']:,.0f} /s |",
        f"| raw kafka-python through the embedded broker, 512 KB messages, producer + consumer in one process "
        f"| {kafka / 1e6:.1f} MB/s |",
        "",
    ]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
