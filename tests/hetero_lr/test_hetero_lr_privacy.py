"""Labels stay the guest's: a curious host's gradient-inversion attacks, the noise inside the mask, the budget.

The attacks run on the protocol's plaintext maths (``plaintext_training``
records what a host learns per batch); the noise test runs steps 4–5 with
real 512-bit keys over the in-process transport; the budget test runs a job
on the executor runtime (parties as threads, local Spark, Ray and broker).
"""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from fedps.algorithms.hetero_lr import protocol
from fedps.algorithms.hetero_lr.params import LRParams
from fedps.algorithms.hetero_lr.protocol import Crypto, Port, Roles, plaintext_training
from fedps.engine.crypto import FixedPoint, generate_keypair
from fedps.engine.crypto.encoding import decode_ints
from fedps.engine.vertical.plan import validation_rows
from fedps.engine.vertical.privacy import min_norm_label_scores, multi_epoch_label_scores
from fedps.messaging.tags import Scope
from fedps.messaging.transport import in_process_mesh
from test_hetero_lr_quality import vertical

#: The settings before this fix: plain SGD on raw features, no label DP, the smallest batch the floor allows.
BEFORE = dict(optimizer="sgd", learning_rate=0.15, schedule="constant", decay_rate=1.0, decay_steps=1,
              standardize=False, label_dp=False, batch_size=52, epochs=5)


def _auc(y, score) -> float:
    from sklearn.metrics import roc_auc_score

    return float(roc_auc_score(y, score))


def own_features_auc(xh: np.ndarray, y: np.ndarray) -> float:
    """What a model fitted with the labels on the host's features alone reaches (on those rows)."""
    from sklearn.linear_model import LogisticRegression

    return _auc(y, LogisticRegression(max_iter=5000).fit(xh, y).decision_function(xh))


def attacks(xg, xh, y, train, params) -> tuple[float, float]:
    run = plaintext_training({"guest": xg, "host": xh}, y, train, params, watch="host")
    z = run.transforms["host"].apply(xh)
    single = min_norm_label_scores(run.host_views, z, len(y))
    multi = multi_epoch_label_scores(run.host_views, z, len(y))
    return _auc(y[train], single[train]), _auc(y[train], multi[train])


@pytest.mark.parametrize("name", ["breast", "default_credit"])
def test_a_hosts_gradient_inversion_learns_no_more_than_its_own_features_tell(name):
    xg, xh, y, keys = vertical(name)
    train = ~validation_rows(keys, 0.3, 0)
    own = own_features_auc(xh[train], y[train])
    single, multi = attacks(xg, xh, y, train, LRParams())      # the default budget
    assert single <= own + 0.03 and multi <= own + 0.03, (single, multi, own)
    if name == "default_credit":   # without label DP the same attacks beat the host's own features by far
        single, multi = attacks(xg, xh, y, train, LRParams(**BEFORE))
        assert single > own + 0.15 and multi > own + 0.15, (single, multi, own)


KEY_BITS = 512


@pytest.fixture(scope="module")
def keys():
    return {name: generate_keypair(KEY_BITS) for name in ("guest", "h1")}


class Spy:
    """A transport that keeps what its party sent."""

    def __init__(self, inner) -> None:
        self.inner, self.sent = inner, []

    def send(self, tag, value) -> None:
        self.sent.append((tag.name, value))
        self.inner.send(tag, value)

    def recv(self, tag):
        return self.inner.recv(tag)


