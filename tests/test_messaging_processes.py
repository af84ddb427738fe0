"""The channel between real OS processes through the embedded broker."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

SCRIPT = Path(__file__).with_name("party_main.py")


def start(tmp_path: Path, name: str, job: str, me: str, peer: str, config, **scenario) -> subprocess.Popen:
    raw = dataclasses.asdict(config)
    raw["peers"] = dict(config.peers)
    spec = {"job": job, "me": me, "peer": peer, "config": raw,
            "log": str(tmp_path / f"{name}.log"), **scenario}
    path = tmp_path / f"{name}.json"
    path.write_text(json.dumps(spec))
    return subprocess.Popen([sys.executable, str(SCRIPT), str(path)], stderr=subprocess.PIPE, text=True)


def finish(proc: subprocess.Popen, timeout: float = 180) -> None:
    _, err = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, err[-3000:]


def lines(tmp_path: Path, name: str) -> list[str]:
    path = tmp_path / f"{name}.log"
    return path.read_text().splitlines() if path.exists() else []


def test_value_and_50mb_array_cross_between_processes(tmp_path, make_parties, job_id):
    configs = make_parties("a", "b")
    elements = 50 * 1024 * 1024 // 8
    receiver = start(tmp_path, "b", job_id, "b", "a", configs["b"], scenario="recv_big")
    sender = start(tmp_path, "a", job_id, "a", "b", configs["a"], scenario="send", big_elements=elements)
    finish(sender)
    finish(receiver)

    expected = hashlib.sha256((np.arange(elements, dtype=np.float64) * 0.5).tobytes()).hexdigest()
    got = lines(tmp_path, "b")
    assert got[0] == f"got big {expected} ({elements},) float64"
    assert json.loads(got[1].removeprefix("got hello ")) == {"from": "a", "n": 42}


def test_killed_receiver_resumes_without_loss_or_redelivery(tmp_path, make_parties, job_id):
    configs = make_parties("a", "b")
    count = 300
    receiver = start(tmp_path, "b1", job_id, "b", "a", configs["b"], scenario="recv",
                     count=count, delay_s=0.01)
    sender = start(tmp_path, "a", job_id, "a", "b", configs["a"], scenario="send", count=count)
    deadline = time.monotonic() + 120
    while len(lines(tmp_path, "b1")) < 60 and time.monotonic() < deadline:
        time.sleep(0.05)
    receiver.kill()                      # SIGKILL: no chance to commit or close
    receiver.wait()
    finish(sender)
    first_run = [int(v) for v in lines(tmp_path, "b1")]
    assert 60 <= len(first_run) < count, "the receiver was not killed mid-stream"

    state = json.loads((Path(configs["b"].state_dir) / f"{job_id}.b-a.channel.json").read_text())
    # The sender's message 1 is a greeting, value i is message i + 2: values
    # 0..committed-1 are the ones whose offsets the receiver had committed.
    committed = state["position"]["last_id"][1] - 1
    # Commits trail hand-overs by at most channel.commit_interval_s, never lead them.
    assert 0 < committed <= len(first_run)

    restarted = start(tmp_path, "b2", job_id, "b", "a", configs["b"], scenario="recv", count=count,
                      start=committed, must_not_get=list(range(max(0, committed - 3), committed)))
    finish(restarted)
    second_run = lines(tmp_path, "b2")
    probes = [line for line in second_run if not line.isdigit()]
    assert probes == [f"absent {i}" for i in range(max(0, committed - 3), committed)]
    resumed = [int(v) for v in second_run if v.isdigit()]
    assert resumed == list(range(committed, count))
    assert sorted(set(first_run) | set(resumed)) == list(range(count))


@pytest.mark.parametrize("missing", ["handshake", "value"])
def test_missing_peer_times_out_naming_peer_tag_and_topic(make_parties, job_id, missing):
    from fedps.errors import PeerError
    from fedps.messaging.channel import Channel
    from fedps.messaging.tags import Scope

    configs = make_parties("a", "b", handshake_timeout_s=1.5)
    channel = Channel(job_id, "a", "b", configs["a"])
    if missing == "handshake":
        with pytest.raises(PeerError, match=rf"peer 'b'.*topic fedps\.{job_id}\.b\.a"):
            channel.open()
        channel.close()
        return
    import threading

    other = Channel(job_id, "b", "a", configs["b"])
    opener = threading.Thread(target=other.open)
    opener.start()
    with channel.open():
        opener.join()
        tag = Scope(job_id, "train").at(iteration=3).tag("gradient")
        with pytest.raises(PeerError) as error:
            channel.recv(tag, timeout=0.5)
    other.close()
    message = str(error.value)
    assert "'b'" in message and "gradient" in message and f"fedps.{job_id}.b.a" in message
