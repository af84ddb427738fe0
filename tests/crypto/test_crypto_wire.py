"""The ciphertext vector's wire form: round trips, foreign keys, malformed bytes."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from fedps.engine.crypto import CipherVector, Encryptor, FixedPoint, compress, fingerprint, seal_for_owner
from fedps.engine.crypto.keys import ciphertext_width
from fedps.engine.crypto.vector import WIRE_VERSION
from fedps.errors import CryptoError

FIX = FixedPoint(frac_bits=16, int_bits=8)
floats = st.floats(min_value=-200, max_value=200, allow_nan=False)


@settings(max_examples=25, deadline=None)
@given(values=arrays(np.float64, st.integers(0, 12), elements=floats), form=st.sampled_from(["plain", "packed", "masked"]))
def test_round_trip_keeps_every_field(keypair, peer_enc, dec, values, form):
    vec = peer_enc.encrypt(values, FIX)
    if form == "packed" and len(values):
        vec = compress(vec)
    elif form == "masked" and len(values):
        vec, _ = seal_for_owner(vec, peer_enc)
    back = CipherVector.from_bytes(vec.to_bytes(), keypair[0])
    assert (back.length, back.frac_bits, back.bound, back.layout, back.masked) == \
        (vec.length, vec.frac_bits, vec.bound, vec.layout, vec.masked)
    assert back.ciphertexts == vec.ciphertexts
    if not vec.masked:
        np.testing.assert_array_equal(dec.decrypt(back), dec.decrypt(vec))


def test_column_is_fixed_size_big_endian_binary(keypair, peer_enc):
    vec = peer_enc.encrypt([1.0, -1.0], FIX)
    col = vec.column
    width = ciphertext_width(keypair[0])
    assert col.type == pa.binary(width)
    assert [int.from_bytes(b.as_py(), "big") for b in col] == [int(c) for c in vec.ciphertexts]


def test_vector_under_another_key_is_refused_by_fingerprint(keypair, other_keypair):
    blob = Encryptor(other_keypair[0]).encrypt([1.0], FIX).to_bytes()
    with pytest.raises(CryptoError, match=fingerprint(other_keypair[0]).hex()[:16]):
        CipherVector.from_bytes(blob, keypair[0])


def _rebuild(vec: CipherVector, header_change=None, column=None) -> bytes:
    head = vec._header()
    if header_change:
        head.update(header_change)
    col = vec.column if column is None else column
    schema = pa.schema([pa.field("c", col.type, nullable=False)], metadata={b"fedps.crypto": json.dumps(head).encode()})
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, schema) as writer:
        writer.write_batch(pa.record_batch([col], schema=schema))
    return bytes([WIRE_VERSION]) + sink.getvalue().to_pybytes()


def test_malformed_bytes_are_refused_with_a_crypto_error(keypair, peer_enc):
    vec = peer_enc.encrypt([1.0, 2.0, 3.0], FIX)
    good = vec.to_bytes()
    width = ciphertext_width(keypair[0])
    too_big = pa.array([b"\xff" * width] * 3, type=pa.binary(width))
    bad_blobs = [
        b"", b"\x01", bytes([WIRE_VERSION + 1]) + good[1:], good[:len(good) // 2], good[:1] + b"garbage" * 20,
        _rebuild(vec, {"length": 7}),
        _rebuild(vec, {"layout": [0, 10, 40]}),
        _rebuild(vec, {"bound": "not a number"}),
        _rebuild(vec, {"frac_bits": -3}),
        _rebuild(vec, column=pa.array([b"\x01" * 8] * 3, type=pa.binary(8))),
        _rebuild(vec, column=too_big),
    ]
    for blob in bad_blobs:
        with pytest.raises(CryptoError):
            CipherVector.from_bytes(blob, keypair[0])
    assert len(CipherVector.from_bytes(good, keypair[0])) == 3


def test_wire_bytes_per_value_shrink_with_packing(keypair, peer_enc):
    vec = peer_enc.encrypt(np.linspace(-1, 1, 64), FIX)
    plain, packed = len(vec.to_bytes()), len(compress(vec).to_bytes())
    assert packed * 2 < plain
