"""A party killed in the middle of a PSI and restarted: both parties stop within seconds."""

from __future__ import annotations

import threading
import time

import pandas as pd
import pytest

from fedps.algorithms import psi
from fedps.engine import config as config_module
from fedps.engine.runner import PartyContext
from fedps.errors import PeerError, ProtocolError
from fedps.messaging.channel import Channel

RERUN = "rerun it under a new job id"


class Killed(BaseException):
    """Stands for kill -9: the party stops where it is."""


def _context(job: str, name: str, ids: list[str], base, spark, channel: Channel) -> PartyContext:
    data = base / f"{name}.csv"
    pd.DataFrame({"id": ids, "x0": range(len(ids))}).to_csv(data, index=False)
    config = config_module.from_mapping({
        "job": {"id": job, "algorithm": "psi", "params": {"input": str(data), "buckets": 2, "batch_size": 50}},
        "party": {"name": name, "role": name, "output_dir": str(base / name)},
    })
    return PartyContext(config, {channel.peer: channel}, base / name, _spark=spark)


def test_a_party_restarted_mid_psi_stops_itself_and_its_peer_at_once(spark, make_parties, job_id, tmp_path):
    configs = make_parties("guest", "host", recv_timeout_s=60.0)
    guest_ids, host_ids = [f"u{i}" for i in range(0, 60)], [f"u{i}" for i in range(30, 90)]
    guest = Channel(job_id, "guest", "host", configs["guest"])
    host = Channel(job_id, "host", "guest", configs["host"])
    opener = threading.Thread(target=guest.open)
    opener.start()
    host.open()
    opener.join()

    real_recv = host.recv

    def dies_mid_psi(tag, timeout=None):
        if tag.name == "key_share":   # its share is sent: the guest goes on to its buckets, then waits
            raise Killed()
        return real_recv(tag, timeout)

    host.recv = dies_mid_psi
    outcome: dict[str, object] = {}

    def run_guest() -> None:
        try:
            psi.run(_context(job_id, "guest", guest_ids, tmp_path, spark, guest))
            outcome["guest"] = "finished"
        except BaseException as exc:  # noqa: BLE001 - handed to the test
            outcome["guest"] = exc
        outcome["guest_at"] = time.monotonic()

    thread = threading.Thread(target=run_guest)
    thread.start()
    with pytest.raises(Killed):
        psi.run(_context(job_id, "host", host_ids, tmp_path, spark, host))
    host.close(after_error=True)

    restarted = Channel(job_id, "host", "guest", configs["host"]).open()
    assert restarted.resumed
    started = time.monotonic()
    with pytest.raises(ProtocolError, match=RERUN):
        psi.run(_context(job_id, "host", host_ids, tmp_path, spark, restarted))
    restarted.close()
    thread.join(60)
    guest.close()
    assert isinstance(outcome.get("guest"), PeerError), outcome.get("guest")
    assert "host restarted in the middle of the PSI" in str(outcome["guest"]) and RERUN in str(outcome["guest"])
    assert outcome["guest_at"] - started < 15        # not the hour of wait_s


def test_a_party_restarted_after_its_psi_finished_keeps_the_result(spark, make_parties, job_id, tmp_path):
    configs = make_parties("guest", "host", recv_timeout_s=60.0)
    guest = Channel(job_id, "guest", "host", configs["guest"])
    host = Channel(job_id, "host", "guest", configs["host"])
    opener = threading.Thread(target=guest.open)
    opener.start()
    host.open()
    opener.join()
    ids = [f"u{i}" for i in range(40)]
    contexts = {"guest": _context(job_id, "guest", ids, tmp_path, spark, guest),
                "host": _context(job_id, "host", ids[10:], tmp_path, spark, host)}
    thread = threading.Thread(target=psi.run, args=(contexts["guest"],))
    thread.start()
    psi.run(contexts["host"])
    thread.join(60)
    guest.close()
    host.close()

    again = Channel(job_id, "guest", "host", configs["guest"]).open()
    context = _context(job_id, "guest", ids, tmp_path, spark, again)
    psi.run(context)                                 # no peer needed: the result is there
    again.close()
    assert context.metrics["psi_reused"] is True
    assert context.metrics["psi_digest"] == contexts["guest"].metrics["psi_digest"]
    assert context.metrics["psi_intersection"] == 30
