"""Two hosts that mask their parts: the guest gets the joint score, and only their sum."""

from __future__ import annotations

import hashlib

import grpc
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from fedps.messaging.identity import generate_identity, load_identity, parse_public
from fedps.serving import config as serving_config
from fedps.serving.client import GuestClient
from fedps.serving.masking import FRAC_BITS
from fedps.serving.rpc import PART, pb
from fedps.serving.server import start
from fedps.serving.store import build_store
from fedps.serving.tls import PinnedTLS
from serving_helpers import batch_predict_hosts, party_toml, write_model

JOB = "masked-a"
HOSTS = ("host1", "host2")


@pytest.fixture(scope="module")
def masked(tmp_path_factory, parts):
    folder = tmp_path_factory.mktemp("masked")
    keys = {n: generate_identity(folder / "keys" / f"{n}.key") for n in ("guest", *HOSTS)}
    rng = np.random.default_rng(3)
    split = {"host1": slice(0, 8), "host2": slice(8, None)}
    wg, b = rng.normal(0, 0.05, len(parts.guest_features)), 0.2
    write_model(folder / "guest", JOB, "guest", parts.guest_features, wg, b)
    hosts, running = {}, []
    for name in HOSTS:
        features = parts.host_features[split[name]]
        x, w = parts.xh[:, split[name]], rng.normal(0, 0.05, len(features))
        hosts[name] = (x, w)
        write_model(folder / name, JOB, name, features, w, None)
        pq.write_table(pa.table({"id": parts.ids, **{f: x[:, i] for i, f in enumerate(features)}}),
                       folder / f"{name}.parquet")
        build_store(folder / f"{name}.parquet", folder / f"{name}.sqlite", id_column="id",
                    key_of=lambda i: hashlib.sha256(i.encode()).digest(), id_hash="sha256")
        peers = {p: keys[p] for p in ("guest", *HOSTS) if p != name}
        conf = party_toml(folder, JOB, name, "host", peers, {"store": f"{name}.sqlite", "guest": "guest",
                                                             "mask_with": list(HOSTS)})
        running.append(start(*serving_config.load(conf), folder / name))
    conf = party_toml(folder, JOB, "guest", "guest", {h: keys[h] for h in HOSTS},
                      {"hosts": {h: f"127.0.0.1:{s.port}" for h, s in zip(HOSTS, running)}})
    running.append(start(*serving_config.load(conf), folder / "guest"))
    client = GuestClient(f"127.0.0.1:{running[-1].port}")
    oracle = batch_predict_hosts(JOB, parts.xg, wg, b, hosts, folder / "predict")
    yield folder, keys, running, client, oracle, hosts
    client.close()
    for server in running:
        server.stop()


def _ask(folder, keys, server, request: pb.PartRequest):
    tls = PinnedTLS("guest", load_identity(folder / "keys" / "guest.key"),
                    {h: parse_public(keys[h], h) for h in HOSTS})
    channel = tls.channel(server.me, f"127.0.0.1:{server.port}")
    try:
        return pb.PartReply.FromString(channel.unary_unary(PART)(request.SerializeToString(), timeout=5))
    finally:
        channel.close()


def test_the_masked_sum_gives_the_batch_joint_prediction(masked, parts):
    _, _, _, client, oracle, _ = masked
    reply = client.score(parts.ids, parts.xg)
    np.testing.assert_allclose(reply.scores, oracle, rtol=0, atol=1e-9)


def test_one_hosts_masked_part_does_not_show_its_scores(masked, parts):
    folder, keys, (host1, _, _), _, _, hosts = masked
    x, w = hosts["host1"]
    request = pb.PartRequest(model_version=JOB, request_id="r" * 32, hosts=list(HOSTS),
                             keys=b"".join(hashlib.sha256(i.encode()).digest() for i in parts.ids))
    reply = _ask(folder, keys, host1, request)
    plain = np.round((x @ w) * 2.0 ** FRAC_BITS).astype(np.int64).view(np.uint64)
    values = np.array(reply.masked.values, dtype=np.uint64)
    assert reply.WhichOneof("part") == "masked" and not np.any(values == plain)
    assert abs(float(values.astype(np.float64).mean()) / 2.0 ** 63 - 1) < 0.3   # spread over all of 2^64
    with pytest.raises(grpc.RpcError) as error:   # the same request id again: refused
        _ask(folder, keys, host1, request)
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "reused" in error.value.details()


def test_a_request_for_a_subset_of_the_hosts_is_refused(masked, parts):
    folder, keys, (host1, _, _), _, _, _ = masked
    request = pb.PartRequest(model_version=JOB, request_id="s" * 32, hosts=["host1"],
                             keys=hashlib.sha256(parts.ids[0].encode()).digest())
    with pytest.raises(grpc.RpcError) as error:   # alone, its part would come unmasked
        _ask(folder, keys, host1, request)
    assert error.value.code() == grpc.StatusCode.PERMISSION_DENIED and "mask_with" in error.value.details()
