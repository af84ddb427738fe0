"""Serving's parts in one process: fallback policy, versions, identities, stores, reload, settings."""

from __future__ import annotations

import hashlib
import hmac
import json
import shutil
import time
import urllib.error
import urllib.request

import grpc
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from fedps.errors import ConfigError, DataError
from fedps.serving import config as serving_config
from fedps.serving.client import GuestClient
from fedps.serving.server import start
from fedps.serving.store import SqliteStore, build_store
from serving_helpers import counter, host_parquet, party_toml, weights_for, write_model

JOB = "parts-a"


class SlowStore:
    """An injected fault: a store that answers after ``delay`` seconds."""

    def __init__(self, inner, delay: float) -> None:
        self.inner, self.delay, self.feature_names = inner, delay, inner.feature_names

    def lookup(self, keys):
        time.sleep(self.delay)
        return self.inner.lookup(keys)

    def close(self) -> None:
        self.inner.close()


@pytest.fixture(scope="module")
def stack(identities, parts):
    folder, keys = identities
    wg, b, wh = weights_for(parts, 7)
    write_model(folder / JOB / "guest", JOB, "guest", parts.guest_features, wg, b)
    write_model(folder / JOB / "host", JOB, "host", parts.host_features, wh, None)
    build_store(host_parquet(parts, folder / "parts-host.parquet"), folder / "parts-host.sqlite", id_column="id",
                key_of=lambda i: hashlib.sha256(i.encode()).digest(), id_hash="sha256")
    host_conf = party_toml(folder, JOB, "host", "host", {"guest": keys["guest"], "intruder": keys["intruder"]},
                           {"store": "parts-host.sqlite", "guest": "guest"})
    host = start(*serving_config.load(host_conf), folder / JOB / "host")
    running = [host]

    def guest(job: str = JOB, model: str = JOB, **serving):
        conf = party_toml(folder, job, "guest", "guest", {"host": keys["host"]},
                          {"hosts": {"host": f"127.0.0.1:{host.port}"}, **serving})
        started = start(*serving_config.load(conf), folder / model / "guest")
        running.append(started)
        return started, GuestClient(f"127.0.0.1:{started.port}")

    yield folder, keys, host, guest, (wg, b, wh)
    for server in running:
        server.stop()


def test_partial_policy_scores_without_a_slow_host_and_counts_it(stack, parts):
    folder, _, host, guest, (wg, b, _) = stack
    server, client = guest(host_timeout_s=0.1, on_host_failure="partial")
    store = host.service.store
    host.service.store = SlowStore(store, 0.5)
    try:
        reply = client.score(parts.ids[:3], parts.xg[:3])
    finally:
        host.service.store = store
    assert reply.missing_hosts == ("host",)
    np.testing.assert_allclose(reply.scores, parts.xg[:3] @ wg + b, atol=1e-12)
    assert server.metrics.value("host_failures_total", reason="DEADLINE_EXCEEDED", action="partial") == 1
    assert client.score(parts.ids[:3], parts.xg[:3]).missing_hosts == ()


def test_the_callers_deadline_bounds_the_wait_for_a_host(stack, parts):
    _, _, host, guest, _ = stack
    server, client = guest(host_timeout_s=5.0)
    store = host.service.store
    host.service.store = SlowStore(store, 1.0)
    try:
        with pytest.raises(grpc.RpcError) as error:
            client.score(parts.ids[:1], parts.xg[:1], timeout=0.3)
        # the guest gave up on the host when its caller's deadline ran out, not after 5 s (nor when
        # the host answers after 1 s, which would count no failure at all)
        deadline = time.monotonic() + 5
        while not server.metrics.value("host_failures_total", reason="DEADLINE_EXCEEDED"):
            assert time.monotonic() < deadline, "the guest never gave up on the host"
            time.sleep(0.02)
    finally:
        host.service.store = store
    assert error.value.code() in (grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.UNAVAILABLE)


def test_a_guest_serving_another_job_is_refused_by_the_host(stack, parts):
    folder, _, _, guest, _ = stack
    other = "parts-b"
    wg, b, _ = weights_for(parts, 8)
    write_model(folder / other / "guest", other, "guest", parts.guest_features, wg, b)
    _, client = guest(job=other, model=other)
    with pytest.raises(grpc.RpcError) as error:
        client.score(parts.ids[:1], parts.xg[:1])
    assert error.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert f"host refused the request: host serves model {JOB}, not '{other}'" in error.value.details()
    with pytest.raises(grpc.RpcError) as error:   # and a caller expecting another version is told
        client.score(parts.ids[:1], parts.xg[:1], model_version=JOB)
    assert error.value.code() == grpc.StatusCode.FAILED_PRECONDITION


