"""OT PSI (RR22, SecretFlow's library through the relay) against ECDH, side by side in one run.

    .venv/bin/python bench/psi_ot.py --n 100000 --rounds 2
    .venv/bin/python bench/psi_ot.py --n 100000 1000000 --rounds 1
    .venv/bin/python bench/psi_ot.py --relay 20000 100000 --rounds 2

``--relay``: the library alone (no Spark, no fedps job), its own loopback
sockets against its blackbox link through two relays over a real sealed
PSI link on the embedded broker; prints the library's own PSI time
(``library_s``, without process start and library load) for each, and
ECDH's ceiling measured just before and after (one hash to curve and two
X25519 per id on one core, no transport: no ECDH PSI can beat it).

Needs the OT venv (``make ot-env``). Both parties run the whole PSI job
(``fedps.algorithms.psi.run``: read, stage, buckets, output) as threads of
this process, through real sealed channels on the embedded broker, sharing
one ``local[2]`` SparkSession and one executor task each (``tasks = 1``).
Each party has ``n`` integer ids, half of them shared. In each round the
protocols run one after the other, their order alternating between rounds,
with the 1-minute load average before each run (the machine is shared);
Spark reads the inputs once before the first run, so that run does not pay
its warm-up alone.
``ids/s per core`` is ``n / wall`` (2n ids on 2 cores), as in bench/psi.py;
``buckets ids/s per core`` counts the bucket phase alone (the protocol),
where read, staging and output (the same for both) are left out.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fedps.algorithms.psi import ot  # noqa: E402
from fedps.engine import config as config_module  # noqa: E402
from fedps.engine.config import SparkConfig  # noqa: E402
from fedps.engine.runner import PartyContext  # noqa: E402
from fedps.engine.session import start_spark  # noqa: E402
from fedps.messaging.broker import EmbeddedBroker  # noqa: E402
from fedps.messaging.channel import Channel  # noqa: E402
from fedps.messaging.config import ChannelConfig, KafkaConfig  # noqa: E402
from fedps.messaging.identity import generate_identity  # noqa: E402


def make_ids(folder: Path, n: int, seed: int) -> tuple[dict[str, Path], int]:
    rng = np.random.default_rng(seed)
    shared = n // 2
    pool = np.unique(rng.integers(10**11, 10**12, size=int(2.2 * n)))[: 2 * n - shared]
    rng.shuffle(pool)
    sides = {"guest": np.concatenate([pool[:shared], pool[shared:n]]),
             "host": np.concatenate([pool[:shared], pool[n:2 * n - shared]])}
    folder.mkdir(parents=True, exist_ok=True)
    paths = {}
    for name, ids in sides.items():
        paths[name] = folder / f"{name}.parquet"
        pd.DataFrame({"id": ids, "x0": np.arange(len(ids), dtype=np.float64)}).to_parquet(paths[name])
    return paths, shared


def run_pair(spark, folder: Path, servers: str, paths: dict[str, Path], job: str, params: dict) -> dict:
    """Both parties' PSI of ``job`` as threads; their metrics and the wall of the whole job."""
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
                "job": {"id": job, "algorithm": "psi", "params": {"input": str(paths[name]), **params}},
                "party": {"name": name, "role": name, "output_dir": str(out)}})
            with Channel(job, name, peer, channel_config).open() as channel:
                context = PartyContext(config, {peer: channel}, out, _spark=spark)
                psi.run(context)
                results[name] = context.metrics
        except BaseException as exc:  # noqa: BLE001 - raised below
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


