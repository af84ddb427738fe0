"""Benchmark SecureBoost's histogram crypto per tree against the straightforward `phe` baseline, in one run.

    .venv/bin/python bench/secureboost.py [--bits 2048] [--data default_credit,breast] [--cores 2]
        [--partitions 2] [--scales 2,4] [--scale-trees 1] [--baseline-rows 200] [--json FILE]

Prints a markdown report for docs/benchmarks.md. Per tree, fedps's side runs
the crypto of fedps.algorithms.secureboost.cipher in Spark tasks (local[cores])
the way the protocol does: the guest's tasks encrypt packed (g, h) of their
partition; the host's tasks, co-partitioned with them (an RDD ``zip``), build
the partition's encrypted histograms for the level's nodes; the host adds the
partials (in the driver here, a reduce in the protocol), derives each larger
sibling as parent minus smaller child, and seals the level's nodes (shuffled
prefix sums, packed, re-randomised); the guest opens them. Sealing and opening
are per-node work, not per-row work, and run in the parties' drivers: on 2
cores a Spark job per level costs more than it saves.
The guest then picks every node's best split from the opened sums (plaintext,
host features only, default direction right: these splits have no missing
values), the host maps the shuffled position back to its bin and routes the
rows. Messages between the parties are carried as bytes through the driver;
the broker is not part of these figures (bench/messaging.py measures it).

The baseline (bench/secureboost_baseline.py) encrypts g and h separately with
`phe`, sums one ciphertext per (node, feature, bin) for every node and
decrypts every sum. It runs on a few nodes (the root and its two children
over ``--baseline-rows`` rows), its sums are checked against fedps's on the
same rows, and its per-operation costs extrapolate a whole tree with the node
sizes of fedps's real trees. Both sides use the same key.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from fedps.algorithms.secureboost.cipher import (  # noqa: E402
    BinPermutation, BinSums, EncryptedHistograms, GHPacker, SealedHistograms, build_histograms, open_histograms,
)
from fedps.engine.crypto import CipherVector, Decryptor, generate_keypair  # noqa: E402

DATA = ROOT.parent / "shared" / "data"
CONFIGS = {"default_credit": {"trees": 5, "depth": 5, "bins": 32},
           "breast": {"trees": 10, "depth": 3, "bins": 32}}
LAMBDA, LEARNING_RATE, MIN_CHILD_WEIGHT = 1.0, 0.3, 1e-3


def load(name: str) -> tuple[np.ndarray, np.ndarray]:
    """Host features and guest labels, aligned by id."""
    import pandas as pd

    guest = pd.read_csv(DATA / f"{name}_hetero_guest.csv").sort_values("id")
    host = pd.read_csv(DATA / f"{name}_hetero_host.csv").sort_values("id")
    if not np.array_equal(guest["id"].to_numpy(), host["id"].to_numpy()):
        raise SystemExit(f"{name}: guest and host ids differ")
    return host.drop(columns=["id"]).to_numpy(np.float64), guest["y"].to_numpy(np.float64)


def quantile_bins(x: np.ndarray, max_bin: int) -> tuple[np.ndarray, list[int]]:
    """Bins per feature from quantile cuts; each feature gets a last (here empty) missing bin."""
    cols, n_bins = [], []
    for j in range(x.shape[1]):
        cuts = np.unique(np.quantile(x[:, j], np.linspace(0, 1, max_bin + 1)[1:-1]))
        cols.append(np.searchsorted(cuts, x[:, j], side="right"))
        n_bins.append(len(cuts) + 2)
    return np.stack(cols, axis=1).astype(np.int64), n_bins


class Timer:
    """Wall seconds per phase, plus the CPU seconds the tasks report."""

    def __init__(self, cores: int = 2) -> None:
        self.wall: dict[str, float] = {}
        self.cores = cores
        self.task_cpu = 0.0
        self.critical = 0.0   # per stage: its slowest task, or its CPU spread over the cores if more

    def tasks(self, cpus: list[float]) -> None:
        self.task_cpu += sum(cpus)
        self.critical += max(max(cpus, default=0.0), sum(cpus) / self.cores)

    def add(self, phase: str, seconds: float) -> None:
        self.wall[phase] = self.wall.get(phase, 0.0) + seconds


def _timed(fn: Any, *args: Any) -> tuple[Any, float]:
    start = time.process_time()
    out = fn(*args)
    return out, time.process_time() - start


class FedpsTree:
    """One party pair's histogram crypto on Spark, level by level (see the module docstring)."""

    guest_siblings = True   # below the roots seal the smaller children only; the guest subtracts (--siblings)

    def __init__(self, sc: Any, keys: tuple[Any, Any], bins: np.ndarray, n_bins: list[int],
                 partitions: int, rng: np.random.Generator) -> None:
        self.sc, (self.pub, self.priv) = sc, keys
        self.bins, self.n_bins, self.rows = bins, n_bins, len(bins)
        self.bounds = np.linspace(0, self.rows, partitions + 1).astype(int)
        self.packer = GHPacker(self.pub, self.rows, private_key=self.priv)
        self.host_rdd = sc.parallelize([(bins[a:b], a, b) for a, b in zip(self.bounds[:-1], self.bounds[1:])],
                                       partitions).cache()
        self.decryptor = Decryptor(self.priv)
        self.host_rdd.count()
        self.rng = rng
        self.first_root: Any = None

    def warm(self) -> None:
        """Build the tables each Python worker caches (CRT for the guest, public for the host)."""
        packer, n = self.packer, self.partitions

        def work(_: int) -> int:
            packer.encrypt(np.zeros(1), np.zeros(1))
            return 0

        self.sc.parallelize(range(4 * n), 4 * n).map(work).collect()
        from fedps.algorithms.secureboost import cipher
        cipher._encryptor(self.pub)  # the host's re-randomisation table (seal runs in the driver)

    @property
    def partitions(self) -> int:
        return len(self.bounds) - 1

    def tree(self, g: np.ndarray, h: np.ndarray, depth: int, timer: Timer) -> tuple[np.ndarray, list[int]]:
        """Grow one tree; returns each row's leaf and the row count of every node that was split.

        A level with nodes to split always builds histograms for them; the last
        level's children are leaves.
        """
        packer, pub, n_bins, bounds = self.packer, self.pub, self.n_bins, self.bounds
        t = time.perf_counter()
        guest = self.sc.parallelize([(g[a:b], h[a:b]) for a, b in zip(bounds[:-1], bounds[1:])], self.partitions)
        ciphers = guest.map(lambda gh: _timed(lambda: packer.encrypt(*gh).to_bytes())).cache()
        timer.tasks(ciphers.map(lambda blob_cpu: blob_cpu[1]).collect())
        joined = self.host_rdd.zip(ciphers)
        timer.add("guest: encrypt (tasks)", time.perf_counter() - t)
        node_of_row = np.zeros(self.rows, dtype=np.int64)
        leaf = np.zeros(self.rows, dtype=np.int64)
        gq, hq = packer.quantize(g, h)
        parents: EncryptedHistograms | None = None
        split_rows: list[int] = []
        build, pairs = [0], []
        for level in range(depth):
            # 1. host tasks: histograms of the nodes to build; the host adds the partials and
            #    derives each larger sibling as parent minus smaller child
            t = time.perf_counter()
            nodes_bc = self.sc.broadcast(node_of_row)
            nodes_now = list(build)

            def work(item: Any, nodes_now: list[int] = nodes_now) -> tuple[bytes, float]:
                (bins_p, a, b), (blob, _) = item

                def run() -> bytes:
                    vec = CipherVector.from_bytes(blob, pub)
                    return build_histograms(vec, bins_p, nodes_bc.value[a:b], nodes_now, n_bins).to_bytes()
                return _timed(run)

            parts = joined.map(work).collect()
            timer.tasks([c for _, c in parts])
            small = EncryptedHistograms.from_bytes(parts[0][0], pub)
            for blob, _ in parts[1:]:
                small = small.add(EncryptedHistograms.from_bytes(blob, pub))
            if pairs:
                assert parents is not None
                siblings = parents.select([p for p, _, _ in pairs]).subtract(
                    small.select([s for _, s, _ in pairs]), nodes=[o for _, _, o in pairs])
                level_hist = EncryptedHistograms.concat([small, siblings])
            else:
                level_hist = small
            nodes_bc.unpersist()
            timer.add("host: histograms (tasks), add, subtract", time.perf_counter() - t)
            # 2. host seals the level's nodes; 3. the guest opens them (per-node work: in the drivers)
            t = time.perf_counter()
            if self.guest_siblings:   # the trainer's way: one shuffle per tree, the smaller children only
                if level == 0:
                    tree_perm = BinPermutation.draw([0], n_bins, self.rng)
                perm = BinPermutation({n: tree_perm.orders[0] for n in level_hist.nodes})
                sealed = (small if pairs else level_hist).seal(perm).to_bytes()
            else:
                perm = BinPermutation.draw(level_hist.nodes, n_bins, self.rng)
                sealed = level_hist.seal(perm).to_bytes()
            timer.add("host: seal", time.perf_counter() - t)
            t = time.perf_counter()
            opened = open_histograms(self.decryptor, SealedHistograms.from_bytes(sealed, pub), packer, quantized=True)
            if self.guest_siblings and pairs:
                for parent, smaller, larger in pairs:
                    opened[larger] = [BinSums(a.G - b.G, a.H - b.H) for a, b in zip(previous[parent], opened[smaller])]
            previous = opened
            timer.add("guest: open", time.perf_counter() - t)
            if self.first_root is None:
                self.first_root = (opened[0], perm, gq, hq)
            # 4. guest picks splits (plaintext); host maps positions to bins and routes rows
            t = time.perf_counter()
            build, pairs, nxt = [], [], np.full(self.rows, -1, dtype=np.int64)
            for node in level_hist.nodes:
                member = node_of_row == node
                best = best_split(opened[node], int(gq[member].sum()), int(hq[member].sum()),
                                  packer.precision_bits)
                if best is None:
                    continue
                f, pos = best
                b = perm.true_bin(node, f, pos)
                left = member & (self.bins[:, f] <= b)
                nxt[left], nxt[member & ~left] = 2 * node + 1, 2 * node + 2
                split_rows.append(int(member.sum()))
                n_left, n_right = int(left.sum()), int((member & ~left).sum())
                smaller, larger = (2 * node + 1, 2 * node + 2) if n_left <= n_right else (2 * node + 2, 2 * node + 1)
                build.append(smaller)
                pairs.append((node, smaller, larger))
            timer.add("guest splits, host routes", time.perf_counter() - t)
            parents, node_of_row = level_hist, nxt
            leaf = np.where(nxt >= 0, nxt, leaf)
            if not build:
                break
        ciphers.unpersist()
        return leaf, split_rows


