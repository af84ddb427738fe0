"""The executor side of SecureBoost: one barrier stage per tree, every level inside it.

A task serves its layout partitions in increasing order; per level it leaves
its partitions' histograms in its party's accumulator, waits for its own
driver's decision (``fetch``), then exchanges direction bits with the peer task
of each partition (steps 0, 1 and 4 of :mod:`protocol`). The guest's margins
live beside its checkpoint, one file per partition and tree, never on a driver.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fedps.algorithms.secureboost import goss, objective
from fedps.algorithms.secureboost.binning import Bins
from fedps.algorithms.secureboost.params import SBParams
from fedps.algorithms.secureboost.protocol import (HIST_KIND, HOST_LEFT, REDUCE_HIST, ROUTE, ROW_GH, Nodes,
                                                   apply_route, rows_of, scope)
from fedps.algorithms.secureboost.reference import round_gradients, row_sample, training_rows
from fedps.algorithms.secureboost.tree import feature_mask, go_left_bins, histogram
from fedps.engine.vertical.accumulator import PLAIN
from fedps.engine.vertical.scores import ScoreSummary
from fedps.engine.vertical.stage import TaskEnv
from fedps.messaging.codec import Blob
from fedps.messaging.tags import Tag

FETCH_S = 3600.0


@dataclass(frozen=True)
class Plan:
    """What a task needs for one tree (picklable: shipped to the executors)."""

    job: str
    me: str
    guest: str
    hosts: tuple[str, ...]
    params: SBParams
    guest_n: int
    own: tuple[int, int] | None        # the guest's p, q: its tasks encrypt with CRT
    bins: Bins
    rows_max: int
    g_bound: float
    h_bound: float
    base: float
    margins_dir: str
    tree: int = 0

    @property
    def nodes(self) -> Nodes:
        return Nodes(self.params.max_depth, self.params.classes)

    @property
    def is_guest(self) -> bool:
        return self.me == self.guest


def _tag(plan: Plan, level: int, name: str, p: int) -> Tag:
    # the partition is part of the sealed tag: a frame moved to another partition is never taken
    return scope(plan.job, plan.tree, level).tag(f"{name}_p{p}")


def _older(tree: int):
    return lambda tag: tag.phase == "setup" or (tag.phase == "tree" and tag.iteration < tree)


def _start(env: TaskEnv, plan: Plan) -> None:
    env.seek(plan.tree)
    for link in env.links.values():
        link.drop(_older(plan.tree))


def packer_for(plan: Plan):
    from fedps.algorithms.secureboost.cipher import GHPacker
    from fedps.engine.crypto import PrivateKey, PublicKey

    public = PublicKey(plan.guest_n)
    private = PrivateKey(public, *plan.own) if plan.own else None
    scale = max(1.0, goss.amplification(plan.params)) if goss.enabled(plan.params) else 1.0
    return GHPacker(public, plan.rows_max, plan.params.precision_bits, plan.params.classes,
                    g_bound=plan.g_bound * scale, h_bound=plan.h_bound * scale, private_key=private)


# --------------------------------------------------------------------------- margins (guest)
def _margins_path(plan: Plan, trees: int, p: int) -> Path:
    return Path(plan.margins_dir) / f"after-{trees:05d}" / f"part-{p:05d}.npy"


def load_margins(plan: Plan, p: int, rows: int) -> np.ndarray:
    if plan.tree == 0:
        return np.full((rows, plan.params.classes), plan.base)
    return np.load(_margins_path(plan, plan.tree, p))


def _save_margins(plan: Plan, p: int, margins: np.ndarray) -> None:
    path = _margins_path(plan, plan.tree + 1, p)
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    tmp = path.with_name(path.name + ".tmp.npy")
    np.save(tmp, margins)
    os.replace(tmp, path)
    old = _margins_path(plan, plan.tree - 2, p)
    if plan.tree >= 2 and old.exists():
        old.unlink()


# --------------------------------------------------------------------------- guest
def guest_tree(env: TaskEnv, plan: Plan) -> dict[str, Any]:
    params, nodes, acc = plan.params, plan.nodes, env.accumulator
    _start(env, plan)
    packer = packer_for(plan)
    parts, start = {}, {}
    for p in env.partitions:
        rows = env.rows(p)
        margins = load_margins(plan, p, len(rows.y))
        use = training_rows(rows.row_keys, params) & row_sample(rows.row_keys, params, plan.tree)
        start[p] = (rows, margins, use)
    weights = goss_weights(env, plan, start) if goss.enabled(params) else {}
    for p in env.partitions:   # 0. [[g, h]] of every row to every host task p
        rows, margins, use = start.pop(p)
        gh = round_gradients(params, margins, rows.y, use, weights.get(p))
        blob = Blob(HIST_KIND, packer.encrypt(gh[:, :, 0], gh[:, :, 1], quantized=True).to_bytes())
        for host in plan.hosts:
            env.links[host].send(p, _tag(plan, 0, ROW_GH.name, p), ROW_GH.check(blob))
        node = np.tile(np.array(nodes.roots(), dtype=np.int64), (len(rows.y), 1))
        parts[p] = (rows, plan.bins.apply(rows.x), margins, gh, node)
    for level in range(params.max_depth + 1):
        frontier = decision_frontier(acc, plan, level)
        for p in env.partitions:   # the guest's own sums, in plaintext
            _, bins, _, gh, node = parts[p]
            hist, totals = [], []
            for key in frontier:
                k = nodes.klass(key)
                at = node[:, k] == key
                totals.append(gh[at, k, :].sum(axis=0))
                if level < params.max_depth:
                    hist.append(histogram(bins[at], gh[at, k, :], params.max_bin))
            acc.put(plan.tree, f"hist{level}", p, PLAIN,
                    {"totals": np.array(totals, dtype=np.int64).reshape(-1, 2),
                     "hist": np.array(hist, dtype=np.int64)})
        decision = acc.fetch(plan.tree, f"split{level}", FETCH_S)
        split = {int(k): v for k, v in decision["split"].items()}
        if not split:
            break
        owners = sorted({v["party"] for v in split.values() if v["party"] != plan.me})
        keys = sorted(split)
        for p in env.partitions:   # 4. merge the owners' directions, route every host
            rows, bins, _, _, node = parts[p]
            theirs = {}
            for owner in owners:
                mine = [k for k in keys if split[k]["party"] == owner]
                count = len(rows_of(node, nodes, mine))
                packed = HOST_LEFT.check(env.links[owner].recv(p, _tag(plan, level, HOST_LEFT.name, p)))
                theirs[owner] = iter(np.unpackbits(packed, count=count).astype(bool).tolist())
            bits = []
            for key in keys:
                at = np.flatnonzero(node[:, nodes.klass(key)] == key)
                spec = split[key]
                if spec["party"] == plan.me:
                    bits.append(go_left_bins(spec["spec"], bins[at], plan.bins.missing_bin))
                else:
                    source = theirs[spec["party"]]
                    bits.append(np.array([next(source) for _ in range(len(at))], dtype=bool))
            route = np.concatenate(bits) if bits else np.zeros(0, dtype=bool)
            for host in plan.hosts:
                env.links[host].send(p, _tag(plan, level, ROUTE.name, p), ROUTE.check(np.packbits(route)))
            apply_route(node, nodes, keys, route)
    leaves = {int(k): v for k, v in acc.fetch(plan.tree, "leaves", FETCH_S).items()}
    return _finish_guest(env, plan, parts, leaves)


def goss_weights(env: TaskEnv, plan: Plan, start: dict) -> dict[int, np.ndarray]:
    """GOSS: the rows' weights of this tree, from the K-th largest gradient size over all partitions."""
    acc, params = env.accumulator, plan.params
    size = {p: goss.sizes(params, margins, rows.y, use) for p, (rows, margins, use) in start.items()}
    n_rounds, prefix = goss.rounds(goss.size_bits(params, plan.g_bound)), 0
    for r in range(n_rounds):   # radix selection: the guest's driver picks each digit (trainer.goss_threshold)
        for p in env.partitions:
            value = {"counts": goss.digit_counts(size[p], prefix, r, n_rounds)}
            if r == 0:
                value["rows"] = np.array([int(np.sum(size[p] >= 0))], dtype=np.int64)
            acc.put(plan.tree, f"goss{r}", p, PLAIN, value)
        prefix = int(acc.fetch(plan.tree, f"goss{r}", FETCH_S)["prefix"])
    return {p: goss.weights(params, size[p], prefix, start[p][0].row_keys, plan.tree) for p in start}


