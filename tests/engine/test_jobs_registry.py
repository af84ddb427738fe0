"""`fedps jobs`: a party's jobs move through proposed, running, done or failed, and are listed."""

from __future__ import annotations

import stat

from fedps.engine import config, jobs


def party(job: str, name: str = "bank") -> config.FedpsConfig:
    return config.from_mapping({
        "job": {"id": job, "algorithm": "psi"}, "party": {"name": name, "identity_key": "k"},
        "peers": {"telco": "ed25519:AAAA"}, "kafka": {"bootstrap_servers": "127.0.0.1:9092"}})


def test_states_are_recorded_and_listed_newest_first(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("FEDPS_HOME", str(tmp_path))
    jobs.record(party("j1"), "proposed", tmp_path / "out1")
    jobs.record(party("j1"), "running", tmp_path / "out1", progress="bucket 3/8")
    jobs.record(party("j1"), "failed", tmp_path / "out1", error="PeerStopped: telco stopped: label")
    jobs.record(party("j2"), "proposed", tmp_path / "out2")
    jobs.record(party("j2"), "running", tmp_path / "out2")
    jobs.record(party("j2"), "done", tmp_path / "out2", progress="epoch 10/10")
    listed = jobs.entries("bank")
    assert [(e.job, e.state) for e in listed] == [("j2", "done"), ("j1", "failed")]
    assert listed[1].error.startswith("PeerStopped") and listed[1].progress == "bucket 3/8"
    assert listed[0].started <= listed[0].updated
    path = tmp_path / "jobs" / "bank" / "j1.json"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    # a rerun of a failed job starts a fresh entry
    jobs.record(party("j1"), "proposed", tmp_path / "out1")
    assert jobs.read("bank", "j1").error == "" and jobs.read("bank", "j1").progress == ""

    from fedps.engine.cli import main

    assert main(["jobs"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].split()[:4] == ["JOB", "PARTY", "ALGORITHM", "STATE"]
    assert [line.split()[:4] for line in out[1:]] == [["j1", "bank", "psi", "proposed"],
                                                       ["j2", "bank", "psi", "done"]]


def test_an_unknown_state_is_refused_and_nothing_is_listed_in_an_empty_home(tmp_path, monkeypatch):
    monkeypatch.setenv("FEDPS_HOME", str(tmp_path))
    try:
        jobs.record(party("j1"), "paused", tmp_path)
    except ValueError as exc:
        assert "paused" in str(exc)
    else:
        raise AssertionError("an unknown state was accepted")
    assert jobs.entries() == [] and "no jobs known" in jobs.table([])