def test_noise_is_added_by_the_guest_inside_the_hosts_mask(keys):
    public = {name: pair[0] for name, pair in keys.items()}
    crypto = {name: Crypto(keys[name][1], public, name) for name in keys}
    roles = {name: Roles(name, "guest", ["h1"]) for name in keys}
    fixed = FixedPoint(frac_bits=40, int_bits=24)
    rng = np.random.default_rng(7)
    g_host, g_guest = rng.normal(0, 20, 6), rng.normal(0, 20, 4)
    drawn = {"guest": rng.normal(0, 3, 4), "h1": rng.normal(0, 3, 6)}

    def noise(party, length):
        assert length == len(drawn[party])
        return drawn[party]

    mesh = in_process_mesh("job1", ["guest", "h1"])
    spy = Spy(mesh["guest"]["h1"])
    mesh["guest"]["h1"] = spy
    scope = Scope("job1", "train").at(iteration=0, batch=0)
    out, errors = {}, []

    def guest():
        gradient = crypto["guest"].encryptor("h1").encrypt(g_guest, fixed)
        out["guest"] = protocol.guest_step(Port(mesh["guest"], scope), crypto["guest"], roles["guest"], gradient,
                                           None, b"g" * 32, noise)[0]

    def host():
        gradient = crypto["h1"].encryptor("guest").encrypt(g_host, fixed)
        out["h1"] = protocol.host_step(Port(mesh["h1"], scope), crypto["h1"], roles["h1"], gradient, False,
                                       b"h" * 32)

    def safely(fn):
        try:
            fn()
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=safely, args=(fn,)) for fn in (guest, host)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, errors
    np.testing.assert_allclose(out["h1"], g_host + drawn["h1"], atol=1e-9)        # the host gets g + z ...
    np.testing.assert_allclose(out["guest"], g_guest + drawn["guest"], atol=1e-9)  # ... and the guest's own too
    sent = [value for name, value in spy.sent if name == protocol.HOST_GRAD_PLAIN.name]
    assert len(sent) == 1
    seen = decode_ints(protocol.ints_from(sent[0]), fixed.frac_bits)
    assert np.min(np.abs(seen[:1] - (g_host + drawn["h1"])[:1])) > 1e6          # the guest saw value + mask only


def test_a_job_whose_budget_runs_out_stops_after_the_last_epoch_it_can_afford(tmp_path, spark, ray_address,
                                                                              make_parties, job_id):
    from fedps.algorithms.hetero_lr.local import run_in_threads
    from fedps.engine.layout import build_layout, id_digest

    data = Path(__file__).parents[2] / "data"
    files = {"guest": data / "breast_hetero_guest.csv", "host": data / "breast_hetero_host.csv"}
    layouts = {n: build_layout(spark, str(path), folder=str(tmp_path / "layout" / n), partitions=4,
                               label_column="y" if n == "guest" else None) for n, path in files.items()}
    # noise multiplier 1: one epoch spends epsilon 4.7, two 7.1; a budget of 5 affords one epoch of four
    params = LRParams(epochs=4, key_bits=512, partitions=4, tasks=1, dp_noise=1.0, dp_epsilon=5.0,
                      export_validation=True, loss_every=0)
    configs = make_parties("guest", "host", recv_timeout_s=120)
    results = run_in_threads(job_id, configs, layouts, {"guest": params, "host": params}, tmp_path / "out", spark)
    assert not {n: r.error for n, r in results.items() if r.error is not None}
    guest, host = results["guest"].state, results["host"].state
    assert guest.epoch == host.epoch == 1 and guest.stopped == "privacy budget"
    assert 4.0 < guest.epsilon <= 5.0
    assert results["guest"].metrics["final"]["auc"] > 0.9
    assert "transform" in results["host"].model                   # standardised with the host's own statistics
    # the exported validation rows are the job's validation split, the same on both sides
    ids = pd.read_csv(files["guest"])["id"]
    row_keys = np.array([int.from_bytes(id_digest(str(i))[:8], "big") >> 1 for i in ids], dtype=np.int64)
    expected = sorted(row_keys[validation_rows(row_keys, params.validation_fraction, params.seed)].tolist())
    for name in files:
        parts = sorted((tmp_path / "out" / name / "validation_rows").glob("part-*.csv"))
        exported = sorted(pd.concat([pd.read_csv(p) for p in parts])["row_key"].tolist())
        assert exported == expected, name


def test_a_budget_set_to_warn_trains_on_and_says_so(caplog):
    from fedps.algorithms.hetero_lr.trainer import Trainer

    params = LRParams(epochs=4, dp_noise=1.0, dp_epsilon=5.0, dp_on_budget="warn")
    trainer = Trainer(job=None, params=params, roles=Roles("guest", "guest", ["h1"]), plan=None, crypto=None)
    assert trainer._over_budget(0) is False and "dp_on_budget = warn" in caplog.text
    stopping = Trainer(job=None, params=LRParams(epochs=4, dp_noise=1.0, dp_epsilon=5.0),
                       roles=Roles("guest", "guest", ["h1"]), plan=None, crypto=None)
    assert stopping._over_budget(0) is True
    off = Trainer(job=None, params=LRParams(label_dp=False), roles=Roles("guest", "guest", ["h1"]), plan=None,
                  crypto=None)
    assert off.accountant is None and off._over_budget(5) is False
