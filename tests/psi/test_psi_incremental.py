"""Incremental ECDH PSI: a persistent key per partner, the blinded sets of the last run reused.

Real parts: two PSI parties as threads (psi_pair: the session's Spark, the
embedded broker, real sealed channels), key files and caches on disk.
"""

from __future__ import annotations

import json
import shutil
import time
from types import SimpleNamespace

import pytest
from conftest import assert_no_leak, random_sets

from fedps.algorithms.psi import incremental
from fedps.errors import ConfigError


def _keys(tmp_path):
    return {name: {"key_file": str(tmp_path / "keys" / f"{name}_psi_key.json")} for name in ("guest", "host")}


def _found(outcome) -> set[str]:
    return set(outcome.rows["id"].str.strip())


def _blinded(protocol: str, name: str, own: int, peer: int) -> dict[str, int]:
    """What a party computes: ECDH, its points and the peer's; RSA (key at the host), the host signs
    its own ids and the guest's blinded ones, the guest blinds its own and computes nothing of the host's."""
    if protocol == "rsa" and name == "guest":
        return {"own": own, "peer": 0}
    return {"own": own, "peer": peer}


@pytest.mark.timeout(900)   # three PSI pairs (and the session's Spark start): slow only on a crowded machine
@pytest.mark.parametrize("protocol", ["ecdh", "rsa"])
def test_a_second_run_blinds_only_the_new_ids_and_equals_a_run_from_scratch(psi_pair, tmp_path, protocol):
    guest, host, _ = random_sets(200, 150, 60, seed=11)
    keys = _keys(tmp_path)
    first = psi_pair(guest, host, party_params=keys, protocol=protocol)
    for name, mine, theirs in (("guest", guest, host), ("host", host, guest)):
        assert first[name].error is None, first[name].error
        assert first[name].metrics["psi_key"] == "new epoch"
        assert first[name].metrics["psi_blinded"] == _blinded(protocol, name, len(mine), len(theirs))
    key = json.loads((tmp_path / "keys" / "guest_psi_key.json").read_text())
    assert key["partner"] == "host" and (tmp_path / "keys" / "guest_psi_key.json").stat().st_mode & 0o077 == 0

    # between the runs: the guest drops 20 ids (10 shared) and adds 15 (5 the host also adds); the host adds 8
    extra = [f" new-{i} " for i in range(15)]
    guest2 = guest[20:] + extra
    host2 = host + extra[:5] + [f" host-only-{i} " for i in range(3)]
    second = psi_pair(guest2, host2, party_params=keys, protocol=protocol)
    plain = {i.strip() for i in guest2} & {i.strip() for i in host2}
    new = {"guest": 15, "host": 8}
    for name, peer in (("guest", "host"), ("host", "guest")):
        o = second[name]
        assert o.error is None, o.error
        assert o.metrics["psi_key"] == "reused"
        assert o.metrics["psi_blinded"] == _blinded(protocol, name, new[name], new[peer])   # only what is new
        assert _found(o) == plain and o.manifest["count"] == len(plain)
    assert second["guest"].manifest["digest"] == second["host"].manifest["digest"]
    if protocol == "rsa":   # the signer (the host) sent only its added and removed tags
        g, h = (second[name].metrics["psi_messages"] for name in ("guest", "host"))
        assert g["changes_only"] == h["changes_only"] == 4
        assert (h["rsa_tags_add_sent"], h["rsa_tags_drop_sent"]) == (8, 0) and "rsa_tags_sent" not in h
        assert g["peer_ids"] == len(host2)
    if protocol == "ecdh":   # only the changes went over the links, bucket by bucket
        g, h = (second[name].metrics["psi_messages"] for name in ("guest", "host"))
        assert g["changes_only"] == h["changes_only"] == 4
        assert (g["ecdh_single_add_sent"], g["ecdh_drop_sent"]) == (15, 20)
        assert (h["ecdh_single_add_sent"], h["ecdh_drop_sent"]) == (8, 0)
        assert "ecdh_single_sent" not in g and "ecdh_single_sent" not in h
        # the changes carry no recognisable form of an id outside the intersection (as from scratch)
        assert assert_no_leak(second, {"guest": guest2, "host": host2}, plain) > 0
        # the host lost what it kept of bucket 0: that bucket sends the whole sets again, the others
        # only what changed (nothing); the same intersection and the same psi_hash (the same epoch)
        shutil.rmtree(next((tmp_path / "keys").glob("host_psi_key.json.cache/*/own/bucket=0")))
        again = psi_pair(guest2, host2, party_params=keys, protocol=protocol)
        for name in ("guest", "host"):
            o = again[name]
            assert o.error is None, o.error
            assert _found(o) == plain and o.metrics["psi_messages"]["changes_only"] == 3
            assert o.metrics["psi_messages"]["ecdh_single_add_sent"] == 0
        assert again["guest"].manifest["digest"] == second["guest"].manifest["digest"]

    # the guest's key has expired: both start a new epoch, everything blinded again, the same intersection
    path = tmp_path / "keys" / "guest_psi_key.json"
    aged = json.loads(path.read_text())
    aged["created"] = time.time() - 31 * 86400
    path.write_text(json.dumps(aged))
    third = psi_pair(guest2, host2, party_params=keys, protocol=protocol)
    for name, mine, theirs in (("guest", guest2, host2), ("host", host2, guest2)):
        o = third[name]
        assert o.error is None, o.error
        assert o.metrics["psi_key"] == "new epoch"
        assert o.metrics["psi_blinded"] == _blinded(protocol, name, len(mine), len(theirs))
        assert _found(o) == plain == _found(second[name])
    assert json.loads(path.read_text())["epoch"] != key["epoch"]


