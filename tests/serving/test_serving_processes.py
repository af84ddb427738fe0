"""`fedps serve`: a guest and a host as separate processes on loopback, through mutual TLS."""

from __future__ import annotations

import dataclasses
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc
import numpy as np
import pytest

from fedps.serving.client import GuestClient, score_request
from serving_helpers import (Proc, batch_predict, counter, host_parquet, party_toml, serve, weights_for,
                                    write_model)

JOB, NEXT = "serve-a", "serve-b"
UNKNOWN = 3   # the host's store lacks the last rows' ids


@dataclasses.dataclass
class Deployment:
    folder: Path
    host: Proc
    guest: Proc
    client: GuestClient
    weights: dict[str, tuple]
    keys: dict[str, str]


def _models(folder: Path, job: str, parts, seed: int) -> tuple:
    wg, b, wh = weights_for(parts, seed)
    write_model(folder / job / "guest", job, "guest", parts.guest_features, wg, b)
    write_model(folder / job / "host", job, "host", parts.host_features, wh, None)
    return wg, b, wh


@pytest.fixture(scope="module")
def deployment(identities, parts):
    folder, keys = identities
    weights = {JOB: _models(folder, JOB, parts, 1), NEXT: _models(folder, NEXT, parts, 2)}
    for party in ("guest", "host"):
        (folder / f"{party}-current").symlink_to(folder / JOB / party)
    source = host_parquet(parts, folder / "host.parquet", drop_last=UNKNOWN)
    host_conf = party_toml(folder, JOB, "host", "host", {"guest": keys["guest"]},
                           {"store": "host.sqlite", "port_file": "host.ports.json"})
    built = subprocess.run([sys.executable, "-m", "fedps.engine.cli", "serve", "--conf", str(host_conf),
                            "--build-store", str(source)], capture_output=True, text=True, timeout=60)
    assert built.returncode == 0, built.stderr
    host = serve(host_conf, folder / "host-current", folder / "host.ports.json")
    guest_conf = party_toml(folder, JOB, "guest", "guest", {"host": keys["host"]},
                            {"hosts": {"host": f"127.0.0.1:{host.port}"}, "host_timeout_s": 1.0,
                             "port_file": "guest.ports.json"})
    try:
        guest = serve(guest_conf, folder / "guest-current", folder / "guest.ports.json")
    except BaseException:
        host.stop()
        raise
    client = GuestClient(f"127.0.0.1:{guest.port}")
    yield Deployment(folder, host, guest, client, weights, keys)
    client.close()
    for proc in (guest, host):
        proc.stop()


def expected(deployment, parts, job: str, rows: slice = slice(None), tag: str = "") -> np.ndarray:
    wg, b, wh = deployment.weights[job]
    sub = dataclasses.replace(parts, ids=parts.ids[rows], xg=parts.xg[rows], xh=parts.xh[rows])
    return batch_predict(job, sub, wg, b, wh, deployment.folder / f"predict-{job}{tag}")


def test_scores_equal_the_batch_joint_prediction(deployment, parts):
    known = slice(0, len(parts.ids) - UNKNOWN)
    reply = deployment.client.score(parts.ids[known], parts.xg[known])
    assert reply.model_version == JOB and reply.missing_hosts == ()
    np.testing.assert_allclose(reply.scores, expected(deployment, parts, JOB, known), rtol=0, atol=1e-9)
    np.testing.assert_allclose(reply.probabilities, 1 / (1 + np.exp(-reply.scores)), atol=1e-12)
    one = deployment.client.score(parts.ids[5:6], parts.xg[5:6])
    assert abs(one.scores[0] - reply.scores[5]) < 1e-12
    # features named in another order are put in the model's order
    order = list(reversed(parts.guest_features))
    shuffled = deployment.client.score(parts.ids[:4], parts.xg[:4, ::-1], feature_names=order)
    np.testing.assert_allclose(shuffled.scores, reply.scores[:4], atol=1e-12)


def test_an_unknown_id_gets_the_default_part_and_is_counted(deployment, parts):
    before = counter(deployment.host.metrics(), "unknown_ids_total")
    last = slice(len(parts.ids) - UNKNOWN, None)
    reply = deployment.client.score(parts.ids[last], parts.xg[last])
    wg, b, _ = deployment.weights[JOB]
    np.testing.assert_allclose(reply.scores, parts.xg[last] @ wg + b, atol=1e-12)   # host part: 0
    assert counter(deployment.host.metrics(), "unknown_ids_total") == before + UNKNOWN


