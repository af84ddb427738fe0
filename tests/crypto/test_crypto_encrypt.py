"""Encryption and decryption against phe and numpy, with and without CRT."""

from __future__ import annotations

import numpy as np
import pytest
from gmpy2 import mpz
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from phe import paillier

from fedps.engine.crypto import Encryptor, FixedPoint, from_phe, to_phe
from fedps.engine.crypto.fast import Obfuscator
from fedps.errors import ConfigError, CryptoError

floats = st.floats(min_value=-1e4, max_value=1e4, allow_nan=False)
vectors = arrays(np.float64, st.integers(0, 12), elements=floats)
FIX = FixedPoint(frac_bits=24, int_bits=16)
TOL = 2.0 ** -24


@settings(max_examples=25, deadline=None)
@given(values=vectors, crt=st.booleans())
def test_encrypt_decrypts_with_phe_and_our_decryptor(keypair, owner_enc, peer_enc, dec, values, crt):
    pub, priv = keypair
    vec = (owner_enc if crt else peer_enc).encrypt(values, FIX)
    np.testing.assert_allclose(dec.decrypt(vec), values, atol=TOL)
    for number, expected in zip(to_phe(vec), values):
        assert priv.decrypt(number) == pytest.approx(expected, abs=TOL)


@settings(max_examples=25, deadline=None)
@given(ints=st.lists(st.integers(-2**200, 2**200), max_size=8))
def test_phe_raw_encryption_decrypts_here_and_ours_decrypts_in_phe(keypair, owner_enc, dec, ints):
    pub, priv = keypair
    theirs = [pub.raw_encrypt(v % pub.n) for v in ints]
    assert dec.raw.decrypt(theirs) == ints
    ours = owner_enc.raw.encrypt(ints)
    assert [priv.raw_decrypt(int(c)) for c in ours] == [v % pub.n for v in ints]


@settings(max_examples=25, deadline=None)
@given(values=st.lists(floats, min_size=1, max_size=6), precisions=st.lists(st.integers(0, 12), min_size=6))
def test_phe_numbers_with_mixed_exponents_become_one_vector(keypair, dec, values, precisions):
    pub, _ = keypair
    numbers = [pub.encrypt(v, precision=16.0 ** -p) for v, p in zip(values, precisions)]
    vec = from_phe(numbers, pub, FixedPoint(int_bits=16))
    expected = [paillier.EncodedNumber.encode(pub, v, precision=16.0 ** -p).decode()
                for v, p in zip(values, precisions)]
    np.testing.assert_allclose(dec.decrypt(vec), expected, rtol=0, atol=1e-12)


def test_crt_and_public_tables_give_the_same_obfuscator(keypair):
    pub, priv = keypair
    public = Obfuscator(pub)
    crt = Obfuscator(pub, private_key=priv, base=public.base)
    for r in (0, 1, 255, 256, 2**255 - 1, 123456789123456789):
        expected = pow(int(public.base), r, int(pub.nsquare))
        assert public.power(r) == crt.power(r) == expected


def test_obfuscators_are_fresh_each_time(owner_enc, peer_enc):
    for enc in (owner_enc, peer_enc):
        cts = enc.raw.encrypt([7] * 50)
        assert len(set(cts)) == 50


@settings(max_examples=25, deadline=None)
@given(values=vectors)
def test_rerandomized_vector_differs_and_decrypts_equal(peer_enc, dec, values):
    vec = peer_enc.encrypt(values, FIX)
    again = peer_enc.rerandomize(vec)
    assert all(a != b for a, b in zip(vec.ciphertexts, again.ciphertexts))
    np.testing.assert_array_equal(dec.decrypt(again), dec.decrypt(vec))


def test_short_exponent_and_other_windows_still_decrypt(keypair, dec):
    pub, priv = keypair
    values = np.array([-3.5, 0.0, 2.25, 1e3])
    for kwargs in ({"exponent_bits": 161}, {"window": 4}, {"window": 11, "private_key": priv}):
        np.testing.assert_array_equal(dec.decrypt(Encryptor(pub, **kwargs).encrypt(values, FIX)), values)


def test_too_short_exponent_is_a_config_error(keypair):
    with pytest.raises(ConfigError):
        Encryptor(keypair[0], exponent_bits=64)


@pytest.mark.parametrize("bad", [[float("nan")], [float("inf")], [2.0 ** 16], [-(2.0 ** 17)]])
def test_value_outside_declared_range_raises(owner_enc, bad):
    with pytest.raises(CryptoError):
        owner_enc.encrypt(bad, FIX)


def test_plaintext_beyond_key_range_raises(owner_enc, keypair):
    with pytest.raises(CryptoError, match="overflow"):
        owner_enc.raw.encrypt([int(keypair[0].n)])
    with pytest.raises(CryptoError, match="overflow"):
        owner_enc.encrypt([1.0], FixedPoint(frac_bits=512, int_bits=16))


def test_private_key_of_another_pair_is_refused(keypair, other_keypair):
    with pytest.raises(CryptoError):
        Encryptor(keypair[0], private_key=other_keypair[1])


def test_decrypting_another_keys_vector_is_refused(other_keypair, dec):
    vec = Encryptor(other_keypair[0]).encrypt([1.0])
    with pytest.raises(CryptoError, match="key"):
        dec.decrypt(vec)


def test_plaintext_in_the_overflow_gap_decrypts_to_an_error_not_a_value(keypair, dec):
    pub = keypair[0]
    with pytest.raises(CryptoError, match="overflow gap"):
        dec.raw.decrypt([mpz(pub.raw_encrypt(pub.n // 2))])


@pytest.mark.parametrize("frac_bits", [8, 300])
def test_small_and_wide_plaintexts_decrypt_like_phe(keypair, owner_enc, dec, frac_bits):
    """Bounds below min(p, q)/2 decrypt modulo one prime; wider ones need both."""
    values = np.array([-7.25, 0.0, 3.5, -1e-2])
    vec = owner_enc.encrypt(values, FixedPoint(frac_bits=frac_bits, int_bits=8))
    priv = keypair[1]
    assert dec.decrypt_exact(vec) == [int(priv.decrypt(n) * 2**frac_bits) if frac_bits < 60 else e
                                      for n, e in zip(to_phe(vec), dec.raw.decrypt(vec.ciphertexts))]
    assert dec.decrypt_exact(vec) == FixedPoint(frac_bits=frac_bits, int_bits=8).encode(values)
