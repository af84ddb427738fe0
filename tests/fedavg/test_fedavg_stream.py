"""Updates summed slice by slice: a party that stops mid-update leaves nothing of itself in the sum.

Five parties and a coordinator; one party's link is cut (the injected fault)
after it has sent some slices of its update. The oracle is the sample-weighted
sum of the other parties' updates. In process for both aggregation modes and a
malformed slice, through the embedded broker with real sealed channels for the
secure mode (the coordinator re-reads the cut party's slices from its topic).
"""

from __future__ import annotations

import threading
from contextlib import ExitStack

import numpy as np
import pytest

from fedavg_helpers import MemoryStore, play_all

from fedps.algorithms.fedavg import secagg, stream
from fedps.algorithms.fedavg.params import FedAvgParams
from fedps.algorithms.fedavg.protocol import Coordinator, Party
from fedps.errors import PeerError
from fedps.messaging.broadcast import InProcessBroadcast
from fedps.messaging.tags import Scope
from fedps.messaging.transport import in_process_mesh

SIZE = 40            # 41 values on the wire with the row count: 6 slices of 8
NAMES = ["p1", "p2", "p3", "p4", "p5"]


class Updates:
    """Preset updates, so the sum has an exact oracle."""

    features = ("x0", "x1")

    def __init__(self, rows: int, seed: int, size: int = SIZE) -> None:
        self.rows, self.size = rows, size
        self.rng = np.random.default_rng(seed)
        self.sent: dict[int, np.ndarray] = {}

    def evaluate(self, theta, round_=None):
        return {"rows": 10, "auc": 0.5, "loss": 0.7, "accuracy": 0.5}

    def train(self, theta, round_):
        delta = self.rng.normal(0, 0.5, self.size)
        self.sent[round_] = delta
        return self.rows, theta + delta


class CutAfter:
    """A party's link that dies after ``slices`` slices of its round-0 update (the injected fault)."""

    def __init__(self, inner, slices: int, bad_slice: bool = False) -> None:
        self.inner, self.slices, self.bad_slice = inner, slices, bad_slice

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def send(self, tag, value):
        if tag.name == stream.NAME and tag.iteration == 0 and tag.batch >= self.slices:
            if self.bad_slice:   # a malformed slice instead: the rest still follows
                return self.inner.send(tag, value.astype(np.float32) if tag.batch == self.slices else value)
            raise PeerError("killed mid-update")
        return self.inner.send(tag, value)


def expected_step(data, names, round_):
    return sum(data[n].rows * data[n].sent[round_] for n in names) / sum(data[n].rows for n in names)


def run_in_process(params, cut: CutAfter | None):
    mesh = in_process_mesh("job1", ["coord", *NAMES])
    hub = InProcessBroadcast("job1", "coord")
    store = MemoryStore()
    data = {n: Updates(rows=50 + 10 * i, seed=i) for i, n in enumerate(NAMES)}
    coordinator = Coordinator("job1", mesh["coord"], params, store, initial=lambda f: np.zeros(SIZE), broadcast=hub)
    links = {n: mesh[n]["coord"] for n in NAMES}
    if cut is not None:
        cut.inner = links["p3"]
        links["p3"] = cut
    parties = {n: Party("job1", n, links[n], params, data[n], broadcast=hub) for n in NAMES}
    return coordinator, store, data, play_all(coordinator, parties)


@pytest.mark.parametrize("secure", [True, False])
def test_a_party_killed_mid_update_leaves_the_sum_of_the_others(secure):
    params = FedAvgParams(rounds=2, min_parties=3, deadline_s=2, grace_s=0.2, secure=secure, slice_values=8)
    coordinator, store, data, errors = run_in_process(params, CutAfter(None, slices=3))
    others = [n for n in NAMES if n != "p3"]
    assert coordinator.results[0].participants == others
    assert coordinator.results[0].dropped == ["p3"]
    np.testing.assert_allclose(store.models[1], expected_step(data, others, 0), rtol=0, atol=1e-6)
    assert set(errors) == {"p3"}   # its own (injected) death; the job went on without it


def test_a_malformed_slice_drops_the_party_and_its_earlier_slices():
    params = FedAvgParams(rounds=1, min_parties=3, deadline_s=2, grace_s=0.2, slice_values=8)
    coordinator, store, data, errors = run_in_process(params, CutAfter(None, slices=2, bad_slice=True))
    others = [n for n in NAMES if n != "p3"]
    assert coordinator.results[0].dropped == ["p3"]
    np.testing.assert_allclose(store.models[1], expected_step(data, others, 0), rtol=0, atol=1e-6)