@pytest.mark.parametrize("request_bytes, says", [
    (b"\xff\xff\xff", "malformed ScoreRequest"),
    (score_request(keys=b"x" * 31, features=np.zeros((1, 10))), "32-byte row keys"),
    (score_request(ids=["1", "2"], features=np.zeros((1, 10))), "10 feature values for 2 rows"),
    (score_request(ids=["1"], features=np.zeros((1, 10)), keys=b"k" * 32), "ids or keys, not both"),
    (score_request(ids=["1"], features=np.zeros((1, 2)), feature_names=["x0", "nope"]), "nope"),
    (score_request(features=np.zeros((1, 10))), "1 to 10000 rows"),
    (score_request(ids=["1"], features=np.full((1, 10), np.nan)), "NaN"),
], ids=["garbage", "short-key", "feature-count", "ids-and-keys", "unknown-feature", "no-rows", "nan"])
def test_a_malformed_request_is_refused_by_name(deployment, request_bytes, says):
    with pytest.raises(grpc.RpcError) as error:
        deployment.client.score_bytes(request_bytes)
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert says in error.value.details()


def test_a_caller_with_an_unpinned_identity_is_refused(deployment, parts):
    from fedps.messaging.identity import load_identity, parse_public
    from fedps.serving.rpc import PART, pb
    from fedps.serving.tls import PinnedTLS

    intruder = load_identity(deployment.folder / "keys" / "intruder.key")   # claims to be the guest
    tls = PinnedTLS("guest", intruder, {"host": parse_public(deployment.keys["host"], "host")})
    channel = tls.channel("host", f"127.0.0.1:{deployment.host.port}")
    request = pb.PartRequest(model_version=JOB, keys=b"k" * 32).SerializeToString()
    with pytest.raises(grpc.RpcError) as error:
        channel.unary_unary(PART)(request, timeout=5)
    assert error.value.code() == grpc.StatusCode.UNAVAILABLE     # the TLS handshake failed
    channel.close()
    assert deployment.client.score(parts.ids[:1], parts.xg[:1]).model_version == JOB   # the guest still is


def test_a_host_that_does_not_answer_in_time_fails_the_request_counted(deployment, parts):
    os.kill(deployment.host.proc.pid, signal.SIGSTOP)
    try:
        with pytest.raises(grpc.RpcError) as error:
            deployment.client.score(parts.ids[:2], parts.xg[:2])
    finally:
        os.kill(deployment.host.proc.pid, signal.SIGCONT)
    assert error.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "host host did not answer in time" in error.value.details()
    assert counter(deployment.guest.metrics(), "host_failures_total", host="host", action="fail") == 1
    assert deployment.client.score(parts.ids[:2], parts.xg[:2]).missing_hosts == ()   # back once it answers


def test_a_model_of_another_job_is_refused_at_start(deployment):
    conf = deployment.folder / "guest.toml"
    run = subprocess.run([sys.executable, "-m", "fedps.engine.cli", "serve", "--conf", str(conf),
                          "--model", str(deployment.folder / NEXT / "guest")],
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == 2
    assert f"holds the model of job '{NEXT}'" in run.stderr and "Traceback" not in run.stderr


def test_hot_reload_under_load_loses_no_request(deployment, parts):
    rows = slice(0, 8)
    want = {job: expected(deployment, parts, job, rows, "-reload") for job in (JOB, NEXT)}
    request = score_request(parts.ids[rows], parts.xg[rows])
    seen, errors, stop = [], [], threading.Event()

    def load() -> None:
        client = GuestClient(f"127.0.0.1:{deployment.guest.port}")
        while not stop.is_set():
            try:
                reply = client.score_bytes(request)
                seen.append((reply.model_version, float(np.abs(reply.scores - want[reply.model_version]).max())))
            except grpc.RpcError as exc:
                errors.append(f"{exc.code()}: {exc.details()}")
        client.close()

    threads = [threading.Thread(target=load) for _ in range(3)]
    for thread in threads:
        thread.start()
    try:
        time.sleep(0.3)
        for party, proc in (("host", deployment.host), ("guest", deployment.guest)):
            link = deployment.folder / f"{party}-current"
            link.unlink()
            link.symlink_to(deployment.folder / NEXT / party)
            proc.proc.send_signal(signal.SIGHUP)
            _wait(lambda: proc.ready()["model_version"] == NEXT)
        assert deployment.host.ready()["versions"] == [NEXT, JOB]   # the host still answers the old version
        time.sleep(0.3)
    finally:
        stop.set()
        for thread in threads:
            thread.join(timeout=30)
    assert not errors
    versions = [v for v, _ in seen]
    assert versions[0] == JOB and versions[-1] == NEXT and min(versions.count(JOB), versions.count(NEXT)) >= 3
    assert max(err for _, err in seen) < 1e-9
    # graceful shutdown: both drain and exit 0
    assert deployment.guest.stop() == 0 and deployment.host.stop() == 0


def _wait(condition, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)