def test_a_pinned_party_that_is_not_the_guest_cannot_call_a_host(stack):
    folder, keys, host, _, _ = stack
    from fedps.messaging.identity import load_identity, parse_public
    from fedps.serving.rpc import PART, pb
    from fedps.serving.tls import PinnedTLS

    tls = PinnedTLS("intruder", load_identity(folder / "keys" / "intruder.key"),
                    {"host": parse_public(keys["host"], "host")})
    channel = tls.channel("host", f"127.0.0.1:{host.port}")
    with pytest.raises(grpc.RpcError) as error:
        channel.unary_unary(PART)(pb.PartRequest(model_version=JOB, keys=b"k" * 32).SerializeToString(), timeout=5)
    assert error.value.code() == grpc.StatusCode.UNAVAILABLE   # the host trusts the guest's identity alone
    channel.close()


def test_the_guest_reads_its_own_features_from_its_store(stack, parts, identities):
    folder, _, _, guest, _ = stack
    table = pa.table({"id": parts.ids, **{f: parts.xg[:, i] for i, f in enumerate(parts.guest_features)}})
    pq.write_table(table, folder / "parts-guest.parquet")
    build_store(folder / "parts-guest.parquet", folder / "parts-guest.sqlite", id_column="id",
                key_of=lambda i: hashlib.sha256(i.encode()).digest(), id_hash="sha256")
    server, client = guest(store="parts-guest.sqlite")
    by_ids = client.score(parts.ids[:5])
    with_features = client.score(parts.ids[:5], parts.xg[:5])
    np.testing.assert_allclose(by_ids.scores, with_features.scores, atol=1e-12)
    client.score(["no-such-id"])
    assert server.metrics.value("unknown_ids_total") == 1


def test_a_refused_reload_keeps_the_old_model(stack, parts):
    folder, _, _, guest, _ = stack
    model = folder / "parts-reload" / "guest"
    shutil.copytree(folder / JOB / "guest", model)
    server, client = guest(model="parts-reload")
    (model / "model.json").write_text(json.dumps({"party": "guest", "features": ["x0"], "weights": [1, 2]}))
    request = urllib.request.Request(f"http://127.0.0.1:{server.ops.port}/reload", method="POST")
    with pytest.raises(urllib.error.HTTPError) as error:
        urllib.request.urlopen(request, timeout=5)
    assert error.value.code == 409 and "as many weights as features" in error.value.read().decode()
    assert client.score(parts.ids[:1], parts.xg[:1]).model_version == JOB
    assert server.metrics.value("reload_failures_total") == 1
    ready = json.loads(urllib.request.urlopen(f"http://127.0.0.1:{server.ops.port}/readyz", timeout=5).read())
    assert ready["ready"] and ready["model_version"] == JOB
    assert counter(server.metrics.render(), "requests_total", method="Score", code="OK") >= 1


def test_a_store_from_psi_output_is_keyed_by_psi_hash(tmp_path):
    from fedps.algorithms.psi.buckets import keyed_hash
    from fedps.serving.keys import hasher

    order_key = bytes(range(32))
    ids = ["7", "alice", "42"]
    table = pa.table({"id": ids, "psi_hash": [keyed_hash(order_key, i) for i in ids],
                      "psi_index": [0, 1, 2], "a": [1.0, 2.0, 3.0], "b": [0, 1, 0]})
    pq.write_table(table, tmp_path / "rows.parquet")
    summary = build_store(tmp_path / "rows.parquet", tmp_path / "s.sqlite", id_column="id",
                          key_of=lambda i: b"", id_hash="sha256")
    assert summary["features"] == ["a", "b"] and summary["keys"] == "psi_hash"
    store = SqliteStore(tmp_path / "s.sqlite")
    hash_id = hasher("hmac", order_key)   # the PSI's order key as the id key gives every id its psi_hash
    x, found = store.lookup([hash_id(" 007"), hash_id("bob"), hash_id("42")])
    assert found.tolist() == [True, False, True]
    np.testing.assert_array_equal(x, [[1.0, 0.0], [0.0, 0.0], [3.0, 0.0]])
    assert hash_id("7") == hmac.new(order_key, b"7", hashlib.sha256).digest()


