"""Multi-output trees for softmax, plaintext only: the measured alternative to one tree per class.

Not a federated mode. One tree per round whose leaves hold one weight per
class; a split's gain is the sum over classes of XGBoost's gain on that
class's (G, H), admissible when the summed hessians of both sides reach
``min_child_weight``. Same bins, candidates, fixed-point gradients and
tie-breaking as :mod:`reference`. ``bench/secureboost.py --multi-output``
compares it with the one-tree-per-class trees the protocol grows, in
quality and in what the protocol would cost per round (:func:`costs`);
docs/benchmarks.md has the numbers and the decision.
"""

from __future__ import annotations

import math

import numpy as np

from fedps.algorithms.secureboost import objective
from fedps.algorithms.secureboost.binning import Bins
from fedps.algorithms.secureboost.params import SBParams
from fedps.algorithms.secureboost.reference import (ReferenceModel, round_gradients, row_sample,
                                                    training_rows)
from fedps.algorithms.secureboost.tree import SplitTable, candidates, feature_mask, histogram, left_sums, pick


def gains(left: np.ndarray, total: np.ndarray, params: SBParams) -> np.ndarray:
    """Summed per-class gain of every candidate; ``left`` (candidates, classes, 2), ``total`` (classes, 2)."""
    if len(left) == 0:
        return np.zeros(0)
    scale, lam = float(1 << params.precision_bits), params.reg_lambda
    gl, hl = left[:, :, 0] / scale, left[:, :, 1] / scale
    g, h = total[:, 0] / scale, total[:, 1] / scale
    gr, hr = g - gl, h - hl
    with np.errstate(divide="ignore", invalid="ignore"):
        gain = (gl * gl / (hl + lam) + gr * gr / (hr + lam) - g * g / (h + lam)).sum(axis=1)
    hl_sum, hr_sum = hl.sum(axis=1), hr.sum(axis=1)
    ok = (hl_sum >= params.min_child_weight) & (hr_sum >= params.min_child_weight) & (hl_sum > 0) & (hr_sum > 0)
    ok &= (gain > params.min_split_gain) & np.isfinite(gain)
    return np.where(ok, gain, -np.inf)


def train(parties: dict[str, tuple[Bins, np.ndarray]], y: np.ndarray, row_keys: np.ndarray,
          params: SBParams) -> ReferenceModel:
    """Multi-output boosting on the joined rows; a tree's leaves are ``{"leaf": [w_0, ..., w_k-1]}``."""
    names, classes = list(parties), params.classes
    binned = {name: bins.apply(x) for name, (bins, x) in parties.items()}
    model = ReferenceModel(tables={name: SplitTable(parties[name][0], name) for name in names})
    train_rows = training_rows(row_keys, params)
    margins = np.zeros((len(y), classes))
    scale = float(1 << params.precision_bits)
    for t in range(params.trees):
        gh = round_gradients(params, margins, y, train_rows & row_sample(row_keys, params, t))
        masks = {n: feature_mask(len(parties[n][0].cuts), params.colsample_bytree, params.seed, t, n) for n in names}
        cands = {n: candidates(parties[n][0], masks[n]) for n in names}
        node = np.zeros(len(y), dtype=np.int64)
        nodes: dict[int, dict] = {}
        frontier = [0]
        for depth in range(params.max_depth + 1):
            next_frontier = []
            for n in frontier:
                rows = node == n
                total = gh[rows].sum(axis=0)                      # (classes, 2)
                found = None
                if depth < params.max_depth:
                    per_party = []
                    for name in names:
                        left = np.stack([left_sums(histogram(binned[name][rows], gh[rows, k, :], params.max_bin),
                                                   cands[name], params.max_bin) for k in range(classes)], axis=1)
                        per_party.append(gains(left, total, params))
                    found = pick(per_party)
                if found is None:
                    leaf = -(total[:, 0] / scale) / (total[:, 1] / scale + params.reg_lambda) * params.learning_rate
                    nodes[n] = {"leaf": leaf.tolist()}
                    margins[rows] += leaf
                    continue
                party, gain, tied = found
                name, split = names[party], f"{t}.{n}"
                model.tables[name].record(cands[name], int(tied.min()), split)
                nodes[n] = {"party": name, "split": split, "gain": gain}
                left = model.tables[name].go_left_bins(split, binned[name])
                node[rows & left], node[rows & ~left] = 2 * n + 1, 2 * n + 2
                next_frontier += [2 * n + 1, 2 * n + 2]
            frontier = next_frontier
            if not frontier:
                break
        model.trees.append({"class": None, "nodes": nodes})
        model.losses.append(objective.loss(params.objective, margins[train_rows], y[train_rows])
                            / max(int(train_rows.sum()), 1))
    model.margins = margins
    return model


def predict(model: ReferenceModel, features: dict[str, np.ndarray], classes: int) -> np.ndarray:
    rows = len(next(iter(features.values())))
    margins = np.zeros((rows, classes))
    for tree in model.trees:
        node = np.zeros(rows, dtype=np.int64)
        for n in sorted(tree["nodes"]):
            spec, at = tree["nodes"][n], node == n
            if "leaf" in spec:
                margins[at] += np.asarray(spec["leaf"])
                continue
            left = model.tables[spec["party"]].go_left_raw(spec["split"], features[spec["party"]])
            node[at] = np.where(left[at], 2 * n + 1, 2 * n + 2)
    return margins


def costs(model: ReferenceModel, binned: dict[str, np.ndarray], host: str, n_bins: list[int], max_depth: int,
          per_node_ciphertexts: int, rounds: int) -> dict[str, float]:
    """Per round, what the protocol's host would do for ``model``'s trees (the sibling trick included).

    Sealed nodes: every node of a level that may still split (``depth < max_depth``); built nodes: the roots
    and the smaller child of each split pair; histogram additions: rows of built nodes x host features;
    split nodes: the guest's decisions, each a ``host_left``/``route`` bit per row of the node.
    """
    features = len(n_bins)
    sealed = built_rows = split = routed = 0
    rows = len(next(iter(binned.values())))
    for tree in model.trees:
        node = np.zeros(rows, dtype=np.int64)
        counts: dict[int, int] = {}
        for n in sorted(tree["nodes"]):
            counts[n] = int(np.sum(node == n))
            spec = tree["nodes"][n]
            depth = int(math.floor(math.log2(n + 1)))
            if depth < max_depth:
                sealed += 1
            if "split" in spec:
                split += 1
                routed += counts[n]
                left = model.tables[spec["party"]].go_left_bins(spec["split"], binned[spec["party"]])
                at = node == n
                node[at & left], node[at & ~left] = 2 * n + 1, 2 * n + 2
        for n, c in counts.items():
            if n == 0:
                built_rows += c
            elif n % 2 == 1 and (n + 1) in counts and int(math.floor(math.log2(n + 1))) < max_depth:
                built_rows += min(c, counts[n + 1])
    return {"split_nodes": split / rounds, "sealed_nodes": sealed / rounds,
            "sealed_ciphertexts": sealed * per_node_ciphertexts / rounds,
            "histogram_additions": built_rows * features / rounds, "routed_bits": routed / rounds}
