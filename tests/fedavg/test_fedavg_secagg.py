"""Secure aggregation maths: five parties and a coordinator as threads over the in-process transport.

The oracle is the plain sample-weighted sum of the same updates.
"""

from __future__ import annotations

import threading

import numpy as np
import pytest

from fedavg_helpers import MemoryStore, play_all

from fedps.algorithms.fedavg import secagg, shamir
from fedps.algorithms.fedavg.params import FedAvgParams
from fedps.algorithms.fedavg.protocol import Coordinator, Party
from fedps.errors import CryptoError, PeerError, ProtocolError
from fedps.messaging.broadcast import BroadcastRefused, InProcessBroadcast
from fedps.messaging.transport import in_process_mesh

SIZE = 40


class FixedUpdates:
    """A party whose local training returns preset updates (so the sum has an exact oracle)."""

    features = ("x0", "x1")

    def __init__(self, name: str, rows: int, seed: int, hang_at: int | None = None) -> None:
        self.name, self.rows = name, rows
        self.rng = np.random.default_rng(seed)
        self.sent: dict[int, np.ndarray] = {}
        self.hang_at = hang_at
        self.release = threading.Event()

    def evaluate(self, theta: np.ndarray, round_: int | None = None) -> dict[str, float]:
        return {"rows": 10, "auc": 0.5 + 0.01 * self.rows % 3, "loss": 0.7, "accuracy": 0.5}

    def train(self, theta: np.ndarray, round_: int) -> tuple[int, np.ndarray]:
        if round_ == self.hang_at:          # killed mid-round: after sharing keys, before its update
            self.release.wait(30)
            raise PeerError(f"{self.name} stopped")
        delta = self.rng.normal(0, 0.5, SIZE)
        self.sent[round_] = delta
        return self.rows, theta + delta


def run_job(names, params, data, coordinator_params=None, broadcast=None):
    mesh = in_process_mesh("job1", ["coord", *names])
    store = MemoryStore()
    broadcast = broadcast or InProcessBroadcast("job1", "coord")
    coordinator = Coordinator("job1", mesh["coord"], coordinator_params or params, store,
                              initial=lambda features: np.zeros(SIZE), broadcast=broadcast)
    parties = {n: Party("job1", n, mesh[n]["coord"], params, data[n], broadcast=broadcast) for n in names}

    def release() -> None:
        for party in data.values():
            party.release.set()

    errors = play_all(coordinator, parties, join_s=30, after_coordinator=release)
    coordinator.broadcast_records = broadcast.records
    return coordinator, store, parties, errors


def oracle(data, names, round_):
    rows = sum(data[n].rows for n in names)
    return sum(data[n].rows * data[n].sent[round_] for n in names) / rows


NAMES = ["p1", "p2", "p3", "p4", "p5"]


def test_secure_sum_equals_plain_sum_to_the_stated_precision():
    params = FedAvgParams(rounds=2, min_parties=3, deadline_s=10, frac_bits=24)
    data = {n: FixedUpdates(n, rows=100 + 37 * i, seed=i) for i, n in enumerate(NAMES)}
    coordinator, store, parties, errors = run_job(NAMES, params, data)
    assert not errors
    for r in range(2):
        expected = store.models[r] + oracle(data, NAMES, r)
        # fixed point: each of 5 rows-weighted terms is off by at most 2^-25 before dividing by the rows
        bound = 5 * 2.0 ** -25 / sum(d.rows for d in data.values())
        assert np.max(np.abs(store.models[r + 1] - expected)) <= bound
    assert [r.participants for r in coordinator.results] == [NAMES, NAMES]
    assert all(np.array_equal(p.final_model, store.models[2]) for p in parties.values())
    # one broadcast record per model (2 rounds and the final one), read by all five parties
    assert len(coordinator.broadcast_records) == 3
    # sample-weighted validation metrics of theta_0 over the five parties
    assert coordinator.results[0].evaluation["rows"] == 50


