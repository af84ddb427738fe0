"""Homomorphic operations and X^T [[d]] against numpy."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp
from gmpy2 import mpz
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from fedps.engine.crypto import FixedPoint, xt_d
from fedps.engine.crypto.matrix import multi_exp
from fedps.errors import CryptoError

floats = st.floats(min_value=-100, max_value=100, allow_nan=False)
D_FIX = FixedPoint(frac_bits=20, int_bits=8)
X_FIX = FixedPoint(frac_bits=8, int_bits=8)


def vector_pairs(max_len: int = 10):
    return st.integers(0, max_len).flatmap(
        lambda n: st.tuples(arrays(np.float64, n, elements=floats), arrays(np.float64, n, elements=floats)))


def quantize(values: np.ndarray, fixed: FixedPoint) -> np.ndarray:
    return np.ldexp(np.rint(np.ldexp(values, fixed.frac_bits)), -fixed.frac_bits)


@settings(max_examples=25, deadline=None)
@given(pair=vector_pairs(), fa=st.integers(0, 24), fb=st.integers(0, 24))
def test_adding_vectors_with_mixed_scales_matches_numpy(owner_enc, peer_enc, dec, pair, fa, fb):
    a, b = pair
    fix_a, fix_b = FixedPoint(frac_bits=fa, int_bits=8), FixedPoint(frac_bits=fb, int_bits=8)
    total = owner_enc.encrypt(a, fix_a) + peer_enc.encrypt(b, fix_b)
    assert total.frac_bits == max(fa, fb)
    np.testing.assert_array_equal(dec.decrypt(total), quantize(a, fix_a) + quantize(b, fix_b))


@settings(max_examples=25, deadline=None)
@given(pair=vector_pairs())
def test_add_plain_and_mul_plain_match_numpy(owner_enc, dec, pair):
    a, b = pair
    vec = owner_enc.encrypt(a, D_FIX)
    qa, qb = quantize(a, D_FIX), quantize(b, X_FIX)
    np.testing.assert_array_equal(dec.decrypt(vec.add_plain(b, int_bits=8)), qa + quantize(b, D_FIX))
    product = vec.mul_plain(b, X_FIX)
    assert product.frac_bits == D_FIX.frac_bits + X_FIX.frac_bits
    np.testing.assert_array_equal(dec.decrypt(product), qa * qb)


@settings(max_examples=25, deadline=None)
@given(values=arrays(np.float64, st.integers(1, 10), elements=floats), scalar=floats)
def test_scalar_multiply_and_sum_match_numpy(owner_enc, dec, values, scalar):
    vec = owner_enc.encrypt(values, D_FIX)
    expected = quantize(values, D_FIX) * quantize(np.array([scalar]), X_FIX)[0]
    np.testing.assert_array_equal(dec.decrypt(vec.mul_plain(scalar, X_FIX)), expected)
    assert dec.decrypt(vec.sum())[0] == pytest.approx(quantize(values, D_FIX).sum(), abs=1e-9)


@st.composite
def matrices(draw):
    rows, cols = draw(st.integers(1, 12)), draw(st.integers(1, 5))
    dense = draw(arrays(np.float64, (rows, cols), elements=st.one_of(
        st.just(0.0), st.just(1.0), st.floats(min_value=-200, max_value=200, allow_nan=False))))
    d = draw(arrays(np.float64, rows, elements=floats))
    return dense, d


@settings(max_examples=25, deadline=None)
@given(case=matrices(), sparse=st.booleans())
def test_xt_d_dense_and_sparse_match_numpy(peer_enc, dec, case, sparse):
    x, d = case
    enc_d = peer_enc.encrypt(d, D_FIX)
    result = xt_d(sp.csr_matrix(x) if sparse else x, enc_d, X_FIX)
    expected = quantize(x, X_FIX).T @ quantize(d, D_FIX)
    assert result.frac_bits == D_FIX.frac_bits + X_FIX.frac_bits
    np.testing.assert_allclose(dec.decrypt(result), expected, rtol=1e-12, atol=1e-9)


def test_xt_d_with_binary_features_and_many_rows(peer_enc, dec):
    rng = np.random.default_rng(7)
    x = sp.random(300, 6, density=0.3, random_state=8, data_rvs=lambda k: np.ones(k)).tocsr()
    d = rng.normal(size=300)
    result = dec.decrypt(xt_d(x, peer_enc.encrypt(d, D_FIX), FixedPoint(frac_bits=0, int_bits=1)))
    np.testing.assert_allclose(result, x.T @ quantize(d, D_FIX), atol=1e-9)


@settings(max_examples=25, deadline=None)
@given(exps=st.lists(st.integers(0, 2**20), min_size=0, max_size=40))
def test_bucket_multi_exponentiation_matches_pow(keypair, exps):
    nsq = mpz(keypair[0].nsquare)
    bases = [mpz(3 + 2 * i) for i in range(len(exps))]
    expected = mpz(1)
    for b, e in zip(bases, exps):
        expected = expected * pow(b, e, nsq) % nsq
    assert multi_exp(bases, exps, nsq) == expected


def test_xt_d_refuses_shape_mismatch_and_out_of_range_x(peer_enc):
    d = peer_enc.encrypt([1.0, 2.0], D_FIX)
    with pytest.raises(CryptoError, match="rows"):
        xt_d(np.ones((3, 2)), d, X_FIX)
    with pytest.raises(CryptoError, match="declared"):
        xt_d(np.full((2, 2), 300.0), d, X_FIX)


def test_repeated_additions_overflow_raises_instead_of_wrapping(owner_enc):
    vec = owner_enc.encrypt([1.0], FixedPoint(frac_bits=200, int_bits=40))
    with pytest.raises(CryptoError, match="overflow"):
        for _ in range(100):
            vec = vec.mul_plain(2.0 ** 30, FixedPoint(frac_bits=0, int_bits=40))


def test_operations_refuse_vectors_under_another_key(owner_enc, other_keypair):
    from fedps.engine.crypto import Encryptor

    foreign = Encryptor(other_keypair[0]).encrypt([1.0], D_FIX)
    with pytest.raises(CryptoError, match="key"):
        owner_enc.encrypt([1.0], D_FIX) + foreign
