"""Online serving latency and throughput next to a plain gRPC echo, in one run.

    .venv/bin/python bench/serving.py [--requests 2000] [--seconds 5] [--window 8] [--rows 20000]
        [--model lr|secureboost] [--trees 20] [--depth 4] [--block 10] [--json FILE]
    .venv/bin/python bench/serving.py --profile [--model ...] [--profile-rows 1]

A guest and one host run as separate ``fedps serve`` processes on loopback (the
host's features in its SQLite store of ``--rows`` rows, 20 features; the guest
sends 10 features of its own with each request). Beside them an echo process
answers the same serialized ScoreRequest with itself over plain gRPC (the
floor: one loopback RPC with that payload, no work). Latency: ``--requests``
sequential requests of 1 row per path, the paths taking turns in blocks of
``--block`` (10) in rotating order, so that each sees the same load; a
relay beside them (a server that forwards each request to the echo: the floor of
any application -> guest -> host design in Python gRPC).
Throughput: 100-row requests for ``--seconds`` with ``--window`` in flight. For the
breakdown, the latency of the guest's own call to the host (mutual TLS, one row) too.
``--model secureboost`` serves a forest instead (``--trees`` of ``--depth``, trained by
the plaintext reference on synthetic rows): one host call per request answers every split.
``--profile``: no network and no other process: the guest's and the host's services in this
process, the guest's call to the host replaced by a direct call of the host's handler; prints
the CPU time of fedps' own code per request (best of 5 rounds) and, when pyinstrument is
importable, where it goes.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fedps.messaging.identity import generate_identity  # noqa: E402
from fedps.serving.client import score_request  # noqa: E402
from fedps.serving.rpc import SCORE  # noqa: E402

GUEST_FEATURES, HOST_FEATURES = 10, 20
ECHO = """
import grpc
from concurrent import futures
h = grpc.method_handlers_generic_handler("fedps.serving.v1.Guest",
    {"Score": grpc.unary_unary_rpc_method_handler(lambda request, context: request)})
server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
server.add_generic_rpc_handlers((h,))
port = server.add_insecure_port("127.0.0.1:0")
server.start()
print(port, flush=True)
server.wait_for_termination()
"""
#: A pass-through: a server whose handler forwards the request to the echo (argv[1]) and returns
#: its answer; the floor of any two-hop design (application -> guest -> host) in Python gRPC.
RELAY = """
import sys, grpc
from concurrent import futures
leaf = grpc.insecure_channel("127.0.0.1:" + sys.argv[1]).unary_unary("/fedps.serving.v1.Guest/Score")
h = grpc.method_handlers_generic_handler("fedps.serving.v1.Guest",
    {"Score": grpc.unary_unary_rpc_method_handler(lambda request, context: leaf(request, timeout=10))})
server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
server.add_generic_rpc_handlers((h,))
port = server.add_insecure_port("127.0.0.1:0")
server.start()
print(port, flush=True)
server.wait_for_termination()
"""


def _model(folder: Path, job: str, party: str, n: int, intercept: float | None, rng) -> Path:
    (folder / "checkpoint").mkdir(parents=True)
    (folder / "checkpoint" / "setup.json").write_text(json.dumps({"job": job}))
    (folder / "model.json").write_text(json.dumps({
        "party": party, "features": [f"{party[0]}{i}" for i in range(n)],
        "weights": rng.normal(0, 0.1, n).tolist(), "intercept": intercept}))
    return folder


def _conf(folder: Path, name: str, peer: str, key: str, serving: str) -> Path:
    conf = folder / f"{name}.toml"
    conf.write_text(f"""[job]\nid = "bench"\n[party]\nname = "{name}"\nrole = "{name}"