def test_masked_update_is_uncorrelated_with_the_update():
    rng = np.random.default_rng(7)
    job, names = "j", ["a", "b", "c"]
    secrets_ = {n: secagg.RoundSecrets.fresh() for n in names}
    publics = {n: secrets_[n].public()[1] for n in names}
    update = rng.normal(0, 1, 20_000)
    q = secagg.quantise(update, 24, 2.0 ** 30)
    masked = secagg.mask(q, secrets_["a"], {p: publics[p] for p in ("b", "c")}, job, 0, "a")
    # the masked value is uniform over the ring, whatever the update
    as_float = masked.astype(np.float64) / 2.0 ** 64
    assert abs(np.corrcoef(as_float, update)[0, 1]) < 0.03
    assert abs(as_float.mean() - 0.5) < 0.01
    # the same update masked again in another round shares nothing with the first
    again = secagg.mask(q, secagg.RoundSecrets.fresh(), {p: publics[p] for p in ("b", "c")}, job, 1, "a")
    assert abs(np.corrcoef(as_float, again.astype(np.float64))[0, 1]) < 0.03


def test_a_party_dropped_mid_round_leaves_a_correct_sum_of_the_others():
    params = FedAvgParams(rounds=2, min_parties=3, deadline_s=2, grace_s=0.2, frac_bits=24)
    data = {n: FixedUpdates(n, rows=50 + 10 * i, seed=i, hang_at=0 if n == "p3" else None)
            for i, n in enumerate(NAMES)}
    coordinator, store, parties, errors = run_job(NAMES, params, data)
    others = [n for n in NAMES if n != "p3"]
    assert coordinator.results[0].participants == others
    assert coordinator.results[0].dropped == ["p3"]
    expected = store.models[0] + oracle(data, others, 0)
    assert np.max(np.abs(store.models[1] - expected)) < 1e-6
    assert set(errors) == {"p3"}   # its own (injected) failure; the job went on without it


def test_fewer_parties_than_the_minimum_stops_every_side():
    params = FedAvgParams(rounds=1, min_parties=5, deadline_s=2, grace_s=0.2)
    data = {n: FixedUpdates(n, rows=50, seed=i, hang_at=0 if n == "p5" else None) for i, n in enumerate(NAMES)}
    coordinator, store, parties, errors = run_job(NAMES, params, data)
    assert isinstance(errors["coord"], ProtocolError)
    assert "fewer than params.min_parties = 5" in str(errors["coord"])
    for name in NAMES[:4]:
        assert isinstance(errors[name], ProtocolError), errors.get(name)
        assert "min_parties = 5" in str(errors[name])
    assert 1 not in store.models


def test_shamir_any_threshold_shares_recover_and_fewer_do_not():
    secret = bytes(range(32))
    shares = shamir.split(secret, [1, 2, 3, 4, 5], 3)
    assert shamir.combine({x: shares[x] for x in (1, 4, 5)}, 3) == secret
    assert shamir.combine({x: shares[x] for x in (2, 3, 5)}, 3) == secret
    with pytest.raises(CryptoError):
        shamir.combine({x: shares[x] for x in (1, 2)}, 3)
    assert shamir.combine({x: shares[x] for x in (1, 2)} | {3: shares[3] + 1}, 3) != secret


def test_an_update_beyond_the_fixed_point_range_is_refused():
    with pytest.raises(Exception, match="fixed-point bound"):
        secagg.quantise(np.array([1.0, 2.0 ** 40]), 24, 2.0 ** 30)


class TamperedBroadcast(InProcessBroadcast):
    """The broker alters the model of round 1 on the broadcast topic."""

    def publish(self, tag, value):
        ticket = super().publish(tag, value)
        if tag.iteration == 1:
            record = bytearray(self.records[ticket["offset"]])
            record[-5] ^= 1
            self.records[ticket["offset"]] = bytes(record)
        return ticket


def test_a_tampered_model_broadcast_is_refused_by_every_party_by_name():
    params = FedAvgParams(rounds=2, min_parties=3, deadline_s=2, grace_s=0.2)
    data = {n: FixedUpdates(n, rows=50, seed=i) for i, n in enumerate(NAMES)}
    coordinator, store, parties, errors = run_job(NAMES, params, data, broadcast=TamperedBroadcast("job1", "coord"))
    assert [r.round for r in coordinator.results] == [0]
    for name in NAMES:
        assert isinstance(errors[name], BroadcastRefused), errors.get(name)
        assert "job1/fedavg/it1/b-1/model from coord" in str(errors[name])
        assert "seal does not verify" in str(errors[name])
    assert "fewer than params.min_parties = 3" in str(errors["coord"])
