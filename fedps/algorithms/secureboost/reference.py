"""The plain, non-federated SecureBoost on the joined rows: the federated protocol's oracle.

Same bins, same candidates, same fixed-point gradients, same tie-breaking
and the same row and feature sampling as the federated run, in one process
with every party's features at hand. ``tests/secureboost`` checks that the
federated trees equal these split for split.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from fedps.algorithms.secureboost import goss, objective
from fedps.algorithms.secureboost.binning import Bins
from fedps.algorithms.secureboost.params import SBParams
from fedps.algorithms.secureboost.tree import (Rules, SplitTable, candidates, feature_mask, histogram,
                                               left_sums, pick)
from fedps.engine.vertical.plan import validation_rows


def rules(params: SBParams) -> Rules:
    return Rules(params.reg_lambda, params.min_child_weight, params.min_split_gain, params.precision_bits)


def row_sample(row_keys: np.ndarray, params: SBParams, tree: int) -> np.ndarray:
    """Rows of tree ``tree``'s sample (``subsample``), from a seeded hash of the row keys."""
    if params.subsample >= 1.0:
        return np.ones(len(row_keys), dtype=bool)
    return validation_rows(row_keys, params.subsample, params.seed * 7919 + 104729 * (tree + 1))


def training_rows(row_keys: np.ndarray, params: SBParams) -> np.ndarray:
    return ~validation_rows(row_keys, params.validation_fraction, params.seed)


def round_gradients(params: SBParams, margins: np.ndarray, y: np.ndarray, use: np.ndarray,
                    weight: np.ndarray | None = None) -> np.ndarray:
    """Fixed-point (g, h) per row and class, zero for rows outside the tree's sample: (rows, classes, 2).

    ``weight`` (GOSS): each row's g and h are multiplied by it before rounding; 0 leaves a row out.
    """
    g, h = objective.gradients(params.objective, margins, y)
    if weight is not None:
        g, h = g * weight[:, None], h * weight[:, None]
        use = use & (weight > 0)
    gh = np.stack([objective.quantize(g, params.precision_bits), objective.quantize(h, params.precision_bits)],
                  axis=2)
    gh[~use] = 0
    return gh


@dataclass
class ReferenceModel:
    trees: list[dict] = field(default_factory=list)
    tables: dict[str, SplitTable] = field(default_factory=dict)
    margins: np.ndarray | None = None
    losses: list[float] = field(default_factory=list)


def train(parties: dict[str, tuple[Bins, np.ndarray]], y: np.ndarray, row_keys: np.ndarray,
          params: SBParams) -> ReferenceModel:
    """Boost on the joined rows; ``parties`` in order guest first, each with its bins and raw features."""
    names = list(parties)
    classes, rule = params.classes, rules(params)
    binned = {name: bins.apply(x) for name, (bins, x) in parties.items()}
    model = ReferenceModel(tables={name: SplitTable(parties[name][0], name) for name in names})
    train_rows = training_rows(row_keys, params)
    base = objective.base_margin(params.objective, y[train_rows], classes)
    margins = np.full((len(y), classes), base)
    for t in range(params.trees):
        use = train_rows & row_sample(row_keys, params, t)
        weight = None
        if goss.enabled(params):
            size = goss.sizes(params, margins, y, use)
            threshold = goss.kth_largest(size, goss.top_count(params, int(use.sum())))
            weight = goss.weights(params, size, threshold, row_keys, t)
        gh = round_gradients(params, margins, y, use, weight)
        masks = {name: feature_mask(len(parties[name][0].cuts), params.colsample_bytree, params.seed, t, name)
                 for name in names}
        cands = {name: candidates(parties[name][0], masks[name]) for name in names}
        for k in range(classes):
            tree, node = _grow(names, binned, cands, model.tables, gh[:, k, :], params, rule, t, k)
            tree["class"] = k
            model.trees.append(tree)
            for n, spec in tree["nodes"].items():
                if "leaf" in spec:
                    margins[node == n, k] += spec["leaf"]
        model.losses.append(objective.loss(params.objective, margins[train_rows], y[train_rows])
                            / max(int(train_rows.sum()), 1))
    model.margins = margins
    return model


def _grow(names, binned, cands, tables, gh, params, rule, t, k):
    span = 1 << (params.max_depth + 1)
    node = np.zeros(len(gh), dtype=np.int64)
    nodes: dict[int, dict] = {}
    frontier = [0]
    for depth in range(params.max_depth + 1):
        next_frontier = []
        for n in frontier:
            rows = node == n
            total = gh[rows].sum(axis=0)
            found = None
            if depth < params.max_depth:
                gains = [rule.gains(left_sums(histogram(binned[name][rows], gh[rows], params.max_bin),
                                              cands[name], params.max_bin), total) for name in names]
                found = pick(gains)
            if found is None:
                nodes[n] = {"leaf": rule.leaf(total, params.learning_rate)}
                continue
            party, gain, tied = found
            name = names[party]
            split = f"{t}.{k * span + n}"
            tables[name].record(cands[name], int(tied.min()), split)
            nodes[n] = {"party": name, "split": split, "gain": gain}
            left = tables[name].go_left_bins(split, binned[name])
            node[rows & left] = 2 * n + 1
            node[rows & ~left] = 2 * n + 2
            next_frontier += [2 * n + 1, 2 * n + 2]
        frontier = next_frontier
        if not frontier:
            break
    return {"nodes": nodes}, node


def predict(model: ReferenceModel, features: dict[str, np.ndarray], base: float, classes: int) -> np.ndarray:
    """Margins of new rows (raw features per party) under the reference model."""
    rows = len(next(iter(features.values())))
    margins = np.full((rows, classes), base)
    for tree in model.trees:
        node = np.zeros(rows, dtype=np.int64)
        for n in sorted(tree["nodes"]):
            spec = tree["nodes"][n]
            at = node == n
            if "leaf" in spec:
                margins[at, tree["class"]] += spec["leaf"]
                continue
            left = model.tables[spec["party"]].go_left_raw(spec["split"], features[spec["party"]])
            node[at] = np.where(left[at], 2 * n + 1, 2 * n + 2)
    return margins
