"""A party killed in the middle of its buckets and restarted with the same settings resumes.

Parties are threads of this process with real channels on the embedded broker;
the "kill" is an exception raised right after the host's first bucket is done
(the work folder and the channel state stay as a kill would leave them). The
output and work folders are ``file://`` URIs.
"""

from __future__ import annotations

import threading

import pandas as pd
import pytest
from conftest import random_sets

from fedps.algorithms import psi
from fedps.algorithms.psi import tasks
from fedps.engine import config as config_module
from fedps.engine.runner import PartyContext
from fedps.messaging.channel import Channel


class Killed(BaseException):
    """Stands for kill -9: the party stops where it is."""


def _context(job, name, ids, base, spark, channel, protocol):
    data = base / f"{name}.csv"
    pd.DataFrame({"id": ids, "x0": range(len(ids))}).to_csv(data, index=False)
    config = config_module.from_mapping({
        "job": {"id": job, "algorithm": "psi", "params": {
            "input": str(data), "buckets": 4, "batch_size": 50, "protocol": protocol, "rsa_bits": 1024,
            "output": f"file://{base}/{name}/out", "work": f"file://{base}/{name}/work"}},
        "party": {"name": name, "role": name, "output_dir": str(base / name)},
    })
    return PartyContext(config, {channel.peer: channel}, base / name, _spark=spark)


def test_a_party_killed_mid_buckets_resumes_and_both_find_the_intersection(spark, make_parties, job_id, tmp_path,
                                                                           monkeypatch):
    """RSA with the key at the killed host: its private key and the guest's blinding factors must
    survive for the resumed buckets to match (ECDH's resume is the same code with a plain secret)."""
    protocol = "rsa"
    configs = make_parties("guest", "host", recv_timeout_s=60.0)
    guest_ids, host_ids, shared = random_sets(160, 120, 70, seed=11)
    guest = Channel(job_id, "guest", "host", configs["guest"])
    host = Channel(job_id, "host", "guest", configs["host"])
    opener = threading.Thread(target=guest.open)
    opener.start()
    host.open()
    opener.join()

    real = tasks._serve_one
    served: list[int] = []

    def host_dies_after_one_bucket(plan, link, bucket, fn, stop=None):
        stats = real(plan, link, bucket, fn, stop)
        if plan.link.me == "host":
            served.append(bucket)
            if len(served) == 1:
                raise Killed()
        return stats

    monkeypatch.setattr(tasks, "_serve_one", host_dies_after_one_bucket)
    outcome: dict[str, object] = {}
    contexts = {"guest": _context(job_id, "guest", guest_ids, tmp_path, spark, guest, protocol)}

    def run_guest() -> None:
        try:
            psi.run(contexts["guest"])
            outcome["guest"] = "finished"
        except BaseException as exc:  # noqa: BLE001 - handed to the test
            outcome["guest"] = exc

    thread = threading.Thread(target=run_guest)
    thread.start()
    with pytest.raises(Killed):
        psi.run(_context(job_id, "host", host_ids, tmp_path, spark, host, protocol))
    host.close(after_error=True)

    restarted = Channel(job_id, "host", "guest", configs["host"]).open()
    assert restarted.resumed
    contexts["host"] = _context(job_id, "host", host_ids, tmp_path, spark, restarted, protocol)
    psi.run(contexts["host"])
    restarted.close()
    thread.join(120)
    guest.close()
    assert outcome.get("guest") == "finished", outcome.get("guest")
    assert contexts["host"].metrics["psi_resumed"] is True
    assert contexts["host"].metrics["psi_buckets_reused"] == 1
    for name, context in contexts.items():
        rows = pd.read_parquet(tmp_path / name / "out" / "rows")
        assert set(rows["id"].str.strip()) == shared
        assert sorted(rows["psi_index"]) == list(range(len(shared)))
        assert not (tmp_path / name / "work").exists()
    assert contexts["guest"].metrics["psi_digest"] == contexts["host"].metrics["psi_digest"]
