"""PSI throughput: ECDH and RSA between two parties, against a plain Spark hash join.

    .venv/bin/python bench/psi.py --ecdh 1000000 --rsa 100000
    .venv/bin/python bench/psi.py --small 2 --ecdh 0 --rsa 0
    .venv/bin/python bench/psi.py --incremental 100000 --ecdh 0 --rsa 0
    .venv/bin/python bench/psi.py --incremental 20000 --incremental-protocol rsa --ecdh 0 --rsa 0
    .venv/bin/python bench/psi.py --overhead 125000 --ecdh 0 --rsa 0

``--incremental n``: incremental ECDH (``job.params.key_file``): a first run
with ``n`` ids a party starts an epoch; then each party adds 1% new ids
(half of them shared) and the same set is aligned from scratch (no key
file) and incrementally (the epoch's key and cached sets), side by side in
the same minutes; prints the ratio of the walls and the points blinded.

``--small k``: the demo's PSI (the breast data, 569 ids a side) as two
``fedps run`` processes, against an empty run of the same job
(``dry_run = true``: Spark and the channels started, settings compared,
nothing computed), alternated ``k`` times; prints the ratio of the walls.

Both parties run as threads of this process through real sealed channels on
the embedded broker and share one ``local[2]`` SparkSession, so the figures
are for the whole job (both parties) on 2 cores. Each party has ``n``
integer ids, half of them shared. The no-privacy floor is an inner join of
the same two Parquet files in the same Spark. Prints one JSON line per run
and a Markdown table.

The crypto floor is the time the unavoidable public-key work takes at the
single-core rates measured in the same run (``crypto_floor_s``: the
unpinned rate times the cores, the definition of the earlier tables), and
with each CPU at its own rate, measured pinned to it before and after the
run (``crypto_floor_per_cpu_s``: the vCPUs of a VM need not be equal, and
an unpinned rate lands on the faster), and in the run itself
(``crypto_floor_in_run_s``: the CPU time the tasks spent in the public-key
steps, ``psi_messages.crypto_ms``, over the cores: the VM's speed drifts by
a third within minutes, which rates taken before and after cannot see).
Efficiency is floor / wall.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import logging
import multiprocessing
import os
import resource
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fedps.engine import config as config_module  # noqa: E402
from fedps.engine.config import SparkConfig  # noqa: E402
from fedps.engine.runner import PartyContext  # noqa: E402
from fedps.engine.session import start_spark  # noqa: E402
from fedps.messaging.broker import EmbeddedBroker  # noqa: E402
from fedps.messaging.channel import Channel  # noqa: E402
from fedps.messaging.config import ChannelConfig, KafkaConfig  # noqa: E402
from fedps.messaging.identity import generate_identity  # noqa: E402


def make_ids(folder: Path, n: int, overlap: float, seed: int) -> dict[str, Path]:
    rng = np.random.default_rng(seed)
    shared = int(n * overlap)
    pool = np.unique(rng.integers(10**11, 10**12, size=int(2.2 * n)))[: 2 * n - shared]
    rng.shuffle(pool)
    sides = {"guest": np.concatenate([pool[:shared], pool[shared:n]]),
             "host": np.concatenate([pool[:shared], pool[n:2 * n - shared]])}
    paths = {}
    for name, ids in sides.items():
        paths[name] = folder / f"{name}.parquet"
        pd.DataFrame({"id": ids, "x0": np.arange(len(ids), dtype=np.float64)}).to_parquet(paths[name])
    return paths


def run_pair(spark, folder: Path, servers: str, paths: dict[str, Path], job: str, params: dict) -> dict:
    public = {n: generate_identity(folder / job / "keys" / f"{n}.key") for n in paths}
    results: dict[str, dict] = {}
    errors: list[BaseException] = []

    def party(name: str, peer: str) -> None:
        try:
            from fedps.algorithms import psi

            channel_config = ChannelConfig(
                kafka=KafkaConfig(bootstrap_servers=servers),
                identity_key=str(folder / job / "keys" / f"{name}.key"),
                peers={peer: public[peer]}, state_dir=str(folder / job / "state" / name),
                recv_timeout_s=3600.0)
            out = folder / job / name
            config = config_module.from_mapping({
                "job": {"id": job, "algorithm": "psi",
                        "params": {"input": str(paths[name]), **params.get(name, params)}},
                "party": {"name": name, "role": name, "output_dir": str(out)}})
            with Channel(job, name, peer, channel_config).open() as channel:
                context = PartyContext(config, {peer: channel}, out, _spark=spark)
                psi.run(context)
                results[name] = context.metrics
        except BaseException as exc:
            errors.append(exc)

    started = time.perf_counter()
    threads = [threading.Thread(target=party, args=p) for p in (("guest", "host"), ("host", "guest"))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        raise errors[0]
    return {"wall_s": time.perf_counter() - started, **results}


def hash_join(spark, paths: dict[str, Path]) -> tuple[float, int]:
    started = time.perf_counter()
    guest = spark.read.parquet(str(paths["guest"])).select("id")
    host = spark.read.parquet(str(paths["host"])).select("id")
    count = guest.join(host, "id").count()
    return time.perf_counter() - started, count


def micro(with_rsa: bool = True) -> dict[str, float]:
    """Single-core rates of the primitives (ops per second of CPU time)."""
    from fedps.algorithms.psi import ecdh, rsa

    ids = [str(10**11 + i).encode() for i in range(5000)]
    warm = ecdh.new_secret()
    # the first thousands of calls run slower on these machines
    ecdh.blind_all(warm, (ecdh.encode_to_curve(i) for i in ids[:2000]), 2000)
    t0 = time.process_time()
    points = [ecdh.encode_to_curve(i) for i in ids]
    t1 = time.process_time()
    secret = ecdh.new_secret()
    ecdh.blind_all(secret, points, len(points))  # as the executors call it
    t2 = time.process_time()
    each = {}
    for name, blind in ecdh._BLIND.items():   # both X25519 implementations, side by side
        started = time.process_time()
        blind(secret, points, len(points))
        each[f"x25519_{name}_per_s"] = round(5000 / (time.process_time() - started))
    signs = {}
    if with_rsa:
        key = rsa.PrivateKey.generate(2048)
        values = [key.public.fdh(i.decode()) for i in ids[:300]]
        t3 = time.process_time()
        for v in values:
            key.sign(v)
        signs["rsa2048_crt_sign_per_s"] = round(300 / (time.process_time() - t3))
    return {"hash_to_curve_per_s": round(5000 / (t1 - t0)), "x25519_per_s": round(5000 / (t2 - t1)),
            **signs, **each, "x25519_backend": ecdh.backend()}


def _micro_on(cpu: int, with_rsa: bool) -> dict[str, float]:
    os.sched_setaffinity(0, {cpu})
    return micro(with_rsa)


def micro_per_cpu(with_rsa: bool) -> dict[int, dict[str, float]]:
    """:func:`micro` pinned to each CPU this process may use, one CPU at a time (the others idle).

    The vCPUs of a VM need not be equal: on the development VM one ran X25519 at about 29k/s
    and the other at 29-39k/s, and an unpinned micro rate lands on the faster one, so a floor of
    "cores x the single-core rate" is too low. The per-CPU floor adds up each CPU's own rate.
    """
    cpus = sorted(os.sched_getaffinity(0))
    with concurrent.futures.ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return {cpu: pool.submit(_micro_on, cpu, with_rsa).result() for cpu in cpus}


def crypto_floor_per_cpu_s(protocol: str, n: int, per_cpu: list[dict[int, dict[str, float]]]) -> float:
    """The floor of :func:`crypto_floor_s` with each CPU at its own rate (the mean of the runs of
    ``per_cpu``): the 2n ids' work shared out so that every CPU finishes at once."""
    capacity = 0.0   # ids a second, all CPUs together
    for cpu in per_cpu[0]:
        rate = {k: sum(r[cpu][k] for r in per_cpu) / len(per_cpu) for k in per_cpu[0][cpu] if k != "x25519_backend"}
        if protocol == "ecdh":
            capacity += 1 / (1 / rate["hash_to_curve_per_s"] + 2 / rate["x25519_per_s"])
        else:
            capacity += rate["rsa2048_crt_sign_per_s"]
    return 2 * n / capacity


