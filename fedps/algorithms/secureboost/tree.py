"""Split finding and the trees, shared by the federated protocol and the reference.

Everything here works on the fixed-point integers of :func:`objective.quantize`,
so the guest, which sees only decrypted sums, and the plaintext reference
compute the same gains bit for bit. A party's split *candidates* are listed
in a canonical order (:func:`candidates`); for feature ``f`` with ``n`` cut
points: ``(b, missing right)`` for ``b < n``, then, if the feature had missing
values, ``(n, missing right)`` (missing apart) and ``(b, missing left)`` for
``b < n``. A candidate's *left sum* is the (G, H) of the rows it sends left.
Ties between equal gains go to the earlier party (guest, then the hosts in
order) and, inside a party, to the earlier candidate in canonical order.
Nodes are numbered as a heap: root 0, children ``2i+1`` (left) and ``2i+2``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from fedps.algorithms.secureboost.binning import Bins


@dataclass(frozen=True)
class Candidates:
    """One party's split candidates for a tree, in canonical order."""

    feature: np.ndarray        # index into the party's features
    bin: np.ndarray            # left: bins <= bin (non-missing)
    default_left: np.ndarray   # missing values go left

    def __len__(self) -> int:
        return len(self.feature)


def candidates(bins: Bins, selected: np.ndarray | None = None) -> Candidates:
    """The canonical candidate list over the ``selected`` features (all if None)."""
    feature, bin_, left = [], [], []
    chosen = range(len(bins.cuts)) if selected is None else np.flatnonzero(selected)
    for j in chosen:
        n = len(bins.cuts[j])
        feature.append(np.full(n, j))
        bin_.append(np.arange(n))
        left.append(np.zeros(n, dtype=bool))
        if bins.has_missing[j]:
            feature.append(np.full(n + 1, j))
            bin_.append(np.r_[n, np.arange(n)])
            left.append(np.r_[False, np.ones(n, dtype=bool)])
    if not feature:
        return Candidates(np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, bool))
    return Candidates(np.concatenate(feature).astype(np.int64), np.concatenate(bin_).astype(np.int64),
                      np.concatenate(left))


def feature_mask(features: int, fraction: float, seed: int, tree: int, party: str) -> np.ndarray:
    """Which of a party's features tree ``tree`` may split on (``colsample_bytree``), by the party alone."""
    if fraction >= 1.0:
        return np.ones(features, dtype=bool)
    salt = int.from_bytes(party.encode()[:8].ljust(8, b"\0"), "big")
    rng = np.random.default_rng([seed, tree, salt])
    keep = max(1, int(round(fraction * features)))
    mask = np.zeros(features, dtype=bool)
    mask[rng.choice(features, keep, replace=False)] = True
    return mask


def histogram(bins: np.ndarray, gh: np.ndarray, max_bin: int) -> np.ndarray:
    """Integer (G, H) sums per (feature, bin) of some rows: shape (features, max_bin + 1, 2)."""
    features = bins.shape[1]
    out = np.zeros((features, max_bin + 1, 2), dtype=np.int64)
    if len(gh) == 0:
        return out
    if np.abs(gh).max(initial=0) * len(gh) >= 2.0 ** 52:
        raise ValueError("histogram sums would lose integer exactness")   # params prevent it
    flat = (bins.astype(np.int64) + np.arange(features) * (max_bin + 1)).ravel()
    size = features * (max_bin + 1)
    for c in range(2):
        weights = np.repeat(gh[:, c].astype(np.float64), features)
        out[:, :, c] = np.rint(np.bincount(flat, weights=weights, minlength=size)).astype(np.int64).reshape(
            features, max_bin + 1)
    return out


def left_sums(hist: np.ndarray, cands: Candidates, max_bin: int) -> np.ndarray:
    """(G, H) sent left by every candidate, from a node's histogram: shape (candidates, 2)."""
    cumulative = np.cumsum(hist[:, :max_bin, :], axis=1)
    out = cumulative[cands.feature, cands.bin]
    out[cands.default_left] += hist[cands.feature[cands.default_left], max_bin]
    return out