identity_key = "{name}.key"\n[peers]\n{peer} = "{key}"\n[serving]\n{serving}\n""")
    return conf


def _start(args: list[str], ports: Path) -> tuple[subprocess.Popen, int]:
    proc = subprocess.Popen([sys.executable, "-m", "fedps.engine.cli", "serve", *args],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            env={**os.environ, "GRPC_VERBOSITY": "ERROR"})
    while not ports.exists() or not ports.read_text():
        if proc.poll() is not None:
            raise SystemExit(f"serve failed: {proc.stderr.read().decode()[-2000:]}")
        time.sleep(0.05)
    return proc, json.loads(ports.read_text())["listen"]


def _forest(folder: Path, rng, rows: int, trees: int, depth: int) -> dict:
    """A SecureBoost model of ``trees`` trees of ``depth``, trained by the plaintext reference (the
    federated trainer's trees, split for split) on synthetic rows; both parties' model.json folders."""
    from fedps.algorithms.secureboost import objective, reference
    from fedps.algorithms.secureboost.binning import merge, sketch
    from fedps.algorithms.secureboost.params import SBParams

    n = min(rows, 5000)
    xg, xh = rng.normal(size=(n, GUEST_FEATURES)), rng.normal(size=(n, HOST_FEATURES))
    y = ((xg[:, :3].sum(axis=1) + xh[:, :5].sum(axis=1) + rng.normal(size=n)) > 0).astype(np.float64)
    params = SBParams(trees=trees, max_depth=depth, max_bin=16, validation_fraction=0.0)
    names = {"guest": [f"g{i}" for i in range(GUEST_FEATURES)], "host": [f"h{i}" for i in range(HOST_FEATURES)]}
    bins = {p: merge([sketch(x)], tuple(names[p]), 16, n) for p, x in (("guest", xg), ("host", xh))}
    keys = np.arange(n, dtype=np.int64)
    model = reference.train({"guest": (bins["guest"], xg), "host": (bins["host"], xh)}, y, keys, params)
    saved = {"guest": {"party": "guest", "algorithm": "secureboost", "features": names["guest"],
                       "splits": model.tables["guest"].to_json(), "objective": params.objective, "num_class": 1,
                       "base_margin": objective.base_margin(params.objective, y, 1), "hosts": ["host"],
                       "trees": [{"class": t["class"], "nodes": {str(k): v for k, v in t["nodes"].items()}}
                                 for t in model.trees]},
             "host": {"party": "host", "algorithm": "secureboost", "features": names["host"],
                      "splits": model.tables["host"].to_json()}}
    for party, body in saved.items():
        (folder / f"{party}-model" / "checkpoint").mkdir(parents=True)
        (folder / f"{party}-model" / "checkpoint" / "setup.json").write_text(json.dumps({"job": "bench"}))
        (folder / f"{party}-model" / "model.json").write_text(json.dumps(body))
    return {"trees": len(model.trees), "guest_splits": len(saved["guest"]["splits"]),
            "host_splits": len(saved["host"]["splits"])}


def deploy(folder: Path, rows: int, model: str = "lr", trees: int = 20,
           depth: int = 4) -> tuple[list[subprocess.Popen], int, int, dict[str, str], list[str], dict]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = np.random.default_rng(0)
    keys = {n: generate_identity(folder / f"{n}.key") for n in ("guest", "host")}
    if model == "secureboost":
        shape = _forest(folder, rng, rows, trees, depth)
    else:
        _model(folder / "guest-model", "bench", "guest", GUEST_FEATURES, 0.1, rng)
        _model(folder / "host-model", "bench", "host", HOST_FEATURES, None, rng)
        shape = {}
    ids = [str(100_000 + i) for i in range(rows)]
    x = rng.normal(size=(rows, HOST_FEATURES))
    pq.write_table(pa.table({"id": ids, **{f"h{i}": x[:, i] for i in range(HOST_FEATURES)}}),
                   folder / "host.parquet")
    host_conf = _conf(folder, "host", "guest", keys["guest"], 'store = "host.sqlite"\nport_file = "host.json"')
    subprocess.run([sys.executable, "-m", "fedps.engine.cli", "serve", "--conf", str(host_conf),
                    "--build-store", str(folder / "host.parquet")], check=True, capture_output=True)
    host, host_port = _start(["--conf", str(host_conf), "--model", str(folder / "host-model")],
                             folder / "host.json")
    guest_conf = _conf(folder, "guest", "host", keys["host"],
                       f'hosts = {{ host = "127.0.0.1:{host_port}" }}\nport_file = "guest.json"\n'
                       'host_timeout_s = 2.0')
    guest, guest_port = _start(["--conf", str(guest_conf), "--model", str(folder / "guest-model")],
                               folder / "guest.json")
    return [guest, host], guest_port, host_port, keys, ids, shape


def host_call(folder: Path, keys: dict[str, str], port: int):
    """The guest's own call to the host (mutual TLS under the guest's identity), for the breakdown."""
    from fedps.messaging.identity import load_identity, parse_public
    from fedps.serving.rpc import PART
    from fedps.serving.tls import PinnedTLS

    tls = PinnedTLS("guest", load_identity(folder / "guest.key"), {"host": parse_public(keys["host"], "host")})
    return tls.channel("host", f"127.0.0.1:{port}").unary_unary(PART)


def latencies(call, request: bytes, n: int) -> list[float]:
    out = []
    for _ in range(n):
        started = time.perf_counter()
        call(request, timeout=10)
        out.append(time.perf_counter() - started)
    return out


def throughput(call, requests: list[bytes], seconds: float, window: int) -> tuple[float, int]:
    """Requests per second with ``window`` in flight (futures from one thread)."""
    done, lock, slots = [0], threading.Lock(), threading.Semaphore(window)

    def finished(future) -> None:
        future.result()
        with lock:
            done[0] += 1
        slots.release()

    started, i = time.perf_counter(), 0
    while time.perf_counter() - started < seconds:
        slots.acquire()
        call.future(requests[i % len(requests)], timeout=30).add_done_callback(finished)
        i += 1
    for _ in range(window):
        slots.acquire()
    elapsed = time.perf_counter() - started
    return done[0] / elapsed, done[0]


def cpu_seconds(pid: int) -> float:
    """User plus system CPU time of a process so far (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def pct(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values) * 1e3, q))


