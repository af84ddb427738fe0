"""FedAvg: secure against plain aggregation, where one executor beats data-parallel, and quality.

    .venv/bin/python bench/fedavg.py rounds [--parties 10] [--params 1000000] [--rounds 4] [--where | --steps]
                                            [--modes both|plain|secure] [--slice-values N]
    .venv/bin/python bench/fedavg.py switch [--copies 1 8 32]
    .venv/bin/python bench/fedavg.py quality

``rounds``: a coordinator process and a process of ``--parties`` party threads,
every message on sealed channels through one embedded broker; each party's
"training" adds a random update to the model (so the figure is the
aggregation protocol, not SGD). One plain job and one secure job in the same
run; the median round time of each, their ratio, and the coordinator's peak
memory against the model's size, two ways: tracemalloc's peak (every Python
and numpy allocation of the coordinator process during the job) and the peak
resident set size above the one when the job starts (sampled every 5 ms).
``--where`` instead snapshots tracemalloc at each new peak and lists the
largest allocation sites (the snapshots themselves inflate the figures);
``--steps`` gives the exact peak inside each of the coordinator's steps.
The same bench runs against the code before the one-topic broadcast (it
passes ``broadcast`` only where the roles take one), for before/after runs.

``switch``: a party's local round (score + E epochs of LR) on local[2] Spark,
single-executor against data-parallel, on default_credit's horizontal guest
split copied ``--copies`` times.

``quality``: breast (2 parties) and default_credit (3 parties), secure
aggregation, parties as threads over the in-process transport with the
executors' own training code; test AUC of the global model against the same
model trained centrally on all rows.
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import json
import multiprocessing as mp
import statistics
import sys
import tempfile
import threading
import time
import types
import uuid
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fedps.algorithms.fedavg.params import FedAvgParams  # noqa: E402
from fedps.algorithms.fedavg.protocol import Coordinator, Party  # noqa: E402

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


class MemoryStore:
    def __init__(self) -> None:
        self.theta: np.ndarray | None = None
        self.round = 0

    def current(self):
        return self.round, self.theta

    def apply(self, round_: int, step: np.ndarray) -> np.ndarray:
        """In place, as a PS shard adds a step (the coordinator's PS is in its own processes in a job)."""
        if self.theta is None:
            self.theta = step.copy()
        else:
            self.theta += step
        self.round = round_
        return self.theta


class RandomUpdates:
    features = ("x",)

    def __init__(self, seed: int) -> None:
        self.rng = np.random.default_rng(seed)

    def evaluate(self, theta, round_=None):
        return {"rows": 100, "auc": 0.5, "loss": 0.69, "accuracy": 0.5}

    def train(self, theta, round_):
        return 1000, theta + self.rng.normal(0, 0.01, theta.size)


def _channel_config(folder: Path, me: str, peers: list[str], servers: str):
    from fedps.messaging.config import ChannelConfig, KafkaConfig

    publics = json.loads((folder / "publics.json").read_text())
    return ChannelConfig(kafka=KafkaConfig(bootstrap_servers=servers), identity_key=str(folder / f"{me}.key"),
                         peers={p: publics[p] for p in peers},
                         state_dir=str(folder / "state" / me), recv_timeout_s=600)


def _takes_broadcast(role: type) -> bool:
    return "broadcast" in inspect.signature(role).parameters


def _rss() -> int:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * 4096


class _Peaks:
    """Samples the resident set size every 5 ms (and, with ``where``, snapshots tracemalloc at new peaks)."""

    def __init__(self, where: bool, frames: int = 1) -> None:
        import tracemalloc

        self.tracemalloc, self.where, self.frames = tracemalloc, where, max(frames, 16 if where else 1)
        self.base = _rss()
        self.peak = self.base
        self.snapshot = None
        self._best = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def __enter__(self) -> "_Peaks":
        self.tracemalloc.start(self.frames)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.traced_peak = self.tracemalloc.get_traced_memory()[1]
        self.tracemalloc.stop()

    def _sample(self) -> None:
        while not self._stop.wait(0.005):
            self.peak = max(self.peak, _rss())
            if self.where:
                current = self.tracemalloc.get_traced_memory()[0]
                if current > self._best * 1.05:
                    self._best = current
                    self.snapshot = self.tracemalloc.take_snapshot()

    def sites(self, count: int = 12) -> list[str]:
        return [] if self.snapshot is None else _sites(self.snapshot, count)


def _sites(snapshot, count: int) -> list[str]:
    stats = snapshot.statistics("traceback")[:count]
    return [f"{s.size / 2**20:.1f} MiB in {s.count} blocks: " + " <- ".join(
        f"{Path(f.filename).name}:{f.lineno}" for f in list(s.traceback)[::-1][:6]) for s in stats]


def _warm() -> None:
    """A tiny secure job over the in-process transport, so the measured job imports nothing new."""
    import pandas  # noqa: F401 - pyarrow's conversions import it on first use
    import scipy.stats  # noqa: F401

    from fedps.messaging import codec
    from fedps.messaging.transport import in_process_mesh

    codec.decode(codec.encode(np.zeros(3)))
    mesh = in_process_mesh("w", ["coord", "a", "b"])
    params = FedAvgParams(rounds=1, min_parties=2, deadline_s=30.0)
    extra = {}
    if _takes_broadcast(Coordinator):
        from fedps.messaging.broadcast import InProcessBroadcast

        extra["broadcast"] = InProcessBroadcast("w", "coord")
    threads = [threading.Thread(target=Party("w", n, mesh[n]["coord"], params, RandomUpdates(i), **extra).run)
               for i, n in enumerate(("a", "b"))]
    for t in threads:
        t.start()
    Coordinator("w", mesh["coord"], params, MemoryStore(), initial=lambda f: np.zeros(10), **extra).run()
    for t in threads:
        t.join()


def _coordinator_process(folder: str, servers: str, job: str, names: list[str], params: dict, size: int,
                         where: bool, out: mp.Queue, by_step: bool = False, broadcast_chunk: int = 0) -> None:
    from contextlib import ExitStack

    from fedps.messaging.channel import Channel

    config = _channel_config(Path(folder), "coord", names, servers)
    import fedps.algorithms.fedavg as fedavg

    if hasattr(fedavg, "channel_settings"):   # the coordinator's small fetches, as `fedps run` sets them
        config = dataclasses.replace(config, **fedavg.channel_settings(
            types.SimpleNamespace(party=types.SimpleNamespace(role="coordinator"))))
    with ExitStack() as stack:
        channels = {n: stack.enter_context(Channel(job, "coord", n, config).open()) for n in names}
        extra = {}
        if _takes_broadcast(Coordinator):
            from fedps.messaging.broadcast import BroadcastSender

            import fedps.algorithms.fedavg.protocol as protocol

            chunk = broadcast_chunk or getattr(protocol, "BROADCAST_CHUNK_BYTES", None)   # the code before: none
            sender = BroadcastSender.beside(channels[names[0]], chunk) if chunk else \
                BroadcastSender.beside(channels[names[0]])
            extra["broadcast"] = stack.enter_context(sender.open())
        coordinator = Coordinator(job, channels, FedAvgParams(**params), MemoryStore(),
                                  initial=lambda features: np.zeros(size), **extra)
        _warm()
        steps = _step_peaks(coordinator, sites=where) if by_step else {}
        with _Peaks(where) as peaks:
            coordinator.run()
    out.put({"round_s": [r.seconds for r in coordinator.results], "peak_bytes": peaks.traced_peak,
             "rss_peak_bytes": peaks.peak - peaks.base, "rss_base_bytes": peaks.base, "sites": peaks.sites(),
             "step_peaks": steps})


def _step_peaks(coordinator: Coordinator, sites: bool) -> dict[str, Any]:
    """tracemalloc's peak (MiB) inside each of the coordinator's steps, and between them (``--steps``).

    Each step resets the peak, so this exact per-step figure replaces the
    sampled snapshots' guess of when the peak happens; with ``--where`` too,
    what is held entering the broadcast and the update steps is listed.
    """
    import tracemalloc

    peaks: dict[str, Any] = {}
    seconds: dict[str, float] = {}
    peaks["seconds in each step, all rounds"] = seconds

    def note(name: str) -> None:
        if tracemalloc.is_tracing():
            peaks[name] = max(peaks.get(name, 0.0), round(tracemalloc.get_traced_memory()[1] / 2**20, 1))

    def wrap(name_of, method):
        def step(*args, **kwargs):
            note("between steps")
            held = tracemalloc.get_traced_memory()[0]
            key = f"held entering {name_of(args)}"
            if sites and held > peaks.get(key, (0,))[0]:   # what is held at the largest entry so far
                peaks[key] = (held, _sites(tracemalloc.take_snapshot(), 8))
            tracemalloc.reset_peak()
            started = time.perf_counter()
            try:
                return method(*args, **kwargs)
            finally:
                note(name_of(args))
                seconds[name_of(args)] = round(seconds.get(name_of(args), 0.0) + time.perf_counter() - started, 2)
                tracemalloc.reset_peak()
        return step

    coordinator._broadcast = wrap(lambda a: "broadcast", coordinator._broadcast)
    coordinator._gather = wrap(lambda a: f"read {a[3]}", coordinator._gather)
    coordinator.store.apply = wrap(lambda a: "store.apply", coordinator.store.apply)
    return peaks


def _parties_process(folder: str, servers: str, job: str, names: list[str], params: dict) -> None:
    from contextlib import ExitStack

    from fedps.messaging.channel import Channel

    def play(i: int, name: str) -> None:
        with ExitStack() as stack:
            link = stack.enter_context(
                Channel(job, name, "coord", _channel_config(Path(folder), name, ["coord"], servers)).open())
            extra = {}
            if _takes_broadcast(Party):
                from fedps.messaging.broadcast import BroadcastReceiver

                extra["broadcast"] = stack.enter_context(BroadcastReceiver.beside(link).open())
            Party(job, name, link, FedAvgParams(**params), RandomUpdates(i), **extra).run()

    threads = [threading.Thread(target=play, args=(i, n)) for i, n in enumerate(names)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


def bench_rounds(args: argparse.Namespace) -> dict:
    from fedps.messaging.broker import EmbeddedBroker
    from fedps.messaging.identity import generate_identity

    load_start = _load()
    names = [f"p{i:02d}" for i in range(args.parties)]
    size = args.params - 1          # the update carries the row count as one more value
    results = {}
    ctx = mp.get_context("spawn")
    with EmbeddedBroker() as broker, tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        publics = {name: generate_identity(folder / f"{name}.key") for name in ["coord", *names]}
        (folder / "publics.json").write_text(json.dumps(publics))
        for secure in {"both": (False, True), "plain": (False,), "secure": (True,)}[args.modes]:
            job = f"b{uuid.uuid4().hex[:10]}"
            params = dict(rounds=args.rounds, secure=secure, min_parties=args.parties // 2 + 1, deadline_s=300.0)
            if args.slice_values:   # only when asked: the code before the slices has no such key
                params["slice_values"] = args.slice_values
            out = ctx.Queue()
            coordinator = ctx.Process(target=_coordinator_process,
                                      args=(tmp, broker.bootstrap_servers, job, names, params, size, args.where, out,
                                            args.steps, args.broadcast_chunk))
            parties = ctx.Process(target=_parties_process, args=(tmp, broker.bootstrap_servers, job, names, params))
            coordinator.start()
            parties.start()
            got = out.get(timeout=3600)
            coordinator.join()
            parties.join()
            results["secure" if secure else "plain"] = got
    model_bytes = args.params * 8
    # the first round of a job also creates the topics' readers and warms the clients: left out
    median = {k: statistics.median(v["round_s"][1:] or v["round_s"]) for k, v in results.items()}
    plain, secure = median.get("plain", float("nan")), median.get("secure", float("nan"))
    masking_s, unmasking_s = _masking_costs(args.parties, args.params)
    return {"parties": args.parties, "parameters": args.params, "rounds": args.rounds,
            "load_average_at_start": load_start, "load_average": _load(),
            "plain_round_s": round(plain, 2), "secure_round_s": round(secure, 2),
            "overhead": round(secure / plain, 2),
            "coordinator_peak_mb": {k: round(v["peak_bytes"] / 2**20, 1) for k, v in results.items()},
            "peak_over_model": {k: round(v["peak_bytes"] / model_bytes, 2) for k, v in results.items()},
            "coordinator_rss_growth_mb": {k: round(v["rss_peak_bytes"] / 2**20, 1) for k, v in results.items()},
            "rss_growth_over_model": {k: round(v["rss_peak_bytes"] / model_bytes, 2) for k, v in results.items()},
            "coordinator_rss_at_start_mb": {k: round(v["rss_base_bytes"] / 2**20, 1) for k, v in results.items()},
            "peak_sites": {k: v["sites"] for k, v in results.items() if v["sites"]},
            "step_peaks_mb": {k: v.get("step_peaks") for k, v in results.items() if v.get("step_peaks")},
            "all_round_s": {k: [round(s, 2) for s in v["round_s"]] for k, v in results.items()},
            "one_party_masking_s": round(masking_s, 3), "coordinator_unmasking_s": round(unmasking_s, 3)}


def _load() -> list[str]:
    with open("/proc/loadavg") as handle:
        return handle.read().split()[:3]


def _masking_costs(parties: int, size: int) -> tuple[float, float]:
    """One party's quantise + mask (one thread), and the coordinator's removal of the self masks."""
    from fedps.algorithms.fedavg import secagg

    secrets_ = {f"p{i:02d}": secagg.RoundSecrets.fresh() for i in range(parties)}
    publics = {n: s.public()[1] for n, s in secrets_.items()}
    update = np.random.default_rng(0).normal(0, 0.01, size)
    tick = time.perf_counter()
    q = secagg.quantise(update, 24, 2.0 ** 30)
    secagg.mask(q, secrets_["p00"], {p: k for p, k in publics.items() if p != "p00"}, "j", 0, "p00")
    masking = time.perf_counter() - tick
    total = np.zeros(size, dtype=np.uint64)
    tick = time.perf_counter()
    for name, s in secrets_.items():
        secagg.add_prg(total, s.self_seed, secagg.self_label("j", 0, name), negate=True)
    return masking, time.perf_counter() - tick


def bench_switch(args: argparse.Namespace) -> dict:
    import pandas as pd

    from fedps.algorithms.fedavg.local import SparkData
    from fedps.engine.config import SparkConfig
    from fedps.engine.layout import build_layout
    from fedps.engine.session import start_spark, stop_spark

    spark = start_spark(SparkConfig(master="local[2]", conf={"spark.sql.shuffle.partitions": "4"}))
    base = pd.read_csv(SHARED / "default_credit_homo_guest.csv")
    rows = []
    try:
        with tempfile.TemporaryDirectory() as tmp:
            for copies in args.copies:
                frame = pd.concat([base.assign(id=base["id"].astype(str) + f"-{c}") for c in range(copies)])
                source = Path(tmp) / f"rows{copies}.csv"
                frame.to_csv(source, index=False)
                layout = build_layout(spark, str(source), folder=str(Path(tmp) / f"layout{copies}"), partitions=4,
                                      id_column="id", label_column="y")
                times = {}
                for mode in ("single", "parallel"):
                    data = SparkData(spark, layout, FedAvgParams(executor_mode=mode, local_epochs=1, batch_size=64))
                    theta = np.zeros(data.spec.size)
                    data.evaluate(theta, 0)              # warm: Python workers, layout cache
                    tick = time.perf_counter()
                    for r in range(args.repeats):
                        data.evaluate(theta, r)
                    times[mode] = (time.perf_counter() - tick) / args.repeats
                rows.append({"training_rows": data.train_rows, "single_s": round(times["single"], 2),
                             "parallel_s": round(times["parallel"], 2),
                             "parallel_speedup": round(times["single"] / times["parallel"], 2)})
    finally:
        stop_spark(spark)
    return {"switch": rows}


class FrameData:
    """A party's rows in memory, trained with the executors' code (one task, as executor_mode = single)."""

    def __init__(self, frame, params: FedAvgParams, seed: int) -> None:
        from fedps.algorithms.fedavg.model import ModelSpec

        rng = np.random.default_rng(seed)
        valid = rng.random(len(frame)) < params.validation_fraction
        x, y = frame.drop(columns=["id", "y"]).to_numpy(float), frame["y"].to_numpy(float)
        self.x, self.y, self.vx, self.vy = x[~valid], y[~valid], x[valid], y[valid]
        self.features = tuple(c for c in frame.columns if c not in ("id", "y"))
        self.spec = ModelSpec(params.model, len(self.features), params.hidden)
        self.params = params

    def evaluate(self, theta, round_=None):
        from fedps.algorithms.fedavg.local import evaluate_scores

        return evaluate_scores(self.spec.scores(theta, self.vx), self.vy)

    def train(self, theta, round_):
        from fedps.algorithms.fedavg.model import train

        p = self.params
        return len(self.y), train(self.spec, theta, self.x, self.y, epochs=p.local_epochs, batch_size=p.batch_size,
                                  learning_rate=p.learning_rate, l2=p.l2, mu=p.fedprox_mu, seed=p.seed * 1000 + round_)


def _federated(datasets: list[FrameData], params: FedAvgParams) -> np.ndarray:
    from fedps.messaging.transport import in_process_mesh

    names = [f"party{i}" for i in range(len(datasets))]
    mesh = in_process_mesh("q", ["coord", *names])
    spec = datasets[0].spec
    from fedps.messaging.broadcast import InProcessBroadcast

    hub = InProcessBroadcast("q", "coord")
    coordinator = Coordinator("q", mesh["coord"], params, MemoryStore(), initial=lambda f: spec.initial(params.seed),
                              broadcast=hub)
    threads = [threading.Thread(target=Party("q", n, mesh[n]["coord"], params, d, broadcast=hub).run, daemon=True)
               for n, d in zip(names, datasets)]
    for t in threads:
        t.start()
    theta = coordinator.run()
    for t in threads:
        t.join()
    return theta


def bench_quality(args: argparse.Namespace) -> dict:
    import pandas as pd

    from fedps.algorithms.fedavg.model import auc, train

    cases = {
        "breast": (["breast_homo_guest", "breast_homo_host"], "breast_homo_test",
                   {"lr": dict(rounds=20, local_epochs=1, learning_rate=0.05),
                    "mlp": dict(rounds=20, local_epochs=1, learning_rate=0.05)}),
        "default_credit": (["default_credit_homo_guest", "default_credit_homo_host_1", "default_credit_homo_host_2"],
                           "default_credit_homo_test",
                           {"lr": dict(rounds=10, local_epochs=1, learning_rate=0.02, batch_size=64),
                            "mlp": dict(rounds=30, local_epochs=2, learning_rate=0.1, batch_size=64)}),
    }
    out = {}
    for name, (files, test_file, per_model) in cases.items():
        for model, settings in per_model.items():
            params = FedAvgParams(min_parties=len(files), model=model, hidden=8, seed=1, **settings)
            datasets = [FrameData(pd.read_csv(SHARED / f"{f}.csv"), params, i) for i, f in enumerate(files)]
            tick = time.perf_counter()
            theta = _federated(datasets, params)
            seconds = time.perf_counter() - tick
            spec = datasets[0].spec
            x = np.vstack([d.x for d in datasets])
            y = np.concatenate([d.y for d in datasets])
            central = train(spec, spec.initial(params.seed), x, y, epochs=params.rounds * params.local_epochs,
                            batch_size=params.batch_size, learning_rate=params.learning_rate, seed=7)
            test = pd.read_csv(SHARED / f"{test_file}.csv")
            tx, ty = test.drop(columns=["id", "y"]).to_numpy(float), test["y"].to_numpy(float)
            fed_auc, central_auc = auc(spec.scores(theta, tx), ty), auc(spec.scores(central, tx), ty)
            out[f"{name}/{model}"] = {"parties": len(files), "rounds": params.rounds,
                                      "federated_test_auc": round(fed_auc, 4), "central_test_auc": round(central_auc, 4),
                                      "difference": round(fed_auc - central_auc, 4), "seconds": round(seconds, 1)}
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="what", required=True)
    rounds = sub.add_parser("rounds")
    rounds.add_argument("--parties", type=int, default=10)
    rounds.add_argument("--params", type=int, default=1_000_000)
    rounds.add_argument("--rounds", type=int, default=4)
    rounds.add_argument("--where", action="store_true", help="list the largest allocation sites at the peak")
    rounds.add_argument("--steps", action="store_true", help="tracemalloc's peak inside each coordinator step")
    rounds.add_argument("--modes", choices=("both", "plain", "secure"), default="both")
    rounds.add_argument("--broadcast-chunk", type=int, default=0,
                        help="record bytes of the model's broadcast (0: the coordinator's default)")
    rounds.add_argument("--slice-values", type=int, default=0,
                        help="values per update message (params.slice_values; 0: the default)")
    switch = sub.add_parser("switch")
    switch.add_argument("--copies", type=int, nargs="+", default=[1, 8, 32])
    switch.add_argument("--repeats", type=int, default=2)
    sub.add_parser("quality")
    args = parser.parse_args()
    result = {"rounds": bench_rounds, "switch": bench_switch, "quality": bench_quality}[args.what](args)
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