def bucket_overhead(n: int) -> dict[str, float]:
    """Microseconds per id (CPU time, one process) of each step of one ECDH bucket of ``n`` ids, the
    cryptography and the Python around it, without Spark, broker or peer."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from fedps.algorithms.psi import ecdh
    from fedps.algorithms.psi.stream import from_matrix, is_in, to_matrix, with_seq

    ids = pa.array([str(10**11 + i) for i in range(n)])
    secret = ecdh.new_secret()
    steps, clock = {}, time.process_time()

    def step(name: str) -> None:
        nonlocal clock
        now = time.process_time()
        steps[name] = round((now - clock) * 1e6 / n, 2)
        clock = now

    texts = ids.to_pylist()
    step("to_pylist")
    points = [ecdh.encode_to_curve(i.encode()) for i in texts]
    step("hash_to_curve")
    mine = ecdh.blind_all(secret, points, n)
    step("blind_own")
    table = with_seq({"id": ids, "value": from_matrix(mine)})
    step("to_arrow")
    singles = to_matrix(table.column("value"), 32).view("V32").ravel().tolist()
    step("from_arrow")
    doubles = from_matrix(ecdh.blind_all(secret, singles, n))
    step("raise_peer")
    is_in(doubles, doubles, 32)
    step("match")
    with tempfile.TemporaryDirectory() as tmp:
        pq.write_table(table, f"{tmp}/part.parquet")
    step("parquet")
    return {"bucket_overhead_us_per_id": steps, "ids": n}


def crypto_floor_s(protocol: str, n: int, rate: dict[str, float], cores: int = 2) -> float:
    """Seconds the unavoidable public-key work of both parties takes on ``cores`` cores at the
    single-core ``rate`` measured in this run: ECDH hashes each of the 2n ids once and
    multiplies each twice; RSA signs each of the 2n ids once (the rest is cheap by comparison)."""
    if protocol == "ecdh":
        work = 2 * n / rate["hash_to_curve_per_s"] + 4 * n / rate["x25519_per_s"]
    else:
        work = 2 * n / rate["rsa2048_crt_sign_per_s"]
    return work / cores


def incremental_runs(spark, folder: Path, servers: str, n: int, buckets: int, local_below: int,
                     protocol: str = "ecdh") -> dict:
    """A first run that starts an epoch; then, with 1% new ids a party, from scratch against incremental."""
    folder = folder / "incremental"
    folder.mkdir()
    paths = make_ids(folder, n, 0.5, seed=n + 1)
    added = max(1, n // 100)
    rng = np.random.default_rng(n + 2)
    new = np.unique(rng.integers(10**12, 10**13, size=3 * added))[: 2 * added - added // 2]
    shared, only = new[: added // 2], {"guest": new[added // 2:added], "host": new[added:]}
    later = {}
    for name, path in paths.items():
        frame = pd.read_parquet(path)
        more = np.concatenate([shared, only[name]])
        frame = pd.concat([frame, pd.DataFrame({"id": more, "x0": np.zeros(len(more))})], ignore_index=True)
        later[name] = folder / f"{name}_later.parquet"
        frame.to_parquet(later[name])
    base = {"protocol": protocol, "buckets": buckets, "local_below": local_below, "tasks": 1}
    keys = {name: {"key_file": str(folder / "keys" / f"{name}.json")} for name in paths}

    def pair(job: str, inputs: dict[str, Path], keep: bool) -> dict:
        per_party = {name: {**base, **(keys[name] if keep else {})} for name in inputs}
        return run_pair(spark, folder, servers, inputs, job, per_party)

    first = pair(f"bench-incr-first-{n}", paths, True)
    scratch = pair(f"bench-incr-scratch-{n}", later, False)
    again = pair(f"bench-incr-again-{n}", later, True)
    if scratch["guest"]["psi_intersection"] != again["guest"]["psi_intersection"]:
        raise SystemExit("incremental: the incremental run found another intersection than from scratch")
    return {"protocol": protocol, "incremental_ids_per_party": n, "added_per_party": added,
            "first_wall_s": round(first["wall_s"], 1), "scratch_wall_s": round(scratch["wall_s"], 1),
            "incremental_wall_s": round(again["wall_s"], 1),
            "ratio_incremental_to_scratch": round(again["wall_s"] / scratch["wall_s"], 3),
            "intersection": again["guest"]["psi_intersection"],
            "blinded_scratch_guest": scratch["guest"]["psi_blinded"],
            "blinded_incremental_guest": again["guest"]["psi_blinded"],
            "key": again["guest"]["psi_key"],
            # buckets that sent only the changes (ECDH, both sides kept the same view of the last run)
            "changes_only_buckets": again["guest"]["psi_messages"].get("changes_only", 0),
            "incremental_guest_timings": again["guest"]["psi_timings"],
            "incremental_guest_buckets_ms": {k: v for k, v in again["guest"]["psi_messages"].items()
                                             if k.endswith("_ms")},
            "scratch_guest_timings": scratch["guest"]["psi_timings"],
            "load_average": os.getloadavg()}


def small_runs(rounds: int) -> dict:
    """Wall of the demo's PSI and of an empty run of the same job, two processes each, alternated."""
    import subprocess

    data = Path(__file__).resolve().parents[1] / "data"
    walls: dict[str, list[float]] = {"psi": [], "empty": []}
    with tempfile.TemporaryDirectory() as tmp, EmbeddedBroker() as broker:
        folder = Path(tmp)
        keys = {n: generate_identity(folder / "keys" / f"{n}.key") for n in ("guest", "host")}
        for round_ in range(rounds):
            for kind in ("empty", "psi"):
                job = f"small{round_}{kind}"
                procs = []
                started = time.perf_counter()
                for name, peer in (("guest", "host"), ("host", "guest")):
                    conf = folder / f"{job}-{name}.toml"   # its log: the same name, .log
                    conf.write_text(f"""[job]
id = "{job}"
algorithm = "psi"
params = {{ input = "{data}/breast_hetero_{name}.csv", id_column = "id", dry_run = {str(kind == "empty").lower()} }}
[party]
name = "{name}"
role = "{name}"
identity_key = "{folder}/keys/{name}.key"
output_dir = "{folder}/{job}/{name}"
[peers]
{peer} = "{keys[peer]}"
[kafka]
bootstrap_servers = "{broker.bootstrap_servers}"
""")
                    log = open(folder / f"{job}-{name}.log", "wb")   # files, not pipes: a full pipe blocks
                    procs.append(subprocess.Popen([sys.executable, "-m", "fedps.engine.cli", "run", "--conf",
                                                   str(conf)], stdout=log, stderr=subprocess.STDOUT))
                for proc in procs:
                    if proc.wait():
                        raise SystemExit(f"{job}: a party failed: "
                                         f"{Path(proc.args[-1]).with_suffix('.log').read_text()[-2000:]}")
                walls[kind].append(round(time.perf_counter() - started, 1))
                print(json.dumps({"small_run": kind, "round": round_, "wall_s": walls[kind][-1]}), flush=True)
    ratio = sum(walls["psi"]) / sum(walls["empty"])
    return {"small_runs": walls, "ratio_psi_to_empty": round(ratio, 2)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--ecdh", type=int, default=1_000_000, help="ids per party for ECDH (0: skip)")
    parser.add_argument("--rsa", type=int, default=100_000, help="ids per party for RSA-2048 (0: skip)")
    parser.add_argument("--overlap", type=float, default=0.5)
    parser.add_argument("--buckets", type=int, default=8)
    parser.add_argument("--small", type=int, default=0, help="rounds of the small-run ratio (0: skip)")
    parser.add_argument("--incremental", type=int, default=0,
                        help="ids per party of the incremental run, 1%% added (0: skip)")
    parser.add_argument("--incremental-protocol", choices=("ecdh", "rsa"), default="ecdh",
                        help="the protocol of the incremental run (RSA: 2048-bit keys, the host signs)")
    parser.add_argument("--slots", type=int, default=2,
                        help="task slots of the shared local Spark (local[N]; N above the 2 cores lets a task "
                             "that waits for its peer leave its core to another)")
    parser.add_argument("--tasks", type=int, default=1,
                        help="barrier tasks a party (both parties' together must fit in --slots)")
    parser.add_argument("--overhead", type=int, default=0,
                        help="ids of one ECDH bucket timed step by step in this process (0: skip)")
    parser.add_argument("--local-below", type=int, default=0,
                        help="job.params.local_below for the large runs (0: executors always)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(message)s")
    logging.getLogger("fedps.algorithms.psi").setLevel(os.environ.get("PSI_LOG", "WARNING"))
    logging.getLogger("kafka").setLevel(logging.CRITICAL)
    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
    if args.overhead:
        print(json.dumps(bucket_overhead(args.overhead)), flush=True)
    if args.small:
        print(json.dumps(small_runs(args.small)), flush=True)
    if args.incremental:
        spark = start_spark(SparkConfig(master="local[2]", conf={"spark.sql.shuffle.partitions": "8"}))
        with tempfile.TemporaryDirectory() as tmp, EmbeddedBroker() as broker:
            print(json.dumps(incremental_runs(spark, Path(tmp), broker.bootstrap_servers, args.incremental,
                                              args.buckets, args.local_below, args.incremental_protocol)),
                  flush=True)
    if not (args.ecdh or args.rsa):
        return 0
    rows = []
    before = micro()
    with_rsa = bool(args.rsa)
    before_cpus = micro_per_cpu(with_rsa)
    print(json.dumps({"micro_per_cpu": before_cpus}), flush=True)
    print(json.dumps({"micro_single_core": before}), flush=True)
    if 2 * args.tasks > args.slots:
        raise SystemExit(f"--tasks {args.tasks} a party needs --slots {2 * args.tasks} at least")
    spark = start_spark(SparkConfig(master=f"local[{args.slots}]", conf={"spark.sql.shuffle.partitions": "8"}))
    with tempfile.TemporaryDirectory() as tmp, EmbeddedBroker() as broker:
        folder = Path(tmp)
        for protocol, n in (("ecdh", args.ecdh), ("rsa", args.rsa)):
            if not n:
                continue
            (folder / protocol).mkdir()
            # in a child process, so that this one's peak RSS is the PSI's (both parties' drivers)
            with concurrent.futures.ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
                paths = pool.submit(make_ids, folder / protocol, n, args.overlap, n).result()
            rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
            join_s, expected = hash_join(spark, paths)
            result = run_pair(spark, folder, broker.bootstrap_servers, paths, f"bench-{protocol}-{n}",
                              {"protocol": protocol, "buckets": args.buckets, "rsa_bits": 2048,
                               "local_below": args.local_below, "tasks": args.tasks})
            # both parties share this Spark: their two barrier stages must fit in its slots together
            found = result["guest"]["psi_intersection"]
            if found != expected or result["host"]["psi_intersection"] != expected:
                raise SystemExit(f"{protocol}: PSI found {found}, the join {expected}")
            rates = [before, micro()]
            before = rates[-1]
            rate = {k: sum(r[k] for r in rates) / 2 for k in rates[0] if k != "x25519_backend"}
            floor = crypto_floor_s(protocol, n, rate)
            cpus = [before_cpus, micro_per_cpu(with_rsa)]
            before_cpus = cpus[-1]
            floor_per_cpu = crypto_floor_per_cpu_s(protocol, n, cpus)
            # the public-key steps' own CPU time in the tasks (crypto_ms), at the speed of this run
            floor_in_run = sum(result[p]["psi_messages"].get("crypto_ms", 0) for p in ("guest", "host")) / 1000 \
                / len(os.sched_getaffinity(0))
            row = {"protocol": protocol, "ids_per_party": n, "intersection": expected,
                   "psi_wall_s": round(result["wall_s"], 1),
                   "crypto_floor_s": round(floor, 1), "efficiency": round(floor / result["wall_s"], 2),
                   # each CPU at its own pinned rate (micro_per_cpu): the floor this machine really has
                   "crypto_floor_per_cpu_s": round(floor_per_cpu, 1),
                   "efficiency_per_cpu": round(floor_per_cpu / result["wall_s"], 2),
                   "crypto_floor_in_run_s": round(floor_in_run, 1),
                   "efficiency_in_run": round(floor_in_run / result["wall_s"], 2),
                   "micro_per_cpu": {cpu: {k: v for k, v in r.items() if k.endswith("_per_s")}
                                     for cpu, r in cpus[-1].items()},
                   "micro_mean": {k: round(v) for k, v in rate.items()},
                   "psi_ids_per_s": round(2 * n / result["wall_s"]),
                   "psi_ids_per_s_per_core": round(n / result["wall_s"]),
                   "hash_join_s": round(join_s, 2), "hash_join_ids_per_s": round(2 * n / join_s),
                   "slots": args.slots, "tasks_per_party": args.tasks, "load_average": os.getloadavg(),
                   "guest_timings": result["guest"]["psi_timings"],
                   "bucket_ms": {n: {k: result[n]["psi_messages"].get(k) for k in ("serve_ms", "wait_ms", "send_ms")}
                                 for n in ("guest", "host")},
                   "driver_peak_rss_mb": result["guest"]["psi_driver_peak_rss_mb"],
                   "peak_rss_before_mb": round(rss_before, 1)}
            rows.append(row)
            print(json.dumps(row), flush=True)
    spark.stop()
    print("\n| protocol | ids per party | intersection | PSI wall | PSI ids/s (both parties) "
          "| per core | crypto floor | efficiency | floor, each CPU at its rate | efficiency "
          "| floor in the run | efficiency | Spark hash join | join ids/s |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['protocol']} | {r['ids_per_party']:,} | {r['intersection']:,} | {r['psi_wall_s']} s "
              f"| {r['psi_ids_per_s']:,} | {r['psi_ids_per_s_per_core']:,} | {r['crypto_floor_s']} s "
              f"| {r['efficiency']} | {r['crypto_floor_per_cpu_s']} s | {r['efficiency_per_cpu']} "
              f"| {r['crypto_floor_in_run_s']} s | {r['efficiency_in_run']} "
              f"| {r['hash_join_s']} s | {r['hash_join_ids_per_s']:,} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