def best_split(sums: list[Any], g_total: int, h_total: int, frac: int) -> tuple[int, int] | None:
    """The (feature, shown position) of the best gain, or None when no split gains."""
    scale = 2.0 ** -frac
    gt, ht = g_total * scale, h_total * scale
    base = gt * gt / (ht + LAMBDA)
    best, where = 0.0, None
    for f, s in enumerate(sums):
        gl, hl = s.G[:-1].astype(np.float64) * scale, s.H[:-1].astype(np.float64) * scale
        gr, hr = gt - gl, ht - hl
        gain = gl * gl / (hl + LAMBDA) + gr * gr / (hr + LAMBDA) - base
        gain[(hl < MIN_CHILD_WEIGHT) | (hr < MIN_CHILD_WEIGHT)] = -np.inf
        if gain.size and gain.max() > best:
            best, where = float(gain.max()), (f, int(np.argmax(gain)))
    return where


def check_root(state: Any, bins: np.ndarray, n_bins: list[int]) -> None:
    """The first tree's opened root sums equal a numpy oracle of the quantized g, h (exactly)."""
    opened, perm, gq, hq = state
    for f, nb in enumerate(n_bins):
        gb = np.array([gq[bins[:, f] == b].sum() for b in range(nb)])
        hb = np.array([hq[bins[:, f] == b].sum() for b in range(nb)])
        order = list(perm.order(0, f))
        want_g = np.concatenate([np.cumsum(gb[:-1])[order], gb[-1:]])
        want_h = np.concatenate([np.cumsum(hb[:-1])[order], hb[-1:]])
        if not (np.array_equal(opened[f].G, want_g) and np.array_equal(opened[f].H, want_h)):
            raise SystemExit(f"fedps root histogram of feature {f} differs from numpy")


