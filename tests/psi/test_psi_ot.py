"""OT PSI (RR22 in SecretFlow's library) between two parties: threads, real channels, the library's
messages through the relay and the sealed PSI link. Needs the OT venv (``make ot-env``); skipped
without it (CI does not build the 750 MB venv)."""

from __future__ import annotations

import pytest
from conftest import assert_no_leak, random_sets

from fedps.algorithms.psi import ot
from fedps.errors import ConfigError

try:
    ot.check_installed()
    HAVE_LIBRARY = True
except ConfigError:
    HAVE_LIBRARY = False

needs_library = pytest.mark.skipif(not HAVE_LIBRARY, reason="the OT PSI venv is not installed "
                                   "(make ot-env builds .venv-ot with spu 0.9.5, ~1 GB)")


@needs_library
def test_ot_finds_the_intersection_with_the_same_output_as_ecdh_and_leaks_no_other_id(psi_pair):
    guest, host, shared = random_sets(300, 200, 120, seed=5)
    out = psi_pair(guest, host, protocol="ot", buckets=2)
    for name in ("guest", "host"):
        assert out[name].error is None, out[name].error
        assert out[name].manifest["count"] == 120
        assert set(out[name].rows["id"].str.strip()) == shared
        assert out[name].metrics["psi_messages"]["ot_frames_sent"] > 0   # the library spoke through the link
    assert list(out["guest"].rows["id"]) == list(out["host"].rows["id"])   # the same order on both sides
    assert assert_no_leak(out, {"guest": guest, "host": host}, shared) == 80 + 180
    reference = psi_pair(guest, host, protocol="ecdh", buckets=2)
    for name in ("guest", "host"):
        mine, theirs = out[name], reference[name]
        assert theirs.error is None, theirs.error
        assert list(mine.rows.columns) == list(theirs.rows.columns)
        assert dict(mine.rows.dtypes) == dict(theirs.rows.dtypes)
        assert set(mine.manifest) - {"protocol"} == set(theirs.manifest) - {"protocol"}
        assert mine.manifest["count"] == theirs.manifest["count"]
        assert sorted(mine.rows["id"]) == sorted(theirs.rows["id"])


@needs_library
def test_ot_one_sided_result_and_an_empty_intersection(psi_pair):
    # buckets served in the drivers (a small run); bench/psi_ot.py runs them on executors
    guest, host, _ = random_sets(40, 30, 0, seed=6)
    out = psi_pair(guest, host, protocol="ot", buckets=1, result="guest")
    assert out["guest"].error is None and out["host"].error is None, (out["guest"].error, out["host"].error)
    assert out["guest"].manifest["count"] == 0
    assert out["host"].manifest is None and out["host"].metrics["psi_learned"] is False
