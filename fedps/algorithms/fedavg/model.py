"""The models FedAvg trains, as flat float64 parameter vectors: logistic regression and a small MLP.

``lr``: ``[w (d), b]``. ``mlp``: one tanh hidden layer of ``h`` units, then a
sigmoid: ``[W1 (d*h), b1 (h), w2 (h), b2]``. :func:`train` runs ``epochs``
epochs of mini-batch SGD on the log loss, optionally with L2 and FedProx's
proximal term ``mu/2 * ||theta - theta_global||^2``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class ModelSpec:
    kind: str
    features: int
    hidden: int = 16

    @property
    def size(self) -> int:
        d, h = self.features, self.hidden
        return d + 1 if self.kind == "lr" else d * h + 2 * h + 1

    def initial(self, seed: int) -> np.ndarray:
        """Zeros for LR; for the MLP, W1 ~ N(0, 1/d) and w2 ~ N(0, 1/h) (seeded), biases zero."""
        theta = np.zeros(self.size)
        if self.kind == "mlp":
            rng = np.random.default_rng(seed)
            d, h = self.features, self.hidden
            theta[: d * h] = rng.normal(0.0, 1.0 / np.sqrt(d), d * h)
            theta[d * h + h: d * h + 2 * h] = rng.normal(0.0, 1.0 / np.sqrt(h), h)
        return theta

    def _unpack(self, theta: np.ndarray) -> tuple[np.ndarray, ...]:
        d, h = self.features, self.hidden
        return (theta[: d * h].reshape(d, h), theta[d * h: d * h + h], theta[d * h + h: d * h + 2 * h],
                theta[d * h + 2 * h])

    def log_odds(self, theta: np.ndarray, x: np.ndarray) -> np.ndarray:
        """Log-odds of label 1 (what :class:`fedps.engine.vertical.scores.ScoreSummary` takes)."""
        if self.kind == "lr":
            return x @ theta[:-1] + theta[-1]
        w1, b1, w2, b2 = self._unpack(theta)
        return np.tanh(x @ w1 + b1) @ w2 + b2

    def scores(self, theta: np.ndarray, x: np.ndarray) -> np.ndarray:
        """Probabilities of label 1."""
        return _sigmoid(self.log_odds(theta, x))

    def gradient(self, theta: np.ndarray, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        """Gradient of the mean log loss over the rows ``x``, ``y``."""
        n = len(y)
        if self.kind == "lr":
            residual = (_sigmoid(x @ theta[:-1] + theta[-1]) - y) / n
            return np.concatenate([x.T @ residual, [residual.sum()]])
        w1, b1, w2, b2 = self._unpack(theta)
        hidden = np.tanh(x @ w1 + b1)
        residual = (_sigmoid(hidden @ w2 + b2) - y) / n
        back = np.outer(residual, w2) * (1.0 - hidden ** 2)
        return np.concatenate([(x.T @ back).ravel(), back.sum(axis=0), hidden.T @ residual, [residual.sum()]])


def _sigmoid(z: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * z))


def log_loss(p: np.ndarray, y: np.ndarray) -> float:
    p = np.clip(p, 1e-12, 1 - 1e-12)
    return float(-np.mean(y * np.log(p) + (1 - y) * np.log(1 - p))) if len(y) else 0.0


def train(spec: ModelSpec, theta0: np.ndarray, x: np.ndarray, y: np.ndarray, *, epochs: int, batch_size: int,
          learning_rate: float, l2: float = 0.0, mu: float = 0.0, seed: int = 0) -> np.ndarray:
    """``epochs`` epochs of mini-batch SGD from ``theta0`` (the round's global model); rows shuffled by ``seed``."""
    theta = theta0.copy()
    rng = np.random.default_rng(seed)
    for _ in range(epochs):
        order = rng.permutation(len(y))
        for start in range(0, len(y), batch_size):
            rows = order[start: start + batch_size]
            grad = spec.gradient(theta, x[rows], y[rows])
            if l2:
                grad += l2 * theta
            if mu:
                grad += mu * (theta - theta0)
            theta -= learning_rate * grad
    return theta


def auc(scores: np.ndarray, labels: np.ndarray) -> float:
    """Area under the ROC curve (ties counted half); NaN when one class is missing."""
    positives = int(np.sum(labels == 1))
    negatives = len(labels) - positives
    if positives == 0 or negatives == 0:
        return float("nan")
    from scipy.stats import rankdata

    ranks = rankdata(scores)
    return float((ranks[labels == 1].sum() - positives * (positives + 1) / 2) / (positives * negatives))
