"""Split finding and the trees, shared by the federated protocol and the reference.

Everything here works on the fixed-point integers of :func:`objective.quantize`,
so the guest, which sees only decrypted sums, and the plaintext reference
compute the same gains bit for bit. A party's split *candidates* are listed
in a canonical order (:func:`candidates`); for feature ``f`` with ``n`` cut
points: ``(b, missing right)`` for ``b < n``, then, if the feature had missing
values, ``(n, missing right)`` (missing apart) and ``(b, missing left)`` for
``b < n``. A categorical feature of ``n`` categories splits one category
against the rest: ``(b, missing right)`` for ``b < n``, then, if it had missing
values, ``(b, missing left)``; its left sum is the category's own bin (plus
the missing bin). A candidate's *left sum* is the (G, H) of the rows it sends left.
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
    categorical: np.ndarray | None = None   # left: the bin ``bin`` alone (one category against the rest)

    def __len__(self) -> int:
        return len(self.feature)


def candidates(bins: Bins, selected: np.ndarray | None = None) -> Candidates:
    """The canonical candidate list over the ``selected`` features (all if None)."""
    feature, bin_, left = [], [], []
    chosen = range(len(bins.cuts)) if selected is None else np.flatnonzero(selected)
    for j in chosen:
        n, cat = len(bins.cuts[j]), bins.is_categorical(j)
        feature.append(np.full(n, j))
        bin_.append(np.arange(n))
        left.append(np.zeros(n, dtype=bool))
        if bins.has_missing[j] and cat:
            feature.append(np.full(n, j))
            bin_.append(np.arange(n))
            left.append(np.ones(n, dtype=bool))
        elif bins.has_missing[j]:
            feature.append(np.full(n + 1, j))
            bin_.append(np.r_[n, np.arange(n)])
            left.append(np.r_[False, np.ones(n, dtype=bool)])
    if not feature:
        return Candidates(np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, bool), np.zeros(0, bool))
    features = np.concatenate(feature).astype(np.int64)
    flags = np.array([bins.is_categorical(int(j)) for j in features], dtype=bool)
    return Candidates(features, np.concatenate(bin_).astype(np.int64), np.concatenate(left), flags)


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
    if cands.categorical is not None and cands.categorical.any():
        cat = cands.categorical
        out[cat] = hist[cands.feature[cat], cands.bin[cat]]
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
    """A party's recorded splits by id: the guest only ever learns a host's ids."""

    bins: Bins
    party: str = ""
    splits: dict[str, dict] = field(default_factory=dict)

    def record(self, cands: Candidates, index: int, sid: str) -> dict:
        j, b, left = int(cands.feature[index]), int(cands.bin[index]), bool(cands.default_left[index])
        cuts = self.bins.cuts[j]
        if self.bins.is_categorical(j):   # one category left, the others right
            spec = {"feature": self.bins.names[j], "index": j, "bin": b, "threshold": None,
                    "categorical": True, "category": float(cuts[b]), "default_left": left}
            self.splits[sid] = spec
            return spec
        threshold = float(cuts[b]) if b < len(cuts) else None   # None: every present value goes left
        spec = {"feature": self.bins.names[j], "index": j, "bin": b, "threshold": threshold, "default_left": left}
        self.splits[sid] = spec
        return spec

    def go_left_bins(self, sid: str, bins: np.ndarray) -> np.ndarray:
        """Training rows (by bin) that split ``sid`` sends left."""
        return go_left_bins(self.splits[sid], bins, self.bins.missing_bin)

    def go_left_raw(self, sid: str, x: np.ndarray) -> np.ndarray:
        """New rows (raw values) that split ``sid`` sends left."""
        return go_left_raw(self.splits[sid], x)

    def to_json(self) -> dict[str, dict]:
        return {sid: dict(spec) for sid, spec in self.splits.items()}


def go_left_bins(spec: dict, bins: np.ndarray, missing_bin: int) -> np.ndarray:
    column = bins[:, spec["index"]]
    present = column == spec["bin"] if spec.get("categorical") else column <= spec["bin"]
    return np.where(column == missing_bin, spec["default_left"], present)


def go_left_raw(spec: dict, x: np.ndarray) -> np.ndarray:
    """Split ``spec``'s direction of raw values: ``value <= threshold`` (None: every present value), or for a
    categorical split ``value == category``; a missing value (NaN) goes to ``default_left``'s side."""
    column = x[:, spec["index"]]
    if spec.get("categorical"):
        present = column == spec["category"]
    else:
        present = np.ones(len(column), bool) if spec["threshold"] is None else column <= spec["threshold"]
    return np.where(np.isnan(column), spec["default_left"], present)