def library_pair(folder: Path, n: int, transport: str, servers: str = "") -> dict:
    """One library session of ``n`` ids a side (half shared), no Spark: ``direct`` (the library's own
    loopback sockets) or ``relay`` (blackbox HTTP to fedps's relays over a real sealed PSI link)."""
    import socket
    import subprocess

    from fedps.algorithms.psi.ot.relay import Relay
    from fedps.messaging.partitioned import PartitionLink, ensure_topics, link_spec
    from fedps.messaging.tags import Scope

    job = f"bench-lib-{transport}-{n}-{int(time.time())}"
    folder = folder / job
    folder.mkdir(parents=True)
    rng = np.random.default_rng(n)
    pool = np.unique(rng.integers(10**11, 10**12, size=int(2.2 * n)))[: 2 * n - n // 2]
    sides = {"guest": pool[:n], "host": np.concatenate([pool[: n // 2], pool[n:]])}
    for name, values in sides.items():
        (folder / f"{name}.csv").write_text("id\n" + "".join(f"x{str(v).encode().hex()}\n" for v in values))
    relays, links, channels = {}, [], []
    if transport == "relay":
        public = {p: generate_identity(folder / "keys" / f"{p}.key") for p in sides}
        opened = {}
        for me, peer in (("guest", "host"), ("host", "guest")):
            config = ChannelConfig(kafka=KafkaConfig(bootstrap_servers=servers),
                                   identity_key=str(folder / "keys" / f"{me}.key"), peers={peer: public[peer]},
                                   state_dir=str(folder / "state" / me))
            opened[me] = Channel(job, me, peer, config)
        opener = threading.Thread(target=opened["guest"].open)
        opener.start()
        opened["host"].open()
        opener.join()
        channels = list(opened.values())
        for me, peer in (("guest", "host"), ("host", "guest")):
            spec = link_spec(opened[me], 1, label="psi")
            ensure_topics(spec)
            link = PartitionLink(spec).open()
            links.append(link)
            relays[me] = Relay(me, peer, Scope(job, "ot").at(iteration=0),
                               send=lambda tag, value, link=link: link.send(0, tag, value),
                               recv=lambda tag, seconds, link=link: link.recv(0, tag, timeout=seconds),
                               token="bench", wait_s=600).start()
    ports = []
    for _ in sides:
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            ports.append(f"127.0.0.1:{probe.getsockname()[1]}")
    processes = []
    started = time.perf_counter()
    for rank, name in enumerate(sides):
        spec = {"parties": list(sides), "rank": rank, "token": "bench", "session": job, "protocol": "RR22",
                "receiver_rank": 0, "broadcast": True, "input": str(folder / f"{name}.csv"),
                "output": str(folder / f"{name}.out.csv"), "recv_timeout_ms": 600_000,
                "transport": relays[name].address if relays else "", "direct": None if relays else ports}
        (folder / f"{name}.json").write_text(json.dumps(spec))
        log = (folder / f"{name}.log").open("wb")
        processes.append(subprocess.Popen([str(ot.check_installed()), "-I", str(ot.WORKER), str(folder / f"{name}.json")],
                                          stdout=log, stderr=log, env={**os.environ, "TMPDIR": str(folder)}))
    codes = [p.wait() for p in processes]
    wall = time.perf_counter() - started
    for relay in relays.values():
        relay.close()
    for link in links:
        link.close()
    for channel in channels:
        channel.close()
    if any(codes):
        raise SystemExit(f"library {transport} run failed: {codes}; see {folder}")
    counts = json.loads((folder / "guest.out.csv.json").read_text())
    if counts["intersection"] != n // 2:
        raise SystemExit(f"library {transport}: {counts['intersection']} in common, expected {n // 2}")
    return {"transport": transport, "ids_per_party": n, "load_1min": round(os.getloadavg()[0], 1),
            "library_s": counts["seconds"], "load_library_s": counts["load_s"], "processes_wall_s": round(wall, 2),
            "frames": relays["guest"].stats if relays else None}


def ecdh_floor_per_core(count: int = 2000) -> float:
    """ECDH's ceiling, ids/s on one core: one hash to curve and two X25519 per id, nothing else."""
    from fedps.algorithms.psi import ecdh

    secret = ecdh.new_secret()
    started = time.perf_counter()
    points = [ecdh.encode_to_curve(str(i).encode()) for i in range(count)]
    hashed = time.perf_counter() - started
    started = time.perf_counter()
    ecdh.blind_all(secret, points, count)
    multiplied = time.perf_counter() - started
    return count / (hashed + 2 * multiplied)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, nargs="+", default=[100_000], help="ids per party (several: one each)")
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--buckets", type=int, default=2)
    parser.add_argument("--ecdh-max", type=int, default=10**7, help="skip ECDH above this many ids")
    parser.add_argument("--relay", type=int, nargs="*", default=[],
                        help="only the library, no Spark: direct sockets against the relay at these sizes")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(message)s")
    logging.getLogger("kafka").setLevel(logging.CRITICAL)
    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
    ot.check_installed()
    if args.relay:
        with tempfile.TemporaryDirectory() as tmp, EmbeddedBroker() as broker:
            for n in args.relay:
                for round_ in range(args.rounds):
                    for transport in (("direct", "relay") if round_ % 2 == 0 else ("relay", "direct")):
                        floor = ecdh_floor_per_core()
                        row = library_pair(Path(tmp), n, transport, broker.bootstrap_servers)
                        floor = (floor + ecdh_floor_per_core()) / 2   # before and after, averaged
                        rate = n / row["library_s"]   # 2n ids on 2 cores
                        print(json.dumps({"round": round_, **row, "library_ids_per_s_per_core": round(rate),
                                          "ecdh_floor_ids_per_s_per_core": round(floor),
                                          "library_over_ecdh_floor": round(rate / floor, 1)}), flush=True)
        return 0
    spark = start_spark(SparkConfig(master="local[2]", conf={"spark.sql.shuffle.partitions": "8"}))
    rows = []
    with tempfile.TemporaryDirectory() as tmp, EmbeddedBroker() as broker:
        folder = Path(tmp)
        for n in args.n:
            paths, expected = make_ids(folder / f"ids-{n}", n, seed=n)
            for path in paths.values():   # warm Spark up, so the first protocol run does not pay for it
                spark.read.parquet(str(path)).count()
            for round_ in range(args.rounds):
                order = ["ot", "ecdh"] if round_ % 2 == 0 else ["ecdh", "ot"]
                for protocol in order:
                    if protocol == "ecdh" and n > args.ecdh_max:
                        continue
                    load = os.getloadavg()[0]
                    result = run_pair(spark, folder, broker.bootstrap_servers, paths,
                                      f"bench-ot-{protocol}-{n}-{round_}",
                                      {"protocol": protocol, "buckets": args.buckets, "tasks": 1,
                                       "local_below": 0})
                    found = result["guest"]["psi_intersection"]
                    if found != expected or result["host"]["psi_intersection"] != expected:
                        raise SystemExit(f"{protocol}: PSI found {found}, expected {expected}")
                    timings = result["guest"]["psi_timings"]
                    row = {"protocol": protocol, "ids_per_party": n, "round": round_, "intersection": found,
                           "load_1min": round(load, 1), "wall_s": round(result["wall_s"], 1),
                           "buckets_s": timings.get("buckets"),
                           "ids_per_s_per_core": round(n / result["wall_s"]),
                           "buckets_ids_per_s_per_core": round(n / timings["buckets"]) if timings.get("buckets") else None,
                           "guest_timings": timings, "messages": result["guest"]["psi_messages"]}
                    rows.append(row)
                    print(json.dumps(row), flush=True)
    spark.stop()
    print("\n| ids per party | round | protocol | load (1 min) | PSI wall | ids/s per core "
          "| bucket phase | bucket ids/s per core |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['ids_per_party']:,} | {r['round']} | {r['protocol']} | {r['load_1min']} | {r['wall_s']} s "
              f"| {r['ids_per_s_per_core']:,} | {r['buckets_s']} s | {r['buckets_ids_per_s_per_core']:,} |")
    for n in args.n:
        for round_ in range(args.rounds):
            pair = {r["protocol"]: r for r in rows if r["ids_per_party"] == n and r["round"] == round_}
            if len(pair) == 2:
                print(f"n={n:,} round {round_}: OT/ECDH whole job {pair['ecdh']['wall_s'] / pair['ot']['wall_s']:.1f}x, "
                      f"bucket phase {pair['ecdh']['buckets_s'] / pair['ot']['buckets_s']:.1f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