def test_slices_tile_the_update_and_a_short_stream_is_refused():
    from fedps.messaging.transport import in_process_pair

    a, b = in_process_pair("j", "a", "b")
    scope = Scope("j", "fedavg").at(iteration=0)
    update = np.arange(19, dtype=np.uint64)
    assert stream.send(a, scope, update, 8) == 3
    total = np.full(19, 2 ** 64 - 1, dtype=np.uint64)
    stream.add(b, scope, total, lambda: 1.0, "a")
    assert np.array_equal(total, update - np.uint64(1))   # mod 2^64
    stream.send(a, scope.at(iteration=1), update[:16], 8)    # 16 of 19 values: the stream never ends
    total = np.zeros(19, dtype=np.uint64)
    with pytest.raises(PeerError):
        stream.add(b, scope.at(iteration=1), total, lambda: 0.2, "a")
    assert not total.any()                                   # the two slices added were taken back


def test_dequantise_in_place_equals_dequantise():
    values = secagg.quantise(np.random.default_rng(1).normal(0, 100, 300_001), 24, 2.0 ** 30)
    expected = secagg.dequantise(values, 24)
    got = secagg.dequantise_in_place(values, 24)
    assert np.shares_memory(got, values)
    assert np.array_equal(got, expected)


@pytest.mark.timeout(240)
def test_a_party_killed_mid_update_through_the_broker(make_parties, job_id):
    from fedps.messaging.broadcast import BroadcastReceiver, BroadcastSender
    from fedps.messaging.channel import Channel

    size = 3000                 # 3001 values in 47 slices of 64; p3 dies after 20
    params = FedAvgParams(rounds=2, min_parties=3, deadline_s=4, grace_s=0.5, slice_values=64)
    configs = make_parties("coord", *NAMES, recv_timeout_s=60)
    data = {n: Updates(rows=50 + 10 * i, seed=i, size=size) for i, n in enumerate(NAMES)}
    store = MemoryStore()
    errors: dict[str, Exception] = {}

    def party(name: str) -> None:
        try:
            with ExitStack() as stack:
                link = stack.enter_context(Channel(job_id, name, "coord", configs[name]).open())
                hub = stack.enter_context(BroadcastReceiver.beside(link).open())
                Party(job_id, name, CutAfter(link, 20) if name == "p3" else link, params, data[name],
                      broadcast=hub).run()
        except Exception as exc:   # collected for the test to look at
            errors[name] = exc

    threads = [threading.Thread(target=party, args=(n,), daemon=True) for n in NAMES]
    for t in threads:
        t.start()
    with ExitStack() as stack:
        channels = {n: stack.enter_context(Channel(job_id, "coord", n, configs["coord"]).open()) for n in NAMES}
        hub = stack.enter_context(BroadcastSender.beside(channels["p1"]).open())
        coordinator = Coordinator(job_id, channels, params, store, initial=lambda f: np.zeros(size), broadcast=hub)
        coordinator.run()
    for t in threads:
        t.join(60)
    others = [n for n in NAMES if n != "p3"]
    assert [r.dropped for r in coordinator.results] == [["p3"], ["p3"]]
    bound = 5 * 2.0 ** -25 / sum(data[n].rows for n in others)   # fixed point, as in test_fedavg_secagg
    assert np.max(np.abs(store.models[1] - expected_step(data, others, 0))) <= bound
    assert np.max(np.abs(store.models[2] - store.models[1] - expected_step(data, others, 1))) <= bound
    assert set(errors) == {"p3"}


def test_slices_that_cannot_be_read_again_spoil_the_sum_loudly():
    from fedps.messaging.transport import in_process_pair

    class Forgetful:
        def __init__(self, inner):
            self.inner = inner

        def __getattr__(self, name):
            return getattr(self.inner, name)

        def rewind(self, position):
            raise PeerError("the topic is gone")

    a, b = in_process_pair("j", "a", "b")
    scope = Scope("j", "fedavg").at(iteration=0)
    stream.send(a, scope, np.arange(16, dtype=np.uint64), 8)
    with pytest.raises(stream.SumSpoiled, match="could not be read again"):
        stream.add(Forgetful(b), scope, np.zeros(19, dtype=np.uint64), lambda: 0.2, "a")
