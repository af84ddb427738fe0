"""Packing, compression and masking against numpy."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from fedps.engine.crypto import FixedPoint, PackingLayout, add_mask, capacity, compress, seal_for_owner, xt_d
from fedps.errors import ConfigError, CryptoError

FIX = FixedPoint(frac_bits=16, int_bits=4)
floats = st.floats(min_value=-15, max_value=15, allow_nan=False)


def quantize(values: np.ndarray, fixed: FixedPoint = FIX) -> np.ndarray:
    return np.ldexp(np.rint(np.ldexp(values, fixed.frac_bits)), -fixed.frac_bits)


@settings(max_examples=25, deadline=None)
@given(slots=st.integers(1, 8), width=st.integers(2, 60), data=st.data())
def test_pack_then_unpack_returns_signed_values(slots, width, data):
    layout = PackingLayout(slots=slots, value_bits=width, mask_bits=0)
    top = layout.value_bound
    values = data.draw(st.lists(st.integers(-top, top), min_size=slots, max_size=slots))
    assert layout.unpack(layout.pack(values)) == values


def test_capacity_follows_key_size_precision_and_headroom():
    plan = PackingLayout.plan(2048, FixedPoint(frac_bits=16, int_bits=4), additions=1023)
    assert plan.value_bits == 4 + 16 + 10 + 1
    assert plan.slot_bits == plan.value_bits + 1
    assert plan.slots == capacity(2048, plan.slot_bits, 40) == (2048 - 3 - 41) // plan.slot_bits
    assert plan.mask_range_bits + 1 <= 2048 - 3
    unmasked = PackingLayout.plan(2048, FixedPoint(frac_bits=16, int_bits=4), additions=1023, mask_bits=0)
    assert unmasked.slots > plan.slots
    assert PackingLayout.plan(4096, FixedPoint(frac_bits=16, int_bits=4), additions=1023).slots > plan.slots
    with pytest.raises(ConfigError):
        PackingLayout.plan(2048, FIX, additions=10, mask_bits=20)
    with pytest.raises(ConfigError):
        PackingLayout.plan(2048, FIX, additions=10, slots=10_000)


@settings(max_examples=25, deadline=None)
@given(rows=arrays(np.float64, st.tuples(st.integers(1, 6), st.just(2)), elements=floats),
       additions=st.integers(0, 5))
def test_packed_gh_rows_add_slot_wise(keypair, owner_enc, dec, rows, additions):
    layout = PackingLayout.plan(keypair[0].n.bit_length(), FIX, additions=additions + len(rows) + 2, slots=2)
    vec = owner_enc.encrypt_packed(rows, layout, FIX)
    assert len(vec.ciphertexts) == len(rows)
    np.testing.assert_array_equal(dec.decrypt(vec).reshape(-1, 2), quantize(rows))
    total = vec.sum()
    np.testing.assert_allclose(dec.decrypt(total), quantize(rows).sum(axis=0), atol=1e-9)
    tripled = vec + vec.add_plain(rows.ravel(), int_bits=4)
    np.testing.assert_array_equal(dec.decrypt(tripled), 3 * quantize(rows).ravel())


def test_exceeding_declared_additions_raises(keypair, owner_enc):
    layout = PackingLayout.plan(keypair[0].n.bit_length(), FIX, additions=3, slots=2)
    vec = owner_enc.encrypt_packed(np.ones((1, 2)), layout, FIX)
    total = vec + vec + vec + vec  # the declared 3 additions, rounded up to whole bits
    with pytest.raises(CryptoError, match="slot overflow"):
        _ = total + total


@settings(max_examples=25, deadline=None)
@given(values=arrays(np.float64, st.integers(1, 20), elements=floats), unmasked=st.booleans())
def test_compressed_vector_decrypts_to_the_same_values(keypair, peer_enc, dec, values, unmasked):
    vec = peer_enc.encrypt(values, FIX)
    layout = PackingLayout.for_bound(keypair[0].n.bit_length(), vec.bound, mask_bits=0) if unmasked else None
    packed = peer_enc.rerandomize(compress(vec, layout))
    assert len(packed.ciphertexts) == -(-len(values) // packed.slots)
    assert packed.slots > 1
    np.testing.assert_array_equal(dec.decrypt(packed), quantize(values))


@settings(max_examples=25, deadline=None)
@given(values=arrays(np.float64, st.integers(1, 12), elements=floats), packed=st.booleans())
def test_masked_values_decrypt_exactly_and_the_sender_removes_the_mask(peer_enc, dec, values, packed):
    vec = peer_enc.encrypt(values, FIX)
    sealed, mask = seal_for_owner(vec, peer_enc) if packed else add_mask(vec, peer_enc)
    assert sealed.masked
    seen = dec.decrypt_exact(sealed)
    exact = FIX.encode(values)
    assert seen != exact
    assert mask.remove_exact(seen) == exact
    np.testing.assert_array_equal(mask.remove(seen), quantize(values))


@settings(max_examples=25, deadline=None)
@given(x=arrays(np.float64, (5, 3), elements=floats), d=arrays(np.float64, 5, elements=floats))
def test_gradient_round_trip_compress_mask_rerandomize(peer_enc, owner_enc, dec, x, d):
    enc_d = owner_enc.encrypt(d, FIX)
    grad = xt_d(x, enc_d, FIX)
    sealed, mask = seal_for_owner(grad, peer_enc)
    plain = compress(grad)
    assert all(a != b for a, b in zip(sealed.ciphertexts, plain.ciphertexts))
    expected = quantize(x).T @ quantize(d)
    np.testing.assert_allclose(mask.remove(dec.decrypt_exact(sealed)), expected, atol=1e-9)


def test_masked_vector_refuses_decrypt_and_further_operations(peer_enc, dec):
    sealed, _ = seal_for_owner(peer_enc.encrypt([1.0, 2.0], FIX), peer_enc)
    with pytest.raises(CryptoError, match="masked"):
        dec.decrypt(sealed)
    with pytest.raises(CryptoError, match="masked"):
        sealed + sealed


def test_wrong_mask_is_detected(peer_enc, dec):
    vec = peer_enc.encrypt([1.0, -2.0, 3.0], FIX)
    sealed, _ = seal_for_owner(vec, peer_enc)
    _, other_mask = seal_for_owner(vec, peer_enc)
    with pytest.raises(CryptoError, match="mask"):
        other_mask.remove(dec.decrypt_exact(sealed))


def test_layout_without_mask_room_refuses_masking(keypair, peer_enc):
    vec = peer_enc.encrypt([1.0, 2.0], FIX)
    layout = PackingLayout.for_bound(keypair[0].n.bit_length(), vec.bound, mask_bits=0)
    with pytest.raises(CryptoError, match="mask"):
        add_mask(compress(vec, layout), peer_enc)


def test_compressing_values_wider_than_the_layout_raises(keypair, peer_enc):
    vec = peer_enc.encrypt([1.0, 2.0], FIX)
    with pytest.raises(CryptoError):
        compress(vec, PackingLayout(slots=2, value_bits=8))


def test_mask_is_at_least_40_bits_wider_than_the_packed_value(peer_enc):
    packed = compress(peer_enc.encrypt(np.ones(30), FIX))
    hidden_bits = packed.layout.slots * packed.layout.slot_bits
    assert packed.layout.mask_range_bits >= hidden_bits + 40
    _, mask = add_mask(packed, peer_enc)
    assert all(0 <= r < 2 ** packed.layout.mask_range_bits for r in mask.values)
    assert max(r.bit_length() for r in mask.values) > hidden_bits + 20  # fails with odds 2^-20


def test_taking_packed_rows_keeps_values_in_order(keypair, peer_enc, dec):
    vec = compress(peer_enc.encrypt(np.arange(10.0), FIX), PackingLayout(slots=4, value_bits=25))
    np.testing.assert_array_equal(dec.decrypt(vec.take([1, 2])), [4, 5, 6, 7, 8, 9])
    with pytest.raises(CryptoError, match="partly filled"):
        vec.take([2, 0])


def test_a_keyed_mask_source_replays_the_same_masks_with_fresh_randomness(peer_enc, dec):
    import random

    vec = peer_enc.encrypt([1.5, -2.0, 3.25], FIX)
    first, mask_a = seal_for_owner(vec, peer_enc, randbits=random.Random(42).getrandbits)
    again, mask_b = seal_for_owner(vec, peer_enc, randbits=random.Random(42).getrandbits)
    assert mask_a.values == mask_b.values
    assert first.ciphertexts != again.ciphertexts
    assert dec.decrypt_exact(first) == dec.decrypt_exact(again)
    np.testing.assert_array_equal(mask_a.remove(dec.decrypt_exact(again)), [1.5, -2.0, 3.25])