def logistic(y: np.ndarray, pred: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    p = 1.0 / (1.0 + np.exp(-pred))
    return p - y, p * (1.0 - p)


def run_fedps(sc: Any, keys: Any, bins: np.ndarray, n_bins: list[int], y: np.ndarray, trees: int, depth: int,
              partitions: int, cores: int, guest_siblings: bool = True) -> dict[str, Any]:
    """Grow ``trees`` trees; per-tree wall seconds, phase totals and node sizes."""
    load = os.getloadavg()[0]
    model = FedpsTree(sc, keys, bins, n_bins, partitions, np.random.default_rng(5))
    model.guest_siblings = guest_siblings
    model.warm()
    pred = np.zeros(len(y))
    per_tree, cpu, critical, node_rows, timer_all = [], [], [], [], Timer()
    for _ in range(trees):
        timer = Timer(cores)
        g, h = logistic(y, pred)
        start, driver = time.perf_counter(), time.process_time()
        leaf, split_rows = model.tree(g, h, depth, timer)
        per_tree.append(time.perf_counter() - start)
        driver = time.process_time() - driver
        cpu.append(timer.task_cpu + driver)
        critical.append(timer.critical + driver)
        node_rows.append(split_rows)
        for k, v in timer.wall.items():
            timer_all.add(k, v)
        for node in np.unique(leaf):
            m = leaf == node
            pred[m] += -LEARNING_RATE * g[m].sum() / (h[m].sum() + LAMBDA)
        if len(per_tree) == 1:
            check_root(model.first_root, bins, n_bins)
    return {"rows": len(y), "per_tree": per_tree, "task_cpu": cpu, "critical": critical, "node_rows": node_rows,
            "phases": {k: v / trees for k, v in timer_all.wall.items()}, "packer": model.packer.describe(),
            "load": (load + os.getloadavg()[0]) / 2}


def run_baseline(keys: Any, bins: np.ndarray, n_bins: list[int], y: np.ndarray, sample: int) -> dict[str, Any]:
    """The phe baseline on the root and its two children over ``sample`` rows, checked against fedps."""
    import secureboost_baseline as base

    pub, priv = keys
    rng = np.random.default_rng(9)
    rows = np.sort(rng.choice(len(y), size=min(sample, len(y)), replace=False))
    g, h = logistic(y[rows], np.zeros(len(rows)))
    b = bins[rows]
    child = np.where(b[:, 0] <= np.median(b[:, 0]), 1, 2)
    members = {0: np.arange(len(rows)), 1: np.flatnonzero(child == 1), 2: np.flatnonzero(child == 2)}
    sums, costs = base.histograms(pub, priv, g, h, b, members, n_bins)
    # the same nodes with fedps's cipher, un-shuffled by the host's permutation
    packer = GHPacker(pub, len(rows), private_key=priv)
    vec = packer.encrypt(g, h)
    hist = EncryptedHistograms.concat([build_histograms(vec, b, np.zeros(len(rows), np.int64), [0], n_bins),
                                       build_histograms(vec, b, child, [1, 2], n_bins)])
    perm = BinPermutation.draw(hist.nodes, n_bins, rng)
    opened = open_histograms(Decryptor(priv), hist.seal(perm), packer)
    worst = 0.0
    for node in (0, 1, 2):
        for f, nb in enumerate(n_bins):
            for which in (0, 1):  # G, then H
                shown = opened[node][f][which]
                cum = np.empty(nb - 1)
                cum[list(perm.order(node, f))] = shown[:-1]
                per_bin = np.concatenate([np.diff(np.r_[0.0, cum]), shown[-1:]])
                worst = max(worst, float(np.max(np.abs(per_bin - sums[node][f][which]))))
    tolerance = len(rows) * 2.0 ** -packer.precision_bits
    if worst > tolerance:
        raise SystemExit(f"baseline and fedps bin sums differ by {worst} > {tolerance}")
    enc, add, dec = costs.per()
    return {"costs": costs, "rows": len(rows), "max_diff": worst, "enc": enc, "add": add, "dec": dec}


def report(name: str, cfg: dict[str, int], features: int, n_bins: list[int], fed: dict[str, Any],
           base: dict[str, Any], scaled: list[dict[str, Any]], args: argparse.Namespace) -> list[str]:
    import secureboost_baseline as sb

    per_tree = float(np.mean(fed["per_tree"]))
    cpu = float(np.mean(fed["task_cpu"]))
    crit = float(np.mean(fed["critical"]))
    base_trees = [sb.tree_seconds(base["costs"], fed["rows"], nr, features, sum(n_bins)) for nr in fed["node_rows"]]
    base_tree = float(np.mean(base_trees))
    lines = [f"### {name}: {fed['rows']} rows, {features} host features, {cfg['trees']} trees of depth"
             f" {cfg['depth']}, {cfg['bins']} bins (+1 missing), {args.bits}-bit key, local[{args.cores}],"
             f" {args.partitions} partitions", "",
             "| measurement | seconds per tree | ratio |", "|---|---|---|",
             f"| `phe` baseline, extrapolated from {base['rows']} rows x 3 nodes (single process, CPU) |"
             f" {base_tree:.1f} | 1x |",
             f"| fedps, CPU seconds of its tasks and drivers (per-core cost) | {cpu:.2f} |"
             f" {base_tree / cpu:.1f}x |",
             f"| fedps, critical path: slowest task of each stage + drivers (2 idle cores) | {crit:.2f} |"
             f" **{base_tree / crit:.1f}x** |",
             f"| fedps, wall measured (Spark scheduling included; machine load {fed['load']:.0f}) |"
             f" {per_tree:.2f} | {base_tree / per_tree:.1f}x |", ""]
    lines.append("fedps per tree by phase (wall s): " + ", ".join(f"{k} {v:.2f}" for k, v in fed["phases"].items())
                 + f"; trees: {', '.join(f'{t:.2f}' for t in fed['per_tree'])} s; nodes split per tree:"
                 f" {', '.join(str(len(r)) for r in fed['node_rows'])}; packing: {fed['packer']}.")
    lines.append(f"Baseline per op: phe encrypt {base['enc'] * 1e3:.2f} ms, add {base['add'] * 1e6:.1f} us,"
                 f" decrypt {base['dec'] * 1e3:.2f} ms; its bin sums equal fedps's to {base['max_diff']:.2g}"
                 f" (bound {base['rows']} x 2^-{fed['packer']['precision_bits']}).")
    if scaled:
        lines += ["", "| rows | trees | CPU s per tree | CPU s per 1,000 rows | critical path per 1,000 rows"
                  " | wall s per tree (load) |", "|---|---|---|---|---|---|"]
        for s in [fed] + scaled:
            t, c, k = (float(np.mean(s[key])) for key in ("per_tree", "task_cpu", "critical"))
            lines.append(f"| {s['rows']} | {len(s['per_tree'])} | {c:.2f} | {c / s['rows'] * 1e3:.3f} |"
                         f" {k / s['rows'] * 1e3:.3f} | {t:.1f} ({s['load']:.0f}) |")
    return lines + [""]


def run_e2e(spark: Any, name: str, cfg: dict[str, int], bits: int, partitions: int) -> dict[str, Any]:
    """SB-core's federated trainer end to end (both parties as threads, embedded broker, local Ray).

    Seconds per tree are the gaps between the guest's checkpoints after each
    tree (the first tree also carries the stage start-up); setup (keys, layout,
    binning, channels) is reported apart.
    """
    import tempfile

    from fedps.algorithms.secureboost import trainer as trainer_module
    from fedps.algorithms.secureboost.local import run_in_threads
    from fedps.algorithms.secureboost.params import SBParams
    from fedps.engine.config import RayConfig
    from fedps.engine.layout import build_layout
    from fedps.engine.session import start_ray, stop_ray
    from fedps.messaging.broker import EmbeddedBroker
    from fedps.messaging.config import ChannelConfig, KafkaConfig
    from fedps.messaging.identity import generate_identity

    marks: list[float] = []
    original = trainer_module.Trainer.save

    def save(self: Any) -> None:
        original(self)
        if self.job.is_guest:
            marks.append(time.perf_counter())

    trainer_module.Trainer.save = save  # type: ignore[method-assign]
    start_ray(RayConfig(object_store_mb=256, num_cpus=2))
    try:
        with tempfile.TemporaryDirectory() as tmp, EmbeddedBroker() as broker:
            folder = Path(tmp)
            files = {"guest": DATA / f"{name}_hetero_guest.csv", "host": DATA / f"{name}_hetero_host.csv"}
            layouts = {n: build_layout(spark, str(f), folder=str(folder / "layout" / n), partitions=partitions,
                                       id_column="id", label_column="y" if n == "guest" else None,
                                       labels="binary", missing_ok=True) for n, f in files.items()}
            kafka = KafkaConfig(bootstrap_servers=broker.bootstrap_servers)
            public = {n: generate_identity(folder / "keys" / f"{n}.key") for n in files}
            configs = {n: ChannelConfig(kafka=kafka, identity_key=str(folder / "keys" / f"{n}.key"),
                                        peers={p: public[p] for p in files if p != n},
                                        state_dir=str(folder / "state" / n), recv_timeout_s=1800)
                       for n in files}
            params = SBParams(trees=cfg["trees"], max_depth=cfg["depth"], max_bin=cfg["bins"], key_bits=bits,
                              partitions=partitions, tasks=1)
            started = time.perf_counter()
            results = run_in_threads(f"b{os.getpid()}{name[:4]}", configs, layouts,
                                     {"guest": params, "host": params}, folder / "out", spark, timeout_s=7200)
            ended = time.perf_counter()
    finally:
        trainer_module.Trainer.save = original  # type: ignore[method-assign]
        stop_ray()
    errors = {n: repr(r.error) for n, r in results.items() if r.error is not None}
    gaps = np.diff(marks).tolist() if len(marks) > 1 else []
    return {"errors": errors, "total_s": ended - started, "marks": len(marks), "per_tree": gaps,
            "first_tree_end_s": (marks[0] - started) if marks else None,
            "metrics": results["guest"].state.metrics[-1] if results["guest"].state else None}


def run_goss() -> None:
    """Test AUC with and without GOSS, on bench/secureboost_quality.py's split (70/30, seed 0)."""
    import logging

    from secureboost_quality import load as load_joined
    from sklearn.metrics import roc_auc_score

    from fedps.algorithms.secureboost import reference
    from fedps.algorithms.secureboost.binning import merge, sketch
    from fedps.algorithms.secureboost.params import SBParams

    logging.getLogger("fedps.algorithms.secureboost.params").setLevel(logging.ERROR)
    print("| data | trees x depth | top_rate | other_rate | test AUC |\n|---|---|---|---|---|")
    for name, trees, depth in (("breast", 10, 3), ("default_credit", 5, 5)):
        xg, xh, y = load_joined(DATA, name, "id", "y")
        test = np.random.default_rng(0).random(len(y)) < 0.3
        n = int((~test).sum())
        parties = {p: (merge([sketch(x[~test])], tuple(f"{p}{j}" for j in range(x.shape[1])), 32, n, p), x[~test])
                   for p, x in (("guest", xg), ("host", xh))}
        for top, other in ((0.0, 0.0), (0.2, 0.1), (0.3, 0.2)):
            params = SBParams(trees=trees, max_depth=depth, max_bin=32, key_bits=2048, goss_top_rate=top,
                              goss_other_rate=other)
            model = reference.train(parties, y[~test], np.arange(n), params)
            margins = reference.predict(model, {"guest": xg[test], "host": xh[test]}, 0.0, 1)[:, 0]
            print(f"| {name} | {trees} x {depth} | {top or '-'} | {other or '-'} |"
                  f" {roc_auc_score(y[test], margins):.4f} |", flush=True)


def run_multi_output(bits: int, rounds: int = 10, depth: int = 3, max_bin: int = 32) -> list[str]:
    """vehicle_scale, 70/30 split (seed 0) as bench/secureboost_quality.py: both softmax tree shapes."""
    import dataclasses

    import pandas as pd

    from fedps.algorithms.secureboost import multi_output, reference
    from fedps.algorithms.secureboost.binning import merge, sketch
    from fedps.algorithms.secureboost.cipher import units_per_ciphertext
    from fedps.algorithms.secureboost.params import SBParams

    guest = pd.read_csv(DATA / "vehicle_scale_hetero_guest.csv")
    host = pd.read_csv(DATA / "vehicle_scale_hetero_host.csv").set_index("id").loc[guest["id"]]
    x = {"guest": guest.drop(columns=["id", "y"]).to_numpy(float), "host": host.to_numpy(float)}
    y = guest["y"].to_numpy(float)
    test = np.random.default_rng(0).random(len(y)) < 0.3
    params = SBParams(objective="multi:softmax", num_class=4, trees=rounds, max_depth=depth, max_bin=max_bin,
                      key_bits=2048)
    parties = {n: (merge([sketch(v[~test])], tuple(f"{n}{j}" for j in range(v.shape[1])), max_bin,
                         int((~test).sum()), n), v[~test]) for n, v in x.items()}
    keys = np.arange(int((~test).sum()))
    binned = {n: b.apply(v) for n, (b, v) in parties.items()}
    hb = parties["host"][0]
    n_bins = [hb.present_bins(j) + 1 for j in range(len(hb.cuts))]
    packer = GHPacker(generate_keypair(bits)[0], int((~test).sum()), params.precision_bits, 4)
    per_ct = units_per_ciphertext(packer.public_key, packer.layout)
    per_node = int(np.ceil(sum(n_bins) * packer.plains_per_row / per_ct))
    out = [f"vehicle_scale ({len(y)} rows, {x['host'].shape[1]} host features, 4 classes), {rounds} rounds x depth"
           f" {depth}, {max_bin} bins, {bits}-bit key: {packer.plains_per_row} plaintext(s) per row for the 4"
           f" classes' (g, h), {per_ct} packed sums per sealed ciphertext, {per_node} sealed ciphertexts per node;"
           f" load average {os.getloadavg()[0]:.0f}", "",
           "| trees | test accuracy | train s | split nodes / round | sealed nodes / round |"
           " sealed ciphertexts / round | histogram additions / round | routed bits / round |", "|---" * 8 + "|"]
    test_x = {n: v[test] for n, v in x.items()}
    for label, train, predict, times in (
            ("one per class (fedps)", reference.train, lambda m: reference.predict(m, test_x, 0.0, 4), 1),
            ("multi-output", multi_output.train, lambda m: multi_output.predict(m, test_x, 4), 1),
            ("multi-output, 4x the rounds", multi_output.train, lambda m: multi_output.predict(m, test_x, 4), 4)):
        started = time.process_time()
        model = train(parties, y[~test], keys, dataclasses.replace(params, trees=rounds * times))
        seconds = time.process_time() - started
        accuracy = float(np.mean(predict(model).argmax(axis=1) == y[test]))
        c = multi_output.costs(model, binned, "host", n_bins, depth, per_node, rounds * times)
        out.append(f"| {label}: {rounds * times} rounds | {accuracy:.4f} | {seconds:.1f} | {c['split_nodes']:.1f} | {c['sealed_nodes']:.1f} |"
                   f" {c['sealed_ciphertexts']:.0f} | {c['histogram_additions']:.0f} | {c['routed_bits']:.0f} |")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bits", type=int, default=2048)
    parser.add_argument("--data", default="default_credit,breast")
    parser.add_argument("--cores", type=int, default=2)
    parser.add_argument("--partitions", type=int, default=2)
    parser.add_argument("--scales", default="2,4", help="row multiples of default_credit, e.g. 0.5,2 (empty: none)")
    parser.add_argument("--scale-trees", type=int, default=1)
    parser.add_argument("--trees", default="", help="tree counts to run instead, e.g. default_credit=1,breast=2")
    parser.add_argument("--baseline-rows", type=int, default=200)
    parser.add_argument("--json", default="")
    parser.add_argument("--e2e", action="store_true",
                        help="only SB-core's federated trainer end to end (seconds per tree), no crypto race")
    parser.add_argument("--siblings", action="store_true",
                        help="only fedps, twice per data set: the host seals every node of a level, or (the"
                             " trainer's way) the roots and then the smaller children, the guest subtracting")
    parser.add_argument("--goss", action="store_true",
                        help="only GOSS's effect on quality (plaintext reference), breast and default_credit")
    parser.add_argument("--multi-output", action="store_true",
                        help="only softmax: one tree per class against multi-output trees (plaintext; quality and"
                             " the protocol's work per round), on vehicle_scale")
    args = parser.parse_args()
    if args.multi_output:
        print("\n".join(run_multi_output(args.bits)))
        return
    if args.goss:
        run_goss()
        return
    from fedps.engine.config import SparkConfig
    from fedps.engine.session import start_spark

    started = time.perf_counter()
    overrides = {k: int(v) for k, v in (item.split("=") for item in args.trees.split(",") if item)}
    keys = None if args.e2e else generate_keypair(args.bits)
    spark = start_spark(SparkConfig(master=f"local[{args.cores}]", app_name="bench-secureboost"))
    sc = spark.sparkContext
    out, dump = [f"Machine: {os.cpu_count()} cores; load average at start {os.getloadavg()[0]:.1f}.", ""], {}
    for name in [d for d in args.data.split(",") if d] if args.e2e else []:
        cfg = dict(CONFIGS[name])
        cfg["trees"] = overrides.get(name, cfg["trees"])
        res = run_e2e(spark, name, cfg, args.bits, args.partitions)
        dump[name] = res
        per = f"{np.mean(res['per_tree']):.1f}" if res["per_tree"] else "n/a"
        out.append(f"- {name}, federated trainer end to end ({cfg['trees']} trees, depth {cfg['depth']},"
                   f" {cfg['bins']} bins, {args.bits} bits, {args.partitions} partitions): {per} s per tree after"
                   f" the first (trees {', '.join(f'{t:.1f}' for t in res['per_tree'])}); first tree done"
                   f" {res['first_tree_end_s'] or 0:.1f} s after the start (setup included);"
                   f" whole run {res['total_s']:.1f} s; load average {os.getloadavg()[0]:.0f};"
                   f" errors {res['errors'] or 'none'}; last metrics {res['metrics']}")
    for name in [d for d in args.data.split(",") if d] if args.siblings else []:
        cfg = dict(CONFIGS[name])
        cfg["trees"] = overrides.get(name, cfg["trees"])
        x, y = load(name)
        bins, n_bins = quantile_bins(x, cfg["bins"])
        out += [f"{name}: {cfg['trees']} trees, depth {cfg['depth']}, {args.bits} bits, seconds per tree", "",
                "| host seals | seal (wall) | open (wall) | CPU of tasks and drivers | critical path | load |",
                "|---|---|---|---|---|---|"]
        for label, on in (("every node", False), ("roots, then smaller children (trainer)", True)):
            res = run_fedps(sc, keys, bins, n_bins, y, cfg["trees"], cfg["depth"], args.partitions, args.cores, on)
            ph = res["phases"]
            out.append(f"| {label} | {ph['host: seal']:.2f} | {ph['guest: open']:.2f} |"
                       f" {np.mean(res['task_cpu']):.2f} | {np.mean(res['critical']):.2f} | {res['load']:.0f} |")
            print("\n".join(out), flush=True)
        out.append("")
    for name in [d for d in args.data.split(",") if d] if not (args.e2e or args.siblings) else []:
        cfg = dict(CONFIGS[name])
        cfg["trees"] = overrides.get(name, cfg["trees"])
        x, y = load(name)
        bins, n_bins = quantile_bins(x, cfg["bins"])
        base = run_baseline(keys, bins, n_bins, y, args.baseline_rows)
        fed = run_fedps(sc, keys, bins, n_bins, y, cfg["trees"], cfg["depth"], args.partitions, args.cores)
        scaled = []
        if name == "default_credit":
            for k in [float(s) for s in args.scales.split(",") if s]:
                rows = np.arange(int(round(k * len(y)))) % len(y)   # repeated rows stand for new ids
                scaled.append(run_fedps(sc, keys, bins[rows], n_bins, y[rows], args.scale_trees,
                                        cfg["depth"], max(1, int(round(args.partitions * k))), args.cores))
        out += report(name, cfg, x.shape[1], n_bins, fed, base, scaled, args)
        print("\n".join(out), flush=True)
        dump[name] = {"fedps": fed, "scaled": scaled,
                      "baseline": {k: v for k, v in base.items() if k != "costs"}}
    out.append(f"Whole run: {time.perf_counter() - started:.0f} s.")
    print("\n".join(out))
    if args.json:
        Path(args.json).write_text(json.dumps(dump, indent=1, default=str))
    spark.stop()


if __name__ == "__main__":
    main()
