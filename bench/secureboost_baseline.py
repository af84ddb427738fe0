"""The straightforward SecureBoost histogram crypto on `phe`, value by value, in one process.

This is the baseline of bench/secureboost.py, not product code: the guest
encrypts g and h separately (two `phe` ciphertexts per row), the host sums
them into one ciphertext per (node, feature, bin) for every node being split
(no packing, no sibling trick, no cumulative compression), and the guest
decrypts every bin sum, written the way a first implementation would be,
with `phe.EncryptedNumber` objects in Python loops.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np


@dataclass
class Costs:
    """Seconds and operation counts of one baseline run (per-op costs extrapolate a tree)."""

    encrypt_s: float = 0.0
    encryptions: int = 0
    add_s: float = 0.0
    additions: int = 0
    decrypt_s: float = 0.0
    decryptions: int = 0

    def per(self) -> tuple[float, float, float]:
        return (self.encrypt_s / max(1, self.encryptions), self.add_s / max(1, self.additions),
                self.decrypt_s / max(1, self.decryptions))


def histograms(public_key, private_key, g: np.ndarray, h: np.ndarray, bins: np.ndarray,
               members: dict[int, np.ndarray], n_bins: list[int],
               clock=time.process_time) -> tuple[dict[int, list[tuple[np.ndarray, np.ndarray]]], Costs]:
    """Per node (``members``: node id -> its rows), per feature: (G, H) per bin, decrypted one by one."""
    costs = Costs()
    start = clock()
    enc_g = [public_key.encrypt(float(v)) for v in g]
    enc_h = [public_key.encrypt(float(v)) for v in h]
    costs.encrypt_s, costs.encryptions = clock() - start, 2 * len(g)
    sums: dict[int, list[list[tuple[object, object]]]] = {}
    start = clock()
    for node, rows in members.items():
        per_feature = []
        for f, nb in enumerate(n_bins):
            cells: list[list[object]] = [[None, None] for _ in range(nb)]
            for i in rows:
                cell = cells[bins[i, f]]
                if cell[0] is None:
                    cell[0], cell[1] = enc_g[i], enc_h[i]
                else:
                    cell[0], cell[1] = cell[0] + enc_g[i], cell[1] + enc_h[i]
                    costs.additions += 2
            per_feature.append(cells)
        sums[node] = per_feature
    costs.add_s = clock() - start
    zero = public_key.encrypt(0.0)
    start = clock()
    out: dict[int, list[tuple[np.ndarray, np.ndarray]]] = {}
    for node, per_feature in sums.items():
        out[node] = []
        for cells in per_feature:
            gs = [private_key.decrypt(c[0] if c[0] is not None else zero) for c in cells]
            hs = [private_key.decrypt(c[1] if c[1] is not None else zero) for c in cells]
            costs.decryptions += 2 * len(cells)
            out[node].append((np.array(gs), np.array(hs)))
    costs.decrypt_s = clock() - start
    return out, costs


def tree_seconds(costs: Costs, rows: int, node_rows: list[int], features: int, bins_total: int) -> float:
    """A whole tree's baseline seconds from per-op costs: every split node is built, every bin decrypted.

    Additions are counted from below (a bin's first row costs none), so the
    estimate never favours fedps.
    """
    enc, add, dec = costs.per()
    return (2 * rows * enc + sum(2 * max(0, r * features - bins_total) for r in node_rows) * add
            + 2 * len(node_rows) * bins_total * dec)
