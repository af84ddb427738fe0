"""Push and pull through real shard actors match a per-key numpy reference, for every optimizer."""

from __future__ import annotations

import math
import uuid

import numpy as np
import pytest

from fedps.ps import InitConfig, OptimizerConfig, ParameterServer, PSConfig, TableSpec
from fedps.ps.keys import initial_values


OPTIMIZERS = [
    OptimizerConfig("sgd", learning_rate=0.1, l1=0.01, l2=0.1, schedule="exponential", decay_rate=0.9, decay_steps=2),
    OptimizerConfig("adagrad", learning_rate=0.2, l1=0.005, l2=0.05, schedule="inverse_time", decay_rate=0.5),
    OptimizerConfig("adam", learning_rate=0.05, l1=0.001, l2=0.01),
    OptimizerConfig("ftrl", learning_rate=0.3, l1=0.5, l2=0.1, ftrl_beta=1.0),
]


def _spec(optimizer: OptimizerConfig) -> TableSpec:
    init = InitConfig("zeros") if optimizer.name == "ftrl" else InitConfig("normal", scale=0.1, seed=3)
    return TableSpec(optimizer.name, width=3, dtype="float64", optimizer=optimizer, initializer=init)


TABLES = (
    *(_spec(o) for o in OPTIMIZERS),
    TableSpec("e32", width=8, dtype="float32", optimizer=OptimizerConfig("adagrad", learning_rate=0.1)),
    TableSpec("dense", kind="dense", dim=10, width=2, optimizer=OptimizerConfig("sgd", learning_rate=0.5)),
)


@pytest.fixture(scope="module")
def server(ray_address):
    """One PS for the module (shard actors are slow to start); each test uses its own table."""
    started = ParameterServer.start(PSConfig(f"opt-{uuid.uuid4().hex[:8]}", TABLES, num_shards=3))
    yield started
    started.stop()


def _lr(cfg: OptimizerConfig, step: int) -> float:
    if cfg.schedule == "exponential":
        return cfg.learning_rate * cfg.decay_rate ** (step / cfg.decay_steps)
    if cfg.schedule == "inverse_time":
        return cfg.learning_rate / (1 + cfg.decay_rate * step / cfg.decay_steps)
    return cfg.learning_rate


def _shrink(w: float, t: float) -> float:
    return math.copysign(max(abs(w) - t, 0.0), w)


class Reference:
    """One row at a time, in plain Python floats: the oracle for the shard's vectorised rules."""

    def __init__(self, spec: TableSpec) -> None:
        self.spec, self.cfg = spec, spec.optimizer
        self.rows: dict[int, list[float]] = {}
        self.state: dict[int, dict[str, list[float]]] = {}

    def weights(self, key: int) -> list[float]:
        if key not in self.rows:
            init = initial_values(np.array([key]), self.spec.initializer, self.spec.width, np.dtype("float64"))
            self.rows[key] = [float(v) for v in init[0]]
            w = self.spec.width
            acc = self.cfg.initial_accumulator
            zeros = {name: [0.0] * w for name in ("m", "v", "z", "n")}
            self.state[key] = {"acc": [acc] * w, "t": [0.0], **zeros}
        return self.rows[key]

    def step(self, pushes: list[tuple[np.ndarray, np.ndarray]], step: int) -> None:
        total: dict[int, np.ndarray] = {}
        for keys, grads in pushes:
            for key, grad in zip(keys.tolist(), grads):
                total[key] = total.get(key, 0.0) + grad
        lr = _lr(self.cfg, step)
        for key, grad in total.items():
            w, s = self.weights(key), self.state[key]
            if self.cfg.name == "adam":
                s["t"][0] += 1
            for j, g in enumerate(grad.tolist()):
                w[j] = self._one(w[j], g, j, s, lr)

    def _one(self, w: float, g: float, j: int, s: dict, lr: float) -> float:
        c = self.cfg
        if c.name == "ftrl":
            n_new = s["n"][j] + g * g
            s["z"][j] += g - (math.sqrt(n_new) - math.sqrt(s["n"][j])) / lr * w
            s["n"][j] = n_new
            z = s["z"][j]
            if abs(z) <= c.l1:
                return 0.0
            return -(z - math.copysign(c.l1, z)) / ((c.ftrl_beta + math.sqrt(n_new)) / lr + c.l2)
        g += c.l2 * w
        if c.name == "sgd":
            return _shrink(w - lr * g, lr * c.l1)
        if c.name == "adagrad":
            s["acc"][j] += g * g
            rate = lr / (math.sqrt(s["acc"][j]) + c.epsilon)
            return _shrink(w - rate * g, rate * c.l1)
        s["m"][j] = c.beta1 * s["m"][j] + (1 - c.beta1) * g
        s["v"][j] = c.beta2 * s["v"][j] + (1 - c.beta2) * g * g
        m_hat = s["m"][j] / (1 - c.beta1 ** s["t"][0])
        v_hat = s["v"][j] / (1 - c.beta2 ** s["t"][0])
        return _shrink(w - lr * m_hat / (math.sqrt(v_hat) + c.epsilon), lr * c.l1)


@pytest.mark.parametrize("optimizer", OPTIMIZERS, ids=lambda o: o.name)
def test_pushes_match_the_numpy_reference(server, optimizer):
    table, reference = server.table(optimizer.name), Reference(_spec(optimizer))
    rng = np.random.default_rng(11)
    pool = rng.integers(0, 2**63 - 1, size=60, dtype=np.int64)
    for _ in range(5):
        step, pushes = server.step, []
        for worker in range(2):  # two workers, with keys repeated inside and across pushes
            keys = rng.choice(pool, size=40)
            grads = rng.normal(size=(40, 3))
            table.push(keys, grads, worker=worker)
            pushes.append((keys, grads))
        server.end_step()
        reference.step(pushes, step)
    expected = np.array([reference.weights(int(k)) for k in pool])
    np.testing.assert_allclose(table.pull(pool), expected, rtol=1e-9, atol=1e-12)
    if optimizer.name == "ftrl":
        assert (table.pull(pool) == 0.0).any(), "L1 should zero some FTRL weights"


def test_float32_tables_track_the_reference(server):
    table, reference = server.table("e32"), Reference(server.config.table("e32"))
    rng = np.random.default_rng(5)
    keys = rng.integers(0, 1000, size=500)
    grads = rng.normal(size=(500, 8)).astype(np.float32)
    table.push(keys, grads)
    reference.step([(keys, grads.astype(np.float64))], server.step)
    server.end_step()
    pulled = table.pull(np.unique(keys))
    assert pulled.dtype == np.float32
    np.testing.assert_allclose(pulled, [reference.weights(int(k)) for k in np.unique(keys)], rtol=2e-5, atol=1e-6)


def test_dense_table_rows_follow_sgd(server):
    table = server.table("dense")
    table.push([1, 1, 9], [[1.0, 2.0], [1.0, 0.0], [4.0, 4.0]])
    server.end_step()
    expected = np.zeros((10, 2))
    expected[1] = [-1.0, -1.0]
    expected[9] = [-2.0, -2.0]
    np.testing.assert_array_equal(table.pull(np.arange(10)), expected)
    assert sum(s["rows"] for s in table.stats()) == 10
