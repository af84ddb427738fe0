"""Update rules that run on the shard: SGD, Adagrad, Adam and FTRL-Proximal.

Each rule is a function ``update(rows, grads, lr, config)`` that updates the
gathered rows of one push in place: ``rows.weights`` and the rule's state
arrays in ``rows.state``. The shard gathers the touched rows, calls the rule
once for the whole batch and scatters the rows back, so no rule ever loops
over keys. ``STATE`` says which per-row state arrays a rule keeps and their
initial value; the widths are the table's width except Adam's step count.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

from fedps.ps.config import OptimizerConfig


@dataclass
class Rows:
    """The rows one update touches: weights ``(n, width)`` and named state arrays."""

    weights: np.ndarray
    state: dict[str, np.ndarray]


def learning_rate(config: OptimizerConfig, step: int) -> float:
    """The learning rate at ``step`` under the configured schedule."""
    if config.schedule == "exponential":
        return config.learning_rate * config.decay_rate ** (step / config.decay_steps)
    if config.schedule == "inverse_time":
        return config.learning_rate / (1.0 + config.decay_rate * step / config.decay_steps)
    return config.learning_rate


def _shrink(weights: np.ndarray, threshold: np.ndarray | float) -> None:
    """The L1 proximal step: move every weight ``threshold`` towards zero, stopping at zero."""
    np.copyto(weights, np.sign(weights) * np.maximum(np.abs(weights) - threshold, 0.0))


def sgd(rows: Rows, grads: np.ndarray, lr: float, config: OptimizerConfig) -> None:
    w = rows.weights
    g = grads + config.l2 * w if config.l2 else grads
    w -= lr * g
    if config.l1:
        _shrink(w, lr * config.l1)


def adagrad(rows: Rows, grads: np.ndarray, lr: float, config: OptimizerConfig) -> None:
    w, acc = rows.weights, rows.state["accumulator"]
    g = grads + config.l2 * w if config.l2 else grads
    acc += g * g
    step = lr / (np.sqrt(acc) + config.epsilon)
    w -= step * g
    if config.l1:
        _shrink(w, step * config.l1)


def adam(rows: Rows, grads: np.ndarray, lr: float, config: OptimizerConfig) -> None:
    """Adam with per-row step counts (lazy Adam: rows not pushed are not decayed)."""
    w, m, v, t = rows.weights, rows.state["m"], rows.state["v"], rows.state["t"]
    g = grads + config.l2 * w if config.l2 else grads
    t += 1.0
    m *= config.beta1
    m += (1.0 - config.beta1) * g
    v *= config.beta2
    v += (1.0 - config.beta2) * (g * g)
    m_hat = m / (1.0 - config.beta1**t)
    v_hat = v / (1.0 - config.beta2**t)
    w -= lr * m_hat / (np.sqrt(v_hat) + config.epsilon)
    if config.l1:
        _shrink(w, lr * config.l1)


def ftrl(rows: Rows, grads: np.ndarray, lr: float, config: OptimizerConfig) -> None:
    """FTRL-Proximal (McMahan et al. 2013) with ``alpha = lr``; weights follow from ``z`` and ``n``."""
    w, z, n = rows.weights, rows.state["z"], rows.state["n"]
    n_new = n + grads * grads
    sigma = (np.sqrt(n_new) - np.sqrt(n)) / lr
    z += grads - sigma * w
    np.copyto(n, n_new)
    shrunk = np.sign(z) * np.maximum(np.abs(z) - config.l1, 0.0)
    np.copyto(w, -shrunk / ((config.ftrl_beta + np.sqrt(n)) / lr + config.l2))


Update = Callable[[Rows, np.ndarray, float, OptimizerConfig], None]

UPDATES: dict[str, Update] = {"sgd": sgd, "adagrad": adagrad, "adam": adam, "ftrl": ftrl}


def state_layout(config: OptimizerConfig, width: int) -> dict[str, tuple[int, float]]:
    """Per-row state arrays of a rule: name -> (width, initial value)."""
    if config.name == "adagrad":
        return {"accumulator": (width, config.initial_accumulator)}
    if config.name == "adam":
        return {"m": (width, 0.0), "v": (width, 0.0), "t": (1, 0.0)}
    if config.name == "ftrl":
        return {"z": (width, 0.0), "n": (width, 0.0)}
    return {}


def apply_update(config: OptimizerConfig, rows: Rows, grads: np.ndarray, step: int) -> None:
    """Apply the configured rule to ``rows`` with the learning rate of ``step``."""
    UPDATES[config.name](rows, grads, learning_rate(config, step), config)
