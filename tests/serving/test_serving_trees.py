"""Serving SecureBoost: one host call per batch gives every node's direction; scores equal the batch
federated prediction (secureboost/predict.py) of the same model on the same rows."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys

import grpc
import numpy as np
import pytest

from fedps.errors import ConfigError, DataError
from fedps.serving import config as serving_config
from fedps.serving import store
from fedps.serving.client import GuestClient
from fedps.serving.server import start
from serving_helpers import counter, party_toml, serve
from tree_models import batch_predict, host_parquet, train, write

UNKNOWN = 3   # the host's store lacks the last rows' ids


def build_store(folder, case, name: str, drop_last: int = 0, cli: bool = False):
    source = host_parquet(case, folder / f"{name}.parquet", drop_last)
    if not cli:   # the function the command runs, without a process's start-up
        store.build_store(source, folder / f"{name}.sqlite", id_column="id", id_hash="sha256", missing_ok=True,
                          key_of=lambda i: hashlib.sha256(i.encode()).digest())
        return
    conf = party_toml(folder, case.job, "host", "host", {}, {"store": f"{name}.sqlite"})
    built = subprocess.run([sys.executable, "-m", "fedps.engine.cli", "serve", "--conf", str(conf),
                            "--build-store", str(source), "--missing-ok"], capture_output=True, text=True, timeout=60)
    assert built.returncode == 0, built.stderr
    assert json.loads(built.stdout)["missing_ok"] is True


@pytest.fixture(scope="module")
def binary(identities):
    folder, keys = identities
    case = train(folder, "trees-a", "breast", missing_every=7)
    build_store(folder, case, "trees-host", drop_last=UNKNOWN, cli=True)
    host_conf = party_toml(folder, case.job, "host", "host", {"guest": keys["guest"]},
                           {"store": "trees-host.sqlite", "port_file": "trees-host.ports.json"})
    host = serve(host_conf, case.host, folder / "trees-host.ports.json")
    guest_conf = party_toml(folder, case.job, "guest", "guest", {"host": keys["host"]},
                            {"hosts": {"host": f"127.0.0.1:{host.port}"}, "host_timeout_s": 2.0,
                             "port_file": "trees-guest.ports.json"})
    try:
        guest = serve(guest_conf, case.guest, folder / "trees-guest.ports.json")
    except BaseException:
        host.stop()
        raise
    client = GuestClient(f"127.0.0.1:{guest.port}")
    yield folder, case, host, guest, client
    client.close()
    assert guest.stop() == 0 and host.stop() == 0


def test_binary_scores_equal_the_batch_federated_prediction_in_one_call(binary):
    folder, case, host, guest, client = binary
    known = len(case.ids) - UNKNOWN
    want = batch_predict(case, case.xg[:known], case.xh[:known], folder / "trees-predict")
    assert np.isnan(case.xh).any()   # some rows take the splits' learned missing-value direction
    calls = counter(host.metrics(), "requests_total", method="Part")
    reply = client.score(case.ids[:known], case.xg[:known])
    assert reply.model_version == case.job and reply.missing_hosts == ()
    np.testing.assert_allclose(reply.scores, want["score"], rtol=0, atol=1e-9)
    np.testing.assert_allclose(reply.probabilities, want["probability"], rtol=0, atol=1e-9)
    assert counter(host.metrics(), "requests_total", method="Part") == calls + 1   # the whole forest: one call
    one = client.score(case.ids[10:11], case.xg[10:11])
    assert abs(one.scores[0] - want["score"][10]) < 1e-12
    # a guest value sent as NaN is missing, as in training; an infinite one is refused
    nan = case.xg[:2].copy()
    nan[:, 0] = np.nan
    assert np.isfinite(client.score(case.ids[:2], nan).scores).all()
    with pytest.raises(grpc.RpcError, match="infinite"):
        client.score(case.ids[:1], np.full((1, len(case.guest_features)), np.inf))


def test_an_unknown_id_goes_where_missing_values_go_and_is_counted(binary):
    folder, case, host, _, client = binary
    last = slice(len(case.ids) - UNKNOWN, None)
    before = counter(host.metrics(), "unknown_ids_total")
    reply = client.score(case.ids[last], case.xg[last])
    unknown = np.full((UNKNOWN, len(case.host_features)), np.nan)   # the documented default: every value missing
    want = batch_predict(case, case.xg[last], unknown, folder / "trees-predict-unknown")
    np.testing.assert_allclose(reply.scores, want["score"], rtol=0, atol=1e-9)
    assert counter(host.metrics(), "unknown_ids_total") == before + UNKNOWN


@pytest.fixture(scope="module")
def in_process(identities):
    folder, keys = identities
    running = []

    def pair(case, store: str, **guest_serving):
        host_conf = party_toml(folder, case.job, "host", "host", {"guest": keys["guest"]},
                               {"store": f"{store}.sqlite", "guest": "guest"})
        host = start(*serving_config.load(host_conf), case.host)
        running.append(host)
        guest_conf = party_toml(folder, case.job, "guest", "guest", {"host": keys["host"]},
                                {"hosts": {"host": f"127.0.0.1:{host.port}"}, "host_timeout_s": 2.0, **guest_serving})
        guest = start(*serving_config.load(guest_conf), case.guest)
        running.append(guest)
        return host, guest, GuestClient(f"127.0.0.1:{guest.port}")

    yield folder, pair
    for server in reversed(running):
        server.stop()


@pytest.mark.parametrize("data, settings", [
    ("vehicle_scale", {"objective": "multi:softmax", "num_class": 4, "trees": 2}),
    ("student", {"objective": "reg:squarederror"})], ids=["multi-class", "regression"])
def test_multi_class_and_regression_equal_the_batch_federated_prediction(in_process, data, settings):
    folder, pair = in_process
    case = train(folder, f"trees-{data}", data, **settings)
    build_store(folder, case, f"trees-{data}")
    _, _, client = pair(case, f"trees-{data}")
    want = batch_predict(case, case.xg, case.xh, folder / f"trees-predict-{data}")
    reply = client.score(case.ids, case.xg)
    if data == "student":
        np.testing.assert_allclose(reply.scores, want["value"], rtol=0, atol=1e-9)
        assert len(reply.probabilities) == 0
        return
    probabilities = reply.per_row(reply.probabilities)
    assert reply.classes == 4 and reply.objective == "multi:softmax"
    for k in range(4):
        np.testing.assert_allclose(probabilities[:, k], want[f"probability_{k}"], rtol=0, atol=1e-9)
    assert (probabilities.argmax(axis=1) == want["class"]).all()
    assert reply.scores.shape == (4 * len(case.ids),)


def test_parts_of_different_models_are_refused_by_name(in_process):
    folder, pair = in_process
    case = train(folder, "trees-odd", "breast", trees=2)
    build_store(folder, case, "trees-odd")
    used = sorted({n["split"] for t in case.models["guest"]["trees"] for n in t["nodes"].values()
                   if n.get("party") == "host"})
    odd = json.loads(json.dumps(case.models["host"]))
    del odd["splits"][used[0]]                           # the host serves a split table that lacks one of them
    write(case.host, case.job, odd)
    _, _, client = pair(case, "trees-odd")
    with pytest.raises(grpc.RpcError) as error:
        client.score(case.ids[:2], case.xg[:2])
    assert error.value.code() == grpc.StatusCode.INTERNAL
    assert f"host host sent no direction for node {used[0]}" in error.value.details()


def test_tree_models_refuse_what_they_cannot_serve(identities, in_process):
    folder, keys = identities
    case = train(folder, "trees-refused", "breast", trees=2)
    build_store(folder, case, "trees-refused")
    _, pair = in_process
    with pytest.raises(ConfigError, match='on_host_failure must be "fail"'):
        pair(case, "trees-refused", on_host_failure="partial")
    conf = party_toml(folder, case.job, "host", "host", {"guest": keys["guest"], "host2": keys["intruder"]},
                      {"store": "trees-refused.sqlite", "guest": "guest", "mask_with": ["host", "host2"]})
    with pytest.raises(ConfigError, match="mask_with does not apply"):
        start(*serving_config.load(conf), case.host)
    broken = json.loads(json.dumps(case.models["host"]))
    sid = next(iter(broken["splits"]))
    broken["splits"][sid] = {**broken["splits"][sid], "categorical": True}   # and no category
    write(folder / "broken" / "host", case.job, broken)
    conf = party_toml(folder, case.job, "host", "host", {"guest": keys["guest"]},
                      {"store": "trees-refused.sqlite", "guest": "guest"})
    with pytest.raises(DataError, match=f"split {sid} is unreadable: KeyError"):
        start(*serving_config.load(conf), folder / "broken" / "host")


def test_categorical_splits_equal_the_batch_federated_prediction(in_process):
    folder, pair = in_process
    case = train(folder, "trees-categorical", "student", objective="reg:squarederror", max_bin=8,
                 categorical={"guest": ("x1", "x3"), "host": ("x0", "x1", "x2")})
    splits = [s for m in case.models.values() for s in m["splits"].values()]
    assert any(s.get("categorical") for s in case.models["host"]["splits"].values())
    assert any(s.get("categorical") for s in splits) and not all(s.get("categorical") for s in splits)
    build_store(folder, case, "trees-categorical")
    _, _, client = pair(case, "trees-categorical")
    xg = case.xg.copy()
    xg[::5, 1] = 99.0   # a category never seen in training goes right, as in the batch prediction
    want = batch_predict(case, xg, case.xh, folder / "trees-predict-categorical")
    np.testing.assert_allclose(client.score(case.ids, xg).scores, want["value"], rtol=0, atol=1e-9)