def profile(args: argparse.Namespace) -> None:
    """CPU of the guest's and the host's own code per request, in one thread (see the module doc)."""
    from fedps.serving import config as serving_config
    from fedps.serving.keys import hasher
    from fedps.serving.server import start
    from fedps.serving.store import build_store

    class Caller:   # what the services ask of a gRPC context
        def time_remaining(self) -> float:
            return 5.0

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        rng = np.random.default_rng(0)
        keys = {n: generate_identity(folder / f"{n}.key") for n in ("guest", "host")}
        if args.model == "secureboost":
            _forest(folder, rng, args.rows, args.trees, args.depth)
        else:
            _model(folder / "guest-model", "bench", "guest", GUEST_FEATURES, 0.1, rng)
            _model(folder / "host-model", "bench", "host", HOST_FEATURES, None, rng)
        import pyarrow as pa
        import pyarrow.parquet as pq

        ids = [str(100_000 + i) for i in range(args.rows)]
        x = rng.normal(size=(args.rows, HOST_FEATURES))
        pq.write_table(pa.table({"id": ids, **{f"h{i}": x[:, i] for i in range(HOST_FEATURES)}}),
                       folder / "host.parquet")
        build_store(folder / "host.parquet", folder / "host.sqlite", id_column="id", key_of=hasher("sha256"),
                    id_hash="sha256")
        host = start(*serving_config.load(_conf(folder, "host", "guest", keys["guest"], 'store = "host.sqlite"')),
                     folder / "host-model")
        guest = start(*serving_config.load(_conf(folder, "guest", "host", keys["host"],
                                                 f'hosts = {{ host = "127.0.0.1:{host.port}" }}')),
                      folder / "guest-model")
        try:
            host.service.tls.caller = lambda context: "guest"   # no TLS here: the caller is the guest
            part = host.service.part
            guest.service.calls = {"host": lambda data, timeout: part(data, Caller())}
            rows = args.profile_rows
            requests = [score_request([ids[int(k)] for k in rng.integers(len(ids), size=rows)],
                                      rng.normal(size=(rows, GUEST_FEATURES))) for _ in range(64)]
            n = max(200, args.requests // rows)

            def drive() -> None:
                for i in range(n):
                    guest.service.score(requests[i % 64], Caller())

            drive()
            rounds = []
            for _ in range(5):
                started = time.thread_time()
                drive()
                rounds.append(1e6 * (time.thread_time() - started) / n)
            print(json.dumps({"model": args.model, "rows": rows, "requests": n,
                              "cpu_us_per_request": [round(r, 1) for r in rounds], "best": round(min(rounds), 1),
                              "load_average": os.getloadavg()[0]}))
            try:
                from pyinstrument import Profiler
            except ImportError:
                return
            profiler = Profiler(interval=0.0001)
            profiler.start()
            drive()
            profiler.stop()
            print(profiler.output_text(unicode=False, color=False))
        finally:
            guest.stop()
            host.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--window", type=int, default=8)
    parser.add_argument("--rows", type=int, default=20_000)
    parser.add_argument("--model", choices=("lr", "secureboost"), default="lr",
                        help="the served model: vertical LR, or a SecureBoost forest (--trees of --depth)")
    parser.add_argument("--trees", type=int, default=20)
    parser.add_argument("--depth", type=int, default=4)
    parser.add_argument("--block", type=int, default=10, help="latency requests per path in a row")
    parser.add_argument("--json", help="also write the figures to this file")
    parser.add_argument("--profile", action="store_true", help="in-process CPU profile of fedps' own code")
    parser.add_argument("--profile-rows", type=int, default=1, help="--profile: rows a request")
    args = parser.parse_args()
    if args.profile:
        profile(args)
        return
    import grpc

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        procs, guest_port, host_port, keys, ids, shape = deploy(folder, args.rows, args.model, args.trees,
                                                                args.depth)
        echo = subprocess.Popen([sys.executable, "-c", ECHO], stdout=subprocess.PIPE, text=True)
        echo_port = int(echo.stdout.readline())
        relay = subprocess.Popen([sys.executable, "-c", RELAY, str(echo_port)], stdout=subprocess.PIPE, text=True)
        relay_port = int(relay.stdout.readline())
        try:
            rng = np.random.default_rng(1)
            serve = grpc.insecure_channel(f"127.0.0.1:{guest_port}").unary_unary(SCORE)
            plain = grpc.insecure_channel(f"127.0.0.1:{echo_port}").unary_unary(SCORE)
            relayed = grpc.insecure_channel(f"127.0.0.1:{relay_port}").unary_unary(SCORE)
            one = [score_request([ids[int(rng.integers(len(ids)))]], rng.normal(size=(1, GUEST_FEATURES)))
                   for _ in range(64)]
            hundred = [score_request([ids[int(k)] for k in rng.integers(len(ids), size=100)],
                                     rng.normal(size=(100, GUEST_FEATURES))) for _ in range(64)]
            from fedps.serving.keys import hasher
            from fedps.serving.rpc import pb

            part = host_call(folder, keys, host_port)
            part_one = [pb.PartRequest(model_version="bench", keys=hasher("sha256")(ids[int(k)]),
                                       request_id=f"{i:032x}").SerializeToString()
                        for i, k in enumerate(rng.integers(len(ids), size=64))]
            for call, request in ((serve, one[0]), (plain, one[0]), (relayed, one[0]), (part, part_one[0])):
                latencies(call, request, 200)   # warm up: connections, TLS to the host, caches
            lat: dict[str, list[float]] = {"serve": [], "echo": [], "relay": [], "host_part": []}
            paths = [("serve", serve, one), ("echo", plain, one), ("relay", relayed, one),
                     ("host_part", part, part_one)]
            load_start = os.getloadavg()[0]
            for block in range(args.requests // args.block):   # small blocks, rotating order: the same load for all
                turn = block % len(paths)
                for name, call, requests in paths[turn:] + paths[:turn]:
                    lat[name] += latencies(call, requests[block % len(requests)], args.block)
            rates, cpu = {}, {}
            watched = {"serve": {"guest": procs[0].pid, "host": procs[1].pid, "client": os.getpid()},
                       "echo": {"echo": echo.pid, "client": os.getpid()}}
            for name, call in (("serve", serve), ("echo", plain)):
                before = {who: cpu_seconds(pid) for who, pid in watched[name].items()}
                rates[name] = throughput(call, hundred, args.seconds, args.window)
                cpu[name] = {who: round(1e3 * (cpu_seconds(pid) - before[who]) / rates[name][1], 3)
                             for who, pid in watched[name].items()}
        finally:
            echo.kill()
            relay.kill()
            for proc in procs:
                proc.send_signal(signal.SIGTERM)
            for proc in procs:
                proc.wait(timeout=30)
    result = {
        "one_row_ms": {name: {"p50": round(pct(v, 50), 3), "p99": round(pct(v, 99), 3)} for name, v in lat.items()},
        "p99_ratio": round(pct(lat["serve"], 99) / pct(lat["echo"], 99), 2),
        "p50_ratio": round(pct(lat["serve"], 50) / pct(lat["echo"], 50), 2),
        "relay_p99_ratio": round(pct(lat["relay"], 99) / pct(lat["echo"], 99), 2),
        "hundred_rows": {name: {"requests_per_s": round(r, 1), "rows_per_s": round(100 * r),
                                "cpu_ms_per_request": cpu[name]} for name, (r, _) in rates.items()},
        "requests": args.requests, "seconds": args.seconds, "window": args.window, "store_rows": args.rows,
        "model": args.model, **({"forest": shape} if shape else {}),
        "block": args.block, "load_average_start": load_start, "load_average": os.getloadavg()[0],
        "cores": os.cpu_count(),
    }
    print(json.dumps(result, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
