"""Crypto work over two Spark partitions matches the local results."""

from __future__ import annotations

import numpy as np
import pytest

from fedps.engine.crypto import FixedPoint, xt_d
from fedps.engine.crypto.spark import decrypt_on_spark, encrypt_on_spark, xt_d_on_spark

FIX = FixedPoint(frac_bits=20, int_bits=8)

pytestmark = pytest.mark.timeout(240)


def test_encrypt_decrypt_and_xt_d_over_two_partitions_match_local(crypto_spark, keypair, peer_enc, dec):
    pub, priv = keypair
    rng = np.random.default_rng(3)
    values = rng.normal(size=40)
    vec = encrypt_on_spark(crypto_spark, values, pub, private_key=priv, fixed=FIX, partitions=2)
    assert len(vec) == 40
    np.testing.assert_array_equal(dec.decrypt(vec), dec.decrypt(peer_enc.encrypt(values, FIX)))
    np.testing.assert_array_equal(decrypt_on_spark(crypto_spark, vec, priv, partitions=2), dec.decrypt(vec))
    x = rng.normal(size=(40, 3))
    remote = xt_d_on_spark(crypto_spark, x, vec, FIX, partitions=2)
    local = xt_d(x, vec, FIX)
    assert remote.bound == local.bound
    np.testing.assert_array_equal(dec.decrypt(remote), dec.decrypt(local))