@dataclass(frozen=True)
class Rules:
    """What makes a split admissible and what it gains (XGBoost's definitions)."""

    reg_lambda: float
    min_child_weight: float
    min_split_gain: float
    bits: int

    def gains(self, left: np.ndarray, total: np.ndarray) -> np.ndarray:
        """Gain of every candidate (``-inf`` where not admissible); ``left`` (k, 2) and ``total`` (2,) ints."""
        if len(left) == 0:
            return np.zeros(0)
        scale = float(1 << self.bits)
        gl, hl = left[:, 0] / scale, left[:, 1] / scale
        g, h = float(total[0]) / scale, float(total[1]) / scale
        gr, hr = (int(total[0]) - left[:, 0]) / scale, (int(total[1]) - left[:, 1]) / scale
        lam = self.reg_lambda
        with np.errstate(divide="ignore", invalid="ignore"):
            gain = gl * gl / (hl + lam) + gr * gr / (hr + lam) - g * g / (h + lam)
        ok = (hl >= self.min_child_weight) & (hr >= self.min_child_weight) & (gain > self.min_split_gain)
        ok &= (hl > 0) & (hr > 0) & np.isfinite(gain)
        return np.where(ok, gain, -np.inf)

    def leaf(self, total: np.ndarray, learning_rate: float) -> float:
        scale = float(1 << self.bits)
        return float(-(total[0] / scale) / (total[1] / scale + self.reg_lambda) * learning_rate)


def pick(party_gains: list[np.ndarray]) -> tuple[int, float, np.ndarray] | None:
    """``(party index, gain, tied candidate indices)`` of the best split, or None when none is admissible."""
    best: tuple[int, float, np.ndarray] | None = None
    for i, gains in enumerate(party_gains):
        if len(gains) == 0:
            continue
        top = float(gains.max())
        if top == -np.inf:
            continue
        if best is None or top > best[1]:
            best = (i, top, np.flatnonzero(gains == top))
    return best


@dataclass
class SplitTable:
    """A party's recorded splits: the guest only ever learns the ids."""

    bins: Bins
    splits: list[dict] = field(default_factory=list)

    def record(self, cands: Candidates, index: int) -> int:
        j, b, left = int(cands.feature[index]), int(cands.bin[index]), bool(cands.default_left[index])
        cuts = self.bins.cuts[j]
        threshold = float(cuts[b]) if b < len(cuts) else None   # None: every present value goes left
        self.splits.append({"feature": self.bins.names[j], "index": j, "bin": b, "threshold": threshold,
                            "default_left": left})
        return len(self.splits) - 1

    def go_left_bins(self, split: int, bins: np.ndarray) -> np.ndarray:
        """Training rows (by bin) that split ``split`` sends left."""
        s = self.splits[split]
        column = bins[:, s["index"]]
        missing = column == self.bins.missing_bin
        return np.where(missing, s["default_left"], column <= s["bin"])

    def go_left_raw(self, split: int, x: np.ndarray) -> np.ndarray:
        """New rows (raw values) that split ``split`` sends left."""
        s = self.splits[split]
        column = x[:, s["index"]]
        missing = np.isnan(column)
        present = np.ones(len(column), bool) if s["threshold"] is None else column <= s["threshold"]
        return np.where(missing, s["default_left"], present)

    def to_json(self) -> list[dict]:
        return [dict(s) for s in self.splits]


def route(tree: dict, directions: dict[int, np.ndarray], rows: int) -> np.ndarray:
    """The leaf node of every row, given each split node's left mask over the rows."""
    node = np.zeros(rows, dtype=np.int64)
    for n in sorted(directions):
        at = node == n
        node[at] = np.where(directions[n][at], 2 * n + 1, 2 * n + 2)
    return node


def leaf_values(tree: dict, node: np.ndarray) -> np.ndarray:
    values = np.zeros(len(node))
    for n, spec in tree["nodes"].items():
        if "leaf" in spec:
            values[node == int(n)] = spec["leaf"]
    return values
