"""ECDH PSI between two parties (threads, real channels): the result is the plain intersection."""

from __future__ import annotations

import random

import pytest

from fedps.algorithms.psi import ecdh


def test_encode_to_curve_matches_rfc9380_vectors():
    dst = b"QUUX-V01-CS02-with-curve25519_XMD:SHA-512_ELL2_NU_"
    vectors = {  # RFC 9380 appendix J.4.2: x of P = 8 * map_to_curve(u)
        b"": "1bb913f0c9daefa0b3375378ffa534bda5526c97391952a7789eb976edfe4d08",
        b"abc": "7c22950b7d900fa866334262fcaea47a441a578df43b894b4625c9b450f9a026",
        b"abcdef0123456789": "31ad08a8b0deeb2a4d8b0206ca25f567ab4e042746f792f4b7973f3ae2096c52",
    }
    p, a = 2**255 - 19, 486662

    def double(x):  # x-only doubling on Curve25519
        return (x * x - 1) ** 2 * pow(4 * x * (x * x + a * x + 1), -1, p) % p

    for message, expected in vectors.items():
        u = int.from_bytes(ecdh.encode_to_curve(message, dst), "little")
        assert f"{double(double(double(u))):064x}" == expected


def test_blinding_commutes():
    point = ecdh.encode_to_curve(b"alice")
    a, b = ecdh.new_secret(), ecdh.new_secret()
    assert ecdh.blind(a, ecdh.blind(b, point)) == ecdh.blind(b, ecdh.blind(a, point))
    assert ecdh.blind(a, point) != ecdh.blind(b, point)


def _sets(n_guest, n_host, overlap, seed, integer=False):
    rng = random.Random(seed)
    pool = rng.sample(range(10**9), n_guest + n_host - overlap)
    shared = pool[:overlap]
    guest = shared + pool[overlap:n_guest]
    host = shared + pool[n_guest:]
    rng.shuffle(guest)
    rng.shuffle(host)
    make = (lambda v: v) if integer else (lambda v: f"user-{v}")
    return [make(v) for v in guest], [make(v) for v in host], {str(make(v)) for v in shared}


@pytest.mark.parametrize("n_guest,n_host,overlap", [(300, 200, 120), (150, 150, 0), (200, 200, 200)])
def test_ecdh_result_is_the_plain_intersection(psi_pair, n_guest, n_host, overlap):
    guest, host, shared = _sets(n_guest, n_host, overlap, seed=n_guest + overlap)
    out = psi_pair(guest, host, protocol="ecdh")
    for name in ("guest", "host"):
        assert out[name].error is None, out[name].error
        assert out[name].manifest["count"] == overlap
        assert set(out[name].rows["id"].astype(str)) == shared
    assert out["guest"].manifest["digest"] == out["host"].manifest["digest"]
