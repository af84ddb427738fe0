"""ECDH PSI: the hash to curve, the blinding, and two parties (threads, real channels)."""

from __future__ import annotations

import pytest
from conftest import assert_no_leak, random_sets
from nacl.bindings import crypto_scalarmult

from fedps.algorithms.psi import ecdh
from fedps.errors import CryptoError


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


def test_blinding_commutes_and_depends_on_the_secret():
    point = ecdh.encode_to_curve(b"alice")
    a, b = ecdh.new_secret(), ecdh.new_secret()
    assert ecdh.blind(a, ecdh.blind(b, point)) == ecdh.blind(b, ecdh.blind(a, point))
    assert ecdh.blind(a, point) != ecdh.blind(b, point)
    assert ecdh.encode_to_curve(b"alice") != ecdh.encode_to_curve(b"bob")


def test_batch_blinding_equals_one_by_one_and_refuses_low_order_points():
    points = [ecdh.encode_to_curve(str(i).encode()) for i in range(50)]
    secret = ecdh.new_secret()
    batch = ecdh.blind_all(secret, points, len(points))
    assert [row.tobytes() for row in batch] == [crypto_scalarmult(secret, p) for p in points]  # PyNaCl
    with pytest.raises(CryptoError, match="point 3"):
        ecdh.blind_all(secret, [*points[:3], bytes(32)], 4)  # u = 0 has order 1
    with pytest.raises(CryptoError, match="expected 5"):
        ecdh.blind_all(secret, points[:4], 5)
    with pytest.raises(CryptoError, match="expected 1"):
        ecdh.blind_all(secret, [], 1)
    with pytest.raises(CryptoError, match="expected 2 points, got more"):
        ecdh.blind_all(secret, points[:3], 2)  # never writes past the buffer
    assert ecdh.blind_all(secret, [], 0).shape == (0, 32)


def test_ecdh_finds_the_intersection_and_leaks_no_other_id(psi_pair):
    guest, host, shared = random_sets(300, 200, 120, seed=1)
    out = psi_pair(guest, host, protocol="ecdh")
    for name in ("guest", "host"):
        assert out[name].error is None, out[name].error
        assert out[name].manifest["count"] == 120
        assert set(out[name].rows["id"].str.strip()) == shared
        assert list(out[name].rows["psi_index"]) == list(range(120))
        assert out[name].metrics["psi_peer_ids"] == (200 if name == "guest" else 300)
    assert out["guest"].manifest["digest"] == out["host"].manifest["digest"]
    assert assert_no_leak(out, {"guest": guest, "host": host}, shared) == 180 + 80


@pytest.mark.parametrize("overlap,fmt", [(0, "csv"), (150, "parquet")])
def test_ecdh_integer_ids_with_empty_and_full_overlap(psi_pair, overlap, fmt):
    guest, host, shared = random_sets(150, 150, overlap, seed=overlap, integer=True)
    out = psi_pair(guest, host, fmt=fmt, protocol="ecdh")
    for name in ("guest", "host"):
        assert out[name].error is None, out[name].error
        assert out[name].manifest["count"] == overlap
        assert set(out[name].rows["id"].astype(str)) == shared
    assert out["guest"].manifest["digest"] == out["host"].manifest["digest"]


def test_ecdh_one_sided_result(psi_pair):
    guest, host, shared = random_sets(100, 100, 40, seed=7)
    out = psi_pair(guest, host, protocol="ecdh", result="guest")
    assert out["guest"].error is None and out["host"].error is None
    assert out["guest"].manifest["count"] == 40
    assert out["host"].manifest is None and out["host"].metrics["psi_learned"] is False


def test_a_low_order_point_from_the_peer_stops_the_step_with_a_crypto_error(spark, tmp_path):
    """An executor's refusal reaches the driver as the fedps error, not as Spark's wrapper."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    from fedps.algorithms.psi import params
    from fedps.algorithms.psi.stream import PsiRun, from_matrix
    from fedps.messaging.tags import Scope

    good = np.frombuffer(b"".join(ecdh.encode_to_curve(str(i).encode()) for i in range(3)),
                         np.uint8).reshape(3, 32)
    low_order = np.zeros((1, 32), np.uint8)  # u = 0
    for bucket, matrix in ((0, good), (1, np.vstack([good, low_order]))):
        folder = tmp_path / "peer_single" / f"bucket={bucket}"
        folder.mkdir(parents=True)
        pq.write_table(pa.table({"seq": np.arange(len(matrix)), "value": from_matrix(matrix)}),
                       folder / "part-0.parquet")
    settings = params.from_mapping({"input": "x.csv", "buckets": 2}, tmp_path)
    run = PsiRun(spark, None, Scope("j", "psi"), settings, "guest", "host", "host", tmp_path)
    with pytest.raises(CryptoError, match="refused curve point 3"):
        run.map_buckets(ecdh._blind_bucket(ecdh.new_secret()), {"peer_single": ["value"]}, "peer_double")
    first3 = lambda bucket, tables: tables["peer_single"].slice(0, 3).append_column(  # noqa: E731
        "seq", pa.array(np.arange(3)))
    assert run.map_buckets(first3, {"peer_single": ["value"]}, "copied") == 6