@pytest.mark.parametrize("column, says", [("dup", "occurs twice"), ("null", "'a' is null or not finite")])
def test_a_bad_store_source_is_refused_by_name(tmp_path, column, says):
    ids = ["1", "1"] if column == "dup" else ["1", "2"]
    values = [1.0, None] if column == "null" else [1.0, 2.0]
    pq.write_table(pa.table({"id": ids, "a": values}), tmp_path / "f.parquet")
    with pytest.raises(DataError, match=says):
        build_store(tmp_path / "f.parquet", tmp_path / "s.sqlite", id_column="id",
                    key_of=lambda i: hashlib.sha256(i.encode()).digest(), id_hash="sha256")
    assert not (tmp_path / "s.sqlite").exists() and not (tmp_path / "s.sqlite.partial").exists()


@pytest.mark.parametrize("setting, says", [
    ({"on_host_failure": "retry"}, "serving.on_host_failure"),
    ({"id_hash": "hmac"}, "serving.id_key_file"),
    ({"hosts": {"host": "nowhere"}}, "serving.hosts.host"),
    ({"colour": "blue"}, "unknown key serving.colour"),
])
def test_bad_serving_settings_name_the_key(tmp_path, setting, says):
    conf = party_toml(tmp_path, "j", "guest", "guest", {}, setting)
    with pytest.raises(ConfigError, match=says):
        serving_config.load(conf)


def test_graceful_shutdown_finishes_the_requests_in_flight(identities, parts, tmp_path):
    import threading

    folder, keys = identities
    wg, b, wh = weights_for(parts, 9)
    write_model(tmp_path / "host", "parts-stop", "host", parts.host_features, wh, None)
    write_model(tmp_path / "guest", "parts-stop", "guest", parts.guest_features, wg, b)
    shutil.copy(folder / "parts-host.sqlite", tmp_path / "host.sqlite")
    host_conf = party_toml(folder, "parts-stop", "host", "host", {"guest": keys["guest"]},
                           {"store": str(tmp_path / "host.sqlite")})
    host = start(*serving_config.load(host_conf), tmp_path / "host")
    guest_conf = party_toml(folder, "parts-stop", "guest", "guest", {"host": keys["host"]},
                            {"hosts": {"host": f"127.0.0.1:{host.port}"}, "host_timeout_s": 5.0})
    guest = start(*serving_config.load(guest_conf), tmp_path / "guest")
    client = GuestClient(f"127.0.0.1:{guest.port}")
    arrived = threading.Event()

    class Arrived(SlowStore):
        def lookup(self, keys):
            arrived.set()
            return super().lookup(keys)

    host.service.store = Arrived(host.service.store, 0.5)
    try:
        pending = client._score.future(score_request_for(parts, 2), timeout=10)
        assert arrived.wait(5)
        stopper = threading.Thread(target=host.stop)
        stopper.start()
        reply = pending.result()                  # the host finished it while draining
        stopper.join(10)
        assert len(reply) > 0 and not stopper.is_alive()
        with pytest.raises(grpc.RpcError) as error:   # and takes nothing new
            client.score(parts.ids[:1], parts.xg[:1])
        assert error.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        client.close()
        guest.stop()
        host.stop()


def score_request_for(parts, rows: int) -> bytes:
    from fedps.serving.client import score_request

    return score_request(parts.ids[:rows], parts.xg[:rows])


def test_the_public_api_can_take_tls(stack, parts, tmp_path):
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "scoring.example")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(1).not_valid_before(now - datetime.timedelta(hours=1))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName("scoring.example")]), critical=False)
            .sign(key, hashes.SHA256()))
    pem = cert.public_bytes(serialization.Encoding.PEM)
    (tmp_path / "api.pem").write_bytes(pem)
    (tmp_path / "api.key").write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                                         serialization.PrivateFormat.PKCS8,
                                                         serialization.NoEncryption()))
    _, _, _, guest, _ = stack
    server, _ = guest(public_cert=str(tmp_path / "api.pem"), public_key=str(tmp_path / "api.key"))
    channel = grpc.secure_channel(f"127.0.0.1:{server.port}", grpc.ssl_channel_credentials(pem),
                                  options=[("grpc.ssl_target_name_override", "scoring.example")])
    assert GuestClient("", channel=channel).score(parts.ids[:1], parts.xg[:1]).model_version == JOB
    channel.close()
