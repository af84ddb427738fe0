"""Label differential privacy for vertical jobs: an RDP accountant and the Gaussian mechanism.

Whatever a host learns about the guest's labels is a function of releases the
guest (the label owner) noises: each release is a vector query ``Σ_i x_i·d_i``
over the rows of a batch, where changing one label changes ``d_i`` by at most
1, so a row's influence is at most ``‖x_i‖ ≤ C`` once every party clips its
rows to the agreed norm. Adding ``N(0, (σ·C)²)`` to every coordinate is the
Gaussian mechanism with noise multiplier ``σ``. The batches of an epoch are
disjoint, so one label takes part in one release per epoch: an epoch costs one
Gaussian mechanism, and ``E`` epochs compose ``E`` of them.

The accountant implements the published formulas itself (no dependency):

- Rényi DP of the Gaussian mechanism, ``ε(α) = α / (2σ²)`` (Mironov 2017, Prop. 7);
- Rényi DP of the Poisson-subsampled Gaussian mechanism at integer orders
  (Mironov, Talwar, Zhang 2019, Sec. 3.3), for jobs that sample batches;
- RDP composition by addition, and the conversion to ``(ε, δ)``, either
  the classic ``ε = rdp − log δ / (α − 1)`` (Mironov 2017, Prop. 3; what
  TensorFlow Privacy's ``compute_dp_sgd_privacy`` printed) or the tighter
  ``ε = rdp + log(1 − 1/α) − (log δ + log α) / (α − 1)`` (Balle et al. 2020,
  Thm. 21), the default.

SecureBoost can use the same accountant (one release per tree level of the
noised histograms it sends) and :func:`add_to_masked` for noise it adds to
values it decrypts for a peer.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

from fedps.errors import ConfigError

log = logging.getLogger(__name__)

#: Rényi orders the accountant minimises over (fractional ones for the plain Gaussian).
ORDERS: tuple[float, ...] = tuple([1.0 + x / 10.0 for x in range(1, 100)] + list(range(11, 64)) + [64, 128, 256, 512])
INTEGER_ORDERS: tuple[int, ...] = tuple(range(2, 64)) + (64, 128, 256, 512)


def _log_add(a: float, b: float) -> float:
    high, low = max(a, b), min(a, b)
    return high if low == -math.inf else high + math.log1p(math.exp(low - high))


def rdp_gaussian(sigma: float, alpha: float) -> float:
    """Rényi DP at order ``alpha`` of one Gaussian mechanism with noise multiplier ``sigma``."""
    return alpha / (2.0 * sigma * sigma)


def rdp_subsampled_gaussian(q: float, sigma: float, alpha: int) -> float:
    """Rényi DP at integer order ``alpha`` of the Poisson-subsampled Gaussian (rate ``q``)."""
    if q == 0:
        return 0.0
    if q >= 1.0:
        return rdp_gaussian(sigma, alpha)
    log_a = -math.inf
    for k in range(alpha + 1):
        term = (math.lgamma(alpha + 1) - math.lgamma(k + 1) - math.lgamma(alpha - k + 1)
                + k * math.log(q) + (alpha - k) * math.log1p(-q) + (k * k - k) / (2.0 * sigma * sigma))
        log_a = _log_add(log_a, term)
    return log_a / (alpha - 1)


def epsilon_from_rdp(orders: Sequence[float], rdp: Sequence[float], delta: float,
                     conversion: str = "balle") -> tuple[float, float]:
    """The smallest ``ε`` over the orders at ``delta``, and the order that gave it."""
    best, order = math.inf, float("nan")
    for alpha, r in zip(orders, rdp):
        if conversion == "classic":
            eps = r - math.log(delta) / (alpha - 1)
        else:
            eps = r + math.log1p(-1.0 / alpha) - (math.log(delta) + math.log(alpha)) / (alpha - 1)
        if eps < best:
            best, order = eps, alpha
    return max(0.0, best), order


@dataclass
class Accountant:
    """RDP accounting of repeated (optionally subsampled) Gaussian releases."""

    noise_multiplier: float
    delta: float = 1e-5
    sample_rate: float = 1.0
    conversion: str = "balle"
    steps: int = 0
    orders: tuple[float, ...] = field(init=False)

    def __post_init__(self) -> None:
        if self.noise_multiplier <= 0:
            raise ConfigError(f"the noise multiplier must be positive, got {self.noise_multiplier!r}")
        if not 0 < self.delta < 1:
            raise ConfigError(f"delta must be in (0, 1), got {self.delta!r}")
        self.orders = ORDERS if self.sample_rate >= 1.0 else INTEGER_ORDERS

    def rdp(self, steps: int) -> list[float]:
        if self.sample_rate >= 1.0:
            return [steps * rdp_gaussian(self.noise_multiplier, a) for a in self.orders]
        return [steps * rdp_subsampled_gaussian(self.sample_rate, self.noise_multiplier, int(a))
                for a in self.orders]

    def epsilon(self, steps: int | None = None) -> float:
        """``ε`` at ``delta`` after ``steps`` releases (default: the ones recorded)."""
        steps = self.steps if steps is None else steps
        if steps == 0:
            return 0.0
        return epsilon_from_rdp(self.orders, self.rdp(steps), self.delta, self.conversion)[0]

    def step(self, count: int = 1) -> float:
        self.steps += count
        return self.epsilon()


def calibrate(epsilon: float, delta: float, releases: int, sample_rate: float = 1.0) -> float:
    """The smallest noise multiplier whose ``releases`` stay within ``(epsilon, delta)`` (bisection)."""
    if epsilon <= 0:
        raise ConfigError(f"the privacy budget must be positive, got epsilon = {epsilon!r}")
    low, high = 1e-2, 1e3
    if Accountant(high, delta, sample_rate).epsilon(releases) > epsilon:
        raise ConfigError(f"no noise multiplier up to {high} keeps {releases} releases within epsilon = {epsilon}")
    for _ in range(60):
        mid = math.sqrt(low * high)
        if Accountant(mid, delta, sample_rate).epsilon(releases) > epsilon:
            low = mid
        else:
            high = mid
    return high


# --------------------------------------------------------------------------- the mechanism
def clip_rows(x: np.ndarray, norm: float) -> np.ndarray:
    """Rows scaled down to L2 norm at most ``norm`` (a row's influence on any release)."""
    norms = np.linalg.norm(x, axis=1)
    factor = np.minimum(1.0, norm / np.maximum(norms, 1e-300))
    return x * factor[:, None]


def gaussian_noise(rng: np.random.Generator, sigma: float, sensitivity: float, size: int) -> np.ndarray:
    return rng.normal(0.0, sigma * sensitivity, size)


def add_to_masked(masked: Sequence[int], noise: np.ndarray, slots: int, slot_bits: int,
                  frac_bits: int) -> list[int]:
    """Add fixed-point ``noise`` to the values inside masked (packed) plaintexts.

    The decrypting party sees only ``packed value + mask``; adding the packed
    noise there gives the sender ``value + noise`` once it removes its mask,
    and the decrypting party never learns the value. ``slots`` values share a
    plaintext, value ``i`` in slot ``i % slots`` of plaintext ``i // slots``.
    """
    ints = [int(v) for v in masked]
    encoded = np.rint(np.ldexp(np.asarray(noise, dtype=np.float64), frac_bits)).astype(object)
    for i, value in enumerate(encoded):
        j, slot = divmod(i, slots)
        if j >= len(ints):
            raise ConfigError(f"{len(noise)} noise values for {len(ints)} plaintexts of {slots} slots")
        ints[j] += int(value) << (slot * slot_bits)
    return ints


# --------------------------------------------------------------------------- audits: what a host can infer
def min_norm_label_scores(views: Sequence[tuple], x: np.ndarray, rows: int) -> np.ndarray:
    """The simplest gradient-inversion attack: per batch the minimum-norm ``d̂`` behind the gradient.

    ``views`` are a host's ``(epoch, rows, u_h, gradient)`` per batch and ``x``
    its own (transformed) features; ``d̂ = X_b (X_bᵀX_b)⁺ g`` and ``−d̂`` is a
    label score, averaged over the epochs a row was seen in.
    """
    score, seen = np.zeros(rows), np.zeros(rows)
    for _, batch, _, gradient in views:
        xb = x[batch]
        d_hat = xb @ (np.linalg.pinv(xb.T @ xb) @ gradient)
        score[batch] -= d_hat
        seen[batch] += 1
    return score / np.maximum(seen, 1)


def multi_epoch_label_scores(views: Sequence[tuple], x: np.ndarray, rows: int, iterations: int = 300) -> np.ndarray:
    """The stronger attack: one least-squares solve over every batch of every epoch together.

    A host knows ``g_b − X_bᵀ(0.25·u_h,b) = X_bᵀ r_b`` with ``r = 0.25·u_g + 0.5 − y``
    nearly the same across epochs; stacking all batches gives more equations
    than rows after ``B / F`` epochs. The minimum-norm ``r`` (LSQR) gives ``−r``
    as a label score.
    """
    from scipy import sparse
    from scipy.sparse.linalg import lsqr

    features = x.shape[1]
    r_i, r_j, vals, rhs = [], [], [], []
    eq = 0
    for _, batch, u_h, gradient in views:
        xb = x[batch]
        for f in range(features):
            r_i.append(np.full(len(batch), eq + f))
            r_j.append(batch)
            vals.append(xb[:, f])
        rhs.append(gradient - xb.T @ (0.25 * u_h))
        eq += features
    matrix = sparse.csr_matrix((np.concatenate(vals), (np.concatenate(r_i), np.concatenate(r_j))), shape=(eq, rows))
    solution = lsqr(matrix, np.concatenate(rhs), iter_lim=iterations)[0]
    return -solution
