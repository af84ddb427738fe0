"""RSA blind-signature PSI: the key operations, and two parties (threads, real channels)."""

from __future__ import annotations

import gmpy2
import pytest
from conftest import assert_no_leak, random_sets

from fedps.algorithms.psi import rsa


def test_crt_signature_verifies_and_unblinds():
    key = rsa.PrivateKey.generate(1024)
    n, e = key.public.n, key.public.e
    h = key.public.fdh("alice")
    assert 0 < h < n and h != key.public.fdh("bob")
    r = gmpy2.mpz(123456789)
    blinded = gmpy2.powmod(r, e, n) * h % n
    s = key.sign(blinded) * gmpy2.invert(r, n) % n
    assert s == key.sign(h) and gmpy2.powmod(s, e, n) == h


def test_rsa_finds_the_intersection_and_leaks_no_other_id(psi_pair):
    guest, host, shared = random_sets(200, 150, 60, seed=3)
    out = psi_pair(guest, host, protocol="rsa", rsa_key_holder="host")
    for name in ("guest", "host"):
        assert out[name].error is None, out[name].error
        assert out[name].manifest["count"] == 60
        assert set(out[name].rows["id"].str.strip()) == shared
    assert out["guest"].manifest["digest"] == out["host"].manifest["digest"]
    assert assert_no_leak(out, {"guest": guest, "host": host}, shared) == 140 + 90


@pytest.mark.parametrize("overlap", [0, 120])
def test_rsa_integer_ids_key_at_the_guest(psi_pair, overlap):
    guest, host, shared = random_sets(120, 120, overlap, seed=overlap + 1, integer=True)
    out = psi_pair(guest, host, protocol="rsa", rsa_key_holder="guest")
    for name in ("guest", "host"):
        assert out[name].error is None, out[name].error
        assert out[name].manifest["count"] == overlap
        assert set(out[name].rows["id"].astype(str)) == shared
