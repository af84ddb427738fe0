"""Vertical LR maths over the in-process transport: partitions as threads, against numpy.

No broker, Spark or Ray: each party's tasks of each partition run
``*_partition`` in threads, their partials are added under encryption as the
accumulator does, and the drivers run ``*_step``. The real-broker,
separate-process tests are in test_hetero_lr_processes.py.
"""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from fedps.algorithms.hetero_lr import protocol
from fedps.algorithms.hetero_lr.protocol import INTERCEPT, Crypto, Port, Roles
from fedps.engine.crypto import generate_keypair
from fedps.engine.vertical.accumulator import _sum_keyed
from fedps.errors import ProtocolError
from fedps.messaging.tags import Scope
from fedps.messaging.transport import in_process_mesh

DATA = Path(__file__).parents[2] / "data"
KEY_BITS = 512


@pytest.fixture(scope="module")
def keys():
    return {name: generate_keypair(KEY_BITS) for name in ("guest", "h1", "h2")}


def _crypto(keys, me):
    public = {name: pair[0] for name, pair in keys.items()}
    return Crypto(keys[me][1], public, me, frac_bits=24)


def _threads(targets: dict):
    results, errors = {}, {}

    def run(name, fn):
        try:
            results[name] = fn()
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors[name] = exc

    threads = [threading.Thread(target=run, args=item) for item in targets.items()]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, errors
    return results


def one_batch(keys, hosts, xs, y, ws, bias, partitions, with_loss):
    """Run one batch through the protocol; returns each party's gradient and the guest's loss."""
    names = ["guest", *hosts]
    roles = {n: Roles(n, "guest", hosts) for n in names}
    crypto = {n: _crypto(keys, n) for n in names}
    rows = np.array_split(np.random.default_rng(5).permutation(len(y)), partitions)
    tasks = in_process_mesh("job1", names)
    scope = Scope("job1", "train").at(iteration=0, batch=0)

    def partials_of(name):
        out = []
        for p, idx in enumerate(rows):
            port = Port(tasks[name], scope, p)
            x = xs[name][idx]
            u = x @ ws[name] + (bias if name == "guest" else 0.0)
            keys_ = np.arange(x.shape[1], dtype=np.int64)
            if name == "guest":
                x1, keys1 = np.hstack([x, np.ones((len(idx), 1))]), np.r_[keys_, INTERCEPT]
                out.append(protocol.guest_partition(port, crypto[name], roles[name], x1, keys1, y[idx], u,
                                                    None, with_loss))
            else:
                out.append(protocol.host_partition(port, crypto[name], roles[name], x, keys_, u, with_loss))
        return out

    partials = _threads({n: (lambda n=n: partials_of(n)) for n in names})
    drivers = in_process_mesh("job1", names)

    def driver(name):
        owner = hosts[0] if name == "guest" else "guest"
        n = int(keys[owner][0].n)
        ks, blob = _sum_keyed([(p.keys, p.gradient.to_bytes()) for p in partials[name]], n)
        gradient = protocol.vector(blob, keys[owner][0])
        port = Port(drivers[name], scope)
        if name == "guest":
            loss = None
            if with_loss:
                _, lblob = _sum_keyed([(np.zeros(1, np.int64), p.loss.to_bytes()) for p in partials[name]], n)
                loss = protocol.vector(lblob, keys[owner][0])
            result, encrypted = protocol.guest_step(port, crypto[name], roles[name], gradient, loss, b"s" * 32)
            plain = sum(p.plain_loss for p in partials[name])
            return ks, result, None if encrypted is None else (plain + encrypted) / len(y)
        return ks, protocol.host_step(port, crypto[name], roles[name], gradient, with_loss, b"t" * 32), None

    return _threads({n: (lambda n=n: driver(n)) for n in names})


def _breast():
    guest = pd.read_csv(DATA / "breast_hetero_guest.csv").iloc[:120]
    host = pd.read_csv(DATA / "breast_hetero_host.csv").set_index("id").loc[guest["id"]]
    y = guest["y"].to_numpy(dtype=float)
    xg = guest.drop(columns=["id", "y"]).to_numpy(dtype=float)
    return xg, host.to_numpy(dtype=float), y


@pytest.mark.parametrize("hosts,partitions", [(["h1"], 3), (["h1", "h2"], 2)])
def test_batch_gradients_and_loss_match_numpy(keys, hosts, partitions):
    xg, xh, y = _breast()
    rng = np.random.default_rng(1)
    split = np.array_split(np.arange(xh.shape[1]), len(hosts))
    xs = {"guest": xg, **{h: xh[:, cols] for h, cols in zip(hosts, split)}}
    ws = {n: rng.normal(0, 0.1, x.shape[1]) for n, x in xs.items()}
    bias = 0.3
    out = one_batch(keys, hosts, xs, y, ws, bias, partitions, with_loss=True)

    u = sum(xs[n] @ ws[n] for n in xs) + bias
    d = 0.25 * u + 0.5 - y
    for name, x in xs.items():
        ks, gradient, _ = out[name]
        expected = x.T @ d
        if name == "guest":
            assert ks[0] == INTERCEPT       # the intercept sorts first in keyed sums
            np.testing.assert_allclose(gradient[0], d.sum(), rtol=1e-6, atol=1e-6)
            gradient = gradient[1:]
        np.testing.assert_allclose(gradient, expected, rtol=1e-5, atol=1e-4)   # X at 16 fractional bits
    loss = np.mean(np.log(2) + (0.5 - y) * u + 0.125 * u ** 2)
    assert out["guest"][2] == pytest.approx(loss, rel=1e-6)


def test_host_refuses_to_decrypt_an_unmasked_gradient(keys):
    mesh = in_process_mesh("job1", ["guest", "h1"])
    scope = Scope("job1", "train").at(iteration=0, batch=0)
    guest = _crypto(keys, "guest")
    unmasked = guest.encryptor("h1").encrypt(np.array([0.5, 0.25]))
    Port(mesh["guest"], scope).send("h1", protocol.GUEST_GRAD, protocol.blob(unmasked))
    h1 = _crypto(keys, "h1")
    own_gradient = h1.encryptor("guest").encrypt(np.array([1.0]))
    with pytest.raises(ProtocolError, match="unmasked"):
        protocol.host_step(Port(mesh["h1"], scope), h1, Roles("h1", "guest", ["h1"]), own_gradient, False,
                           b"x" * 32)