def decision_frontier(acc: Any, plan: Plan, level: int) -> list[int]:
    if level == 0:
        return plan.nodes.roots()
    return [int(k) for k in acc.fetch(plan.tree, f"split{level - 1}", FETCH_S)["frontier"]]


def _finish_guest(env: TaskEnv, plan: Plan, parts: dict, leaves: dict[int, float]) -> dict[str, Any]:
    params, nodes = plan.params, plan.nodes
    out = {"train_loss": 0.0, "train_rows": 0, "valid_loss": 0.0, "valid_rows": 0, "valid_correct": 0,
           "summary": ScoreSummary() if params.objective == "binary:logistic" else None}
    for p in env.partitions:
        rows, _, margins, _, node = parts[p]
        margins = np.array(margins, dtype=np.float64)
        for key, value in leaves.items():
            k = nodes.klass(key)
            margins[node[:, k] == key, k] += value
        _save_margins(plan, p, margins)
        train = training_rows(rows.row_keys, params)
        y = rows.y
        out["train_loss"] += objective.loss(params.objective, margins[train], y[train])
        out["train_rows"] += int(train.sum())
        valid = ~train
        if valid.any():
            out["valid_loss"] += objective.loss(params.objective, margins[valid], y[valid])
            out["valid_rows"] += int(valid.sum())
            if params.objective == "multi:softmax":
                out["valid_correct"] += int(np.sum(margins[valid].argmax(axis=1) == y[valid]))
            elif out["summary"] is not None:
                out["summary"].add(y[valid], margins[valid, 0])
        env.record(plan.tree + 1, p)
    for link in env.links.values():
        link.flush()
    return out