def test_a_key_file_names_its_partner(tmp_path):
    path = tmp_path / "k.json"
    path.write_text(json.dumps({"version": 1, "partner": "bank", "epoch": "e", "secret": "00",
                                "bucket_key": "00", "created": time.time()}))
    params = SimpleNamespace(key_file=str(path), key_max_age_days=30, protocol="ecdh", buckets=4)
    with pytest.raises(ConfigError, match="partner 'bank', not 'shop'"):
        incremental.load_key(params, "shop")
    from fedps.algorithms.psi.params import from_mapping

    assert from_mapping({"input": "x.csv", "key_file": "k.json"}, tmp_path).key_file == str(path)


def test_a_restart_refuses_a_cache_that_changed_since_the_job_first_served_the_bucket(tmp_path):
    """A bucket served again reuses what its first serving kept (digests, changes), which hold only
    against the cache it found then or the one it wrote since; another run's cache is refused by name."""
    from fedps.algorithms.psi.storage import Folder
    from fedps.algorithms.psi.stream import BucketIO, check_stamp
    from fedps.errors import DataError

    cache = Folder.at(tmp_path / "cache")
    io = BucketIO(3, Folder.at(tmp_path / "work"), None, None, 1, 1.0)
    mine = check_stamp(io, cache)                       # first serving: no cache yet
    assert check_stamp(io, cache) == mine               # served again before the rewrite
    cache.child("stamps").write_json("bucket=3.json", {"stamp": mine})
    assert check_stamp(io, cache) == mine               # served again after this job's rewrite
    cache.child("stamps").write_json("bucket=3.json", {"stamp": "another run"})
    with pytest.raises(DataError, match=r"bucket 3 .*changed since this job first served"):
        check_stamp(io, cache)


def test_swapping_the_rsa_key_holder_within_an_epoch_draws_a_new_key(psi_pair, tmp_path):
    """The new signer's key file holds only the public half of the old signer's key: it draws a
    fresh key (both caches void) instead of failing on the missing private half."""
    guest, host, _ = random_sets(80, 60, 25, seed=5)
    keys = _keys(tmp_path)
    first = psi_pair(guest, host, party_params=keys, protocol="rsa", rsa_key_holder="host")
    second = psi_pair(guest, host, party_params=keys, protocol="rsa", rsa_key_holder="guest")
    for outcome in (*first.values(), *second.values()):
        assert outcome.error is None, outcome.error
        assert outcome.manifest["count"] == 25
    assert second["guest"].metrics["psi_key"] == "reused"
    assert second["host"].metrics["psi_blinded"]["own"] == len(host)   # nothing signed under the old key reused
