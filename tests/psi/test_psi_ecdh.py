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


def test_a_party_without_rows_ends_with_an_empty_output_that_keeps_its_columns(psi_pair):
    """Nothing staged on the guest: its output file still has its input's columns (training reads them)."""
    out = psi_pair([], [f"h{i}" for i in range(50)], protocol="ecdh", id_type="string")
    for name in ("guest", "host"):
        assert out[name].error is None, out[name].error
        assert out[name].manifest["count"] == 0 and len(out[name].rows) == 0
        assert list(out[name].rows.columns) == ["id", "x0", "psi_hash", "psi_index"], name
    assert out["guest"].manifest["digest"] == out["host"].manifest["digest"]


def test_ecdh_one_sided_result(psi_pair):
    guest, host, shared = random_sets(100, 100, 40, seed=7)
    out = psi_pair(guest, host, protocol="ecdh", result="guest")
    assert out["guest"].error is None and out["host"].error is None
    assert out["guest"].manifest["count"] == 40
    assert out["host"].manifest is None and out["host"].metrics["psi_learned"] is False


def test_a_low_order_point_in_an_executor_task_stops_the_psi_with_a_crypto_error(spark, make_parties, job_id,
                                                                                 tmp_path):
    """An executor's refusal reaches the driver as the fedps error, not as Spark's wrapper."""
    import threading

    from fedps.algorithms.psi.storage import Folder
    from fedps.algorithms.psi.tasks import BucketPlan, done_buckets, serve_on_executors
    from fedps.messaging.channel import Channel
    from fedps.messaging.partitioned import ensure_topics, link_spec
    from fedps.messaging.tags import Scope

    configs = make_parties("guest", "host", recv_timeout_s=30.0)
    guest, host = Channel(job_id, "guest", "host", configs["guest"]), Channel(job_id, "host", "guest", configs["host"])
    opener = threading.Thread(target=guest.open)
    opener.start()
    host.open()
    opener.join()
    spec = link_spec(guest, 2, label="psi")
    ensure_topics(spec)
    work = Folder.at(f"file://{tmp_path}/work")
    plan = BucketPlan(spec, work, Scope(job_id, "psi.ecdh"), 2, 100, 30.0)
    secret = ecdh.new_secret()

    def serve(io):
        points = [ecdh.encode_to_curve(b"a"), bytes(32)] if io.bucket == 1 else [ecdh.encode_to_curve(b"b")]
        ecdh.blind_all(secret, points, len(points))

    with pytest.raises(CryptoError, match="refused curve point 1"):
        serve_on_executors(spark, plan, serve)
    assert set(done_buckets(work)) <= {0}          # the refused bucket is not marked done
    guest.close()
    host.close()


def test_executor_buckets_find_the_intersection_and_the_driver_memory_does_not_grow_with_ids(psi_pair):
    """Buckets served by executor tasks (one barrier task per party: both share this Spark);
    the drivers' peak Python memory at 10x the ids stays within a generous bound."""
    import tracemalloc

    peaks = {}
    for n in (1000, 10000):
        guest, host, shared = random_sets(n, n, n // 4, seed=n, integer=True)
        tracemalloc.start()
        out = psi_pair(guest, host, protocol="ecdh", local_below=0, tasks=1, batch_size=2000)
        peaks[n] = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        for name in ("guest", "host"):
            assert out[name].error is None, out[name].error
            assert out[name].metrics["psi_mode"] == "executors"
            assert set(out[name].rows["id"].astype(str)) == shared
            assert list(out[name].rows.sort_values("psi_index")["psi_index"]) == list(range(n // 4))
        assert out["guest"].manifest["digest"] == out["host"].manifest["digest"]
    # holding the 2 x 10^4 ids and points in the drivers would add several MB
    assert peaks[10000] < 1.25 * peaks[1000] + (1 << 20), peaks