# --------------------------------------------------------------------------- host
def host_bins(plan: Plan, x: np.ndarray, selected: np.ndarray) -> tuple[np.ndarray, np.ndarray, list[int]]:
    """All bins (for the split rules) and the selected features' bins with each feature's missing bin last."""
    full = plan.bins.apply(x)
    n_bins = [plan.bins.present_bins(j) + 1 for j in selected]
    chosen = full[:, selected].astype(np.int64)
    for i, j in enumerate(selected):
        chosen[chosen[:, i] == plan.bins.missing_bin, i] = n_bins[i] - 1
    return full, chosen, n_bins


def host_tree(env: TaskEnv, plan: Plan) -> dict[str, Any]:
    from fedps.algorithms.secureboost.cipher import EncryptedHistograms, build_histograms
    from fedps.engine.crypto import CipherVector, PublicKey

    params, nodes, acc = plan.params, plan.nodes, env.accumulator
    _start(env, plan)
    public = PublicKey(plan.guest_n)
    selected = np.flatnonzero(feature_mask(len(plan.bins.cuts), params.colsample_bytree, params.seed,
                                           plan.tree, plan.me))
    parts = {}
    for p in env.partitions:
        rows = env.rows(p)
        full, chosen, n_bins = host_bins(plan, rows.x, selected)
        blob = ROW_GH.check(env.links[plan.guest].recv(p, _tag(plan, 0, ROW_GH.name, p)))
        cts = CipherVector.from_bytes(blob.data, public)
        node = np.tile(np.array(nodes.roots(), dtype=np.int64), (len(rows.row_keys), 1))
        parts[p] = (full, chosen, cts, node)
    for level in range(params.max_depth):
        build = [int(k) for k in acc.fetch(plan.tree, f"build{level}", FETCH_S)]
        for p in env.partitions:   # 1. this partition's encrypted histograms
            _, chosen, cts, node = parts[p]
            pieces = []
            for k in range(params.classes):
                mine = [key for key in build if nodes.klass(key) == k]
                if mine:
                    pieces.append(build_histograms(cts, chosen, node[:, k], mine, n_bins))
            acc.put(plan.tree, f"hist{level}", p, REDUCE_HIST, EncryptedHistograms.concat(pieces).to_bytes())
        decision = acc.fetch(plan.tree, f"split{level}", FETCH_S)
        split = sorted(int(k) for k in decision["split"])
        if not split:
            break
        mine = {int(k): v for k, v in decision["mine"].items()}
        for p in env.partitions:   # 4. the directions of this host's splits
            full, _, _, node = parts[p]
            if mine:
                bits = [go_left_bins(mine[key], full[rows_of(node, nodes, [key])], plan.bins.missing_bin)
                        for key in sorted(mine)]
                env.links[plan.guest].send(p, _tag(plan, level, HOST_LEFT.name, p),
                                           HOST_LEFT.check(np.packbits(np.concatenate(bits))))
        frontier = [int(k) for k in decision["frontier"]]
        for p in env.partitions:
            full, _, _, node = parts[p]
            count = len(rows_of(node, nodes, split))
            packed = ROUTE.check(env.links[plan.guest].recv(p, _tag(plan, level, ROUTE.name, p)))
            apply_route(node, nodes, split, np.unpackbits(packed, count=count).astype(bool))
            if level + 1 < params.max_depth:
                counts = [int(np.sum(node[:, nodes.klass(key)] == key)) for key in frontier]
                acc.put(plan.tree, f"counts{level + 1}", p, PLAIN, {"counts": np.array(counts, dtype=np.int64)})
    for p in env.partitions:
        env.record(plan.tree + 1, p)
    for link in env.links.values():
        link.flush()
    return {}
