"""The straightforward vertical-LR protocol on `phe`, value by value, in one process.

This is the baseline of bench/hetero_lr.py, not product code: the same maths as
fedps.algorithms.hetero_lr.protocol (Taylor loss, each party encrypting under
its own key, masked gradients decrypted by the other side), written the way a
first implementation would be, with `phe.EncryptedNumber` objects in Python
loops.
"""

from __future__ import annotations

import math
import random
import time

import numpy as np
from phe import paillier


def masked_decrypt(private_key, encrypted: list) -> tuple[np.ndarray, float]:
    """Mask each value, let the key owner decrypt, unmask (the round trip of steps 3-5)."""
    masks = [random.uniform(-1e6, 1e6) for _ in encrypted]
    plain = [private_key.decrypt(e + r) for e, r in zip(encrypted, masks)]
    return np.array([p - r for p, r in zip(plain, masks)])


def batch(keys: dict, xg: np.ndarray, xh: np.ndarray, y: np.ndarray, wg: np.ndarray, bg: float,
          wh: np.ndarray) -> tuple[np.ndarray, float, np.ndarray, float]:
    """One mini-batch; returns the guest's gradient, intercept gradient, host gradient and loss."""
    (pk_g, sk_g), (pk_h, sk_h) = keys["guest"], keys["host"]
    u_g, u_h = xg @ wg + bg, xh @ wh
    # 1. host -> guest: [[0.25 u_h]]_H and [[sum u_h^2]]_H
    enc_uh = [pk_h.encrypt(0.25 * float(v)) for v in u_h]
    enc_q = pk_h.encrypt(float(np.sum(u_h ** 2)))
    # 2. guest -> host: [[0.25 u_g + 0.5 - y]]_G
    part = 0.25 * u_g + 0.5 - y
    enc_part = [pk_g.encrypt(float(v)) for v in part]
    # 3. guest: [[d]]_H, [[X_g^T d]]_H and the loss, decrypted by the host behind masks
    d_h = [e + float(p) for e, p in zip(enc_uh, part)]
    xg1 = np.hstack([xg, np.ones((len(y), 1))])
    grad_g_enc = [sum(d * float(x) for d, x in zip(d_h, xg1[:, j])) for j in range(xg1.shape[1])]
    coef = 4.0 * (0.5 - y + 0.25 * u_g)
    loss_enc = sum(e * float(c) for e, c in zip(enc_uh, coef)) + enc_q * 0.125
    # 4. host: [[d]]_G and [[X_h^T d]]_G, decrypted by the guest behind masks
    d_g = [e + 0.25 * float(u) for e, u in zip(enc_part, u_h)]
    grad_h_enc = [sum(d * float(x) for d, x in zip(d_g, xh[:, j])) for j in range(xh.shape[1])]
    # 5. the masked round trips
    grad_g = masked_decrypt(sk_h, grad_g_enc + [loss_enc])
    grad_h = masked_decrypt(sk_g, grad_h_enc)
    loss_plain = len(y) * math.log(2) + float(np.sum((0.5 - y) * u_g) + 0.125 * np.sum(u_g ** 2))
    loss = (loss_plain + grad_g[-1]) / len(y)
    return grad_g[:-2], grad_g[-2], grad_h, loss


def run(xg, xh, y, batches: list[np.ndarray], bits: int, learning_rate: float, limit: int | None = None):
    """Train over ``batches`` (up to ``limit``); returns weights and seconds per batch."""
    keys = {name: paillier.generate_paillier_keypair(n_length=bits) for name in ("guest", "host")}
    wg, bg, wh = np.zeros(xg.shape[1]), 0.0, np.zeros(xh.shape[1])
    times = []
    for rows in batches[:limit]:
        started = time.perf_counter()
        g, gb, h, _ = batch(keys, xg[rows], xh[rows], y[rows], wg, bg, wh)
        wg, bg, wh = wg - learning_rate * g / len(rows), bg - learning_rate * gb / len(rows), wh - learning_rate * h / len(rows)
        times.append(time.perf_counter() - started)
    return (wg, bg, wh), times
