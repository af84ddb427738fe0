"""The two X25519 implementations ECDH PSI may use (libsodium's, OpenSSL's): the same bytes, the same refusals."""

from __future__ import annotations

import os

import numpy as np
import pytest

from fedps.algorithms.psi import ecdh
from fedps.errors import CryptoError

IMPLEMENTATIONS = [ecdh._blind_sodium, ecdh._blind_openssl]
#: u-coordinates of small order on Curve25519 or its twist (RFC 7748's list of points to refuse).
LOW_ORDER = [bytes(32), (1).to_bytes(32, "little"),
             bytes.fromhex("e0eb7a7c3b41b8ae1656e3faf19fc46ada098deb9c32b1fd866205165f49b800"),
             bytes.fromhex("5f9c95bca3508c24b1d0b1559c83ef5b04445cc4581c8e86d8224eddd09f1157"),
             bytes.fromhex("ecffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff7f")]


def test_both_give_the_same_bytes_for_hashed_ids_and_for_any_32_bytes():
    secret = ecdh.new_secret()
    points = [ecdh.encode_to_curve(str(i).encode()) for i in range(300)]
    # any 32 bytes: points of the twist, non-canonical u (>= p), the top bit set (RFC 7748 masks it)
    points += [os.urandom(32) for _ in range(300)] + [bytes([255]) * 31 + b"\x7f", bytes([255]) * 32]
    sodium, openssl = (fn(secret, points, len(points)) for fn in IMPLEMENTATIONS)
    assert sodium.shape == (len(points), 32) and np.array_equal(sodium, openssl)
    assert len({row.tobytes() for row in sodium[:-1]}) == len(points) - 1
    assert sodium[-1].tobytes() == sodium[-2].tobytes()    # the same u once the top bit is masked


@pytest.mark.parametrize("blind", IMPLEMENTATIONS, ids=["sodium", "openssl"])
def test_each_refuses_low_order_points_and_wrong_counts(blind):
    secret = ecdh.new_secret()
    good = [ecdh.encode_to_curve(b"a"), ecdh.encode_to_curve(b"b")]
    for point in LOW_ORDER:
        with pytest.raises(CryptoError, match="refused curve point 2"):
            blind(secret, [*good, point], 3)
    with pytest.raises(CryptoError, match="not 32 bytes"):
        blind(secret, [good[0], good[1][:31]], 2)
    with pytest.raises(CryptoError, match="got more"):
        blind(secret, good, 1)
    with pytest.raises(CryptoError, match="got 2"):
        blind(secret, good, 3)
    assert blind(secret, [], 0).shape == (0, 32)


def test_the_backend_can_be_forced_and_a_wrong_name_is_refused(monkeypatch):
    monkeypatch.setattr(ecdh, "_chosen", [])
    monkeypatch.setenv(ecdh.BACKEND_ENV, "openssl")
    assert ecdh.backend() == "openssl"
    monkeypatch.setattr(ecdh, "_chosen", [])
    monkeypatch.setenv(ecdh.BACKEND_ENV, "gmp")
    with pytest.raises(CryptoError, match="FEDPS_X25519 must be one of"):
        ecdh.backend()
    monkeypatch.setattr(ecdh, "_chosen", [])
    monkeypatch.delenv(ecdh.BACKEND_ENV)
    assert ecdh.backend() in {"sodium", "openssl"}   # calibrated: the faster here
