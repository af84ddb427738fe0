"""The issuer's agent: its configuration, the job it builds, revocation, and one ticketed job across processes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest

from fedps.engine import agent as agent_module
from fedps.engine import config as config_module
from fedps.engine import tickets
from fedps.engine.agreement import schema_hash
from fedps.engine.cli import main
from fedps.engine.tickets import Request, TicketRefused
from fedps.messaging.identity import generate_identity

COLUMNS = ["id", "x0", "x1"]


def write_issuer(folder: Path, servers: str = "127.0.0.1:9", peer_key: str | None = None) -> tuple[Path, str, str]:
    """The issuer "bank" (party template + agent TOML) and the peer "shop"'s identity; returns paths and keys."""
    bank_key = generate_identity(folder / "keys" / "bank.key")
    shop_key = peer_key or generate_identity(folder / "keys" / "shop.key")
    (folder / "data.csv").write_text("id,x0,x1\n1,0.5,1\n")
    (folder / "bank.toml").write_text(f"""
[party]
name = "bank"
role = "host"
identity_key = "keys/bank.key"
state_dir = "state"

[peers]
shop = "{shop_key}"

[kafka]
bootstrap_servers = "{servers}"

[channel]
handshake_timeout_s = 60
""")
    (folder / "agent.toml").write_text(f"""
[agent]
party = "bank.toml"
jobs_dir = "jobs"
poll_s = 0.3

[datasets.breast]
path = "data.csv"
columns = {json.dumps(COLUMNS)}

[algorithms.channel_demo]
role = "host"
params = {{ ciphertexts = 10, rounds = 2 }}

[algorithms.psi]
params = {{ input = "{{dataset.path}}", id_column = "{{dataset.id_column}}", buckets = 4 }}
requester_may_set = ["buckets"]
""")
    return folder / "agent.toml", bank_key, shop_key


def test_issue_list_and_revoke_from_the_command_line(tmp_path, capsys):
    conf, _, _ = write_issuer(tmp_path)
    out = tmp_path / "t.json"
    assert main(["ticket", "issue", "--conf", str(conf), "--peer", "shop", "--algorithm", "psi",
                 "--dataset", "breast", "--expires", "1h", "--max-runs", "3", "--out", str(out)]) == 0
    ticket = tickets.Ticket.from_json(out.read_text())
    assert ticket.datasets == {"breast": schema_hash(COLUMNS)} and ticket.max_runs == 3
    assert main(["tickets", "--conf", str(conf)]) == 0
    assert f"{ticket.id}  valid  peer shop" in capsys.readouterr().out
    assert main(["ticket", "revoke", "--conf", str(conf), ticket.id]) == 0
    main(["tickets", "--conf", str(conf)])
    assert f"{ticket.id}  revoked" in capsys.readouterr().out
    assert main(["ticket", "issue", "--conf", str(conf), "--peer", "shop", "--algorithm", "psi",
                 "--dataset", "salaries", "--out", str(out)]) == 2
    assert "data set salaries is not in" in capsys.readouterr().err


def test_issuer_side_uses_its_own_data_set_path_never_the_requester_s(tmp_path):
    conf, _, _ = write_issuer(tmp_path)
    agent = agent_module.load_agent(conf)
    ticket = tickets.issue(agent_module.load_identity(tmp_path / "keys" / "bank.key"), "bank", "shop",
                           agent.party.peers["shop"], ["psi"], {"breast": schema_hash(COLUMNS)},
                           time.time() + 60, 1)
    request = Request(ticket, "job-7", "psi", "breast", {"input": "/etc/passwd", "buckets": 16, "work": "/tmp/x"})
    config = config_module.load(agent.party_conf, agent_module.run_overrides(agent, request))
    assert config.job.params == {"input": str(tmp_path / "data.csv"), "id_column": "id", "buckets": 16}
    assert config.job.id == "job-7" and config.party.role == "host" and dict(config.peers) == {"shop": ticket.peer_key}
    assert config.party.output_dir == str(tmp_path / "jobs" / "job-7")
    with pytest.raises(TicketRefused) as caught:
        agent_module.run_overrides(agent, Request(ticket, "job-8", "hetero_lr", "breast"))
    assert caught.value.reason == "no-template"


def test_revocation_refuses_a_job_still_waiting_for_its_slot(tmp_path):
    conf, _, _ = write_issuer(tmp_path)
    agent = agent_module.Agent(agent_module.load_agent(conf))
    identity = agent_module.load_identity(tmp_path / "keys" / "bank.key")
    ticket = tickets.issue(identity, "bank", "shop", agent.config.party.peers["shop"], ["channel_demo"],
                           {"breast": schema_hash(COLUMNS)}, time.time() + 60, 5)
    agent.store.add(ticket)
    agent._slots.acquire()   # another job holds the only slot
    outcome = []

    def admit() -> None:
        try:
            agent._admit(Request(ticket, "job-q", "channel_demo", "breast"), "shop", ticket.peer_key)
            outcome.append("started")
        except TicketRefused as exc:
            outcome.append(exc.reason)

    waiting = threading.Thread(target=admit)
    waiting.start()
    while not agent.store.uses(ticket.id):
        time.sleep(0.01)
    assert agent.store.uses(ticket.id)[-1]["outcome"] == "accepted"
    agent.store.revoke(ticket.id)
    agent._slots.release()
    waiting.join(10)
    assert outcome == ["revoked"]
    assert agent.store.uses(ticket.id)[-1]["outcome"] == "refused" and agent.store.runs(ticket.id) == 0


def _peer_conf(folder: Path, job: str, bank_key: str, servers: str) -> Path:
    path = folder / f"{job}.toml"
    path.write_text(f"""
[job]
id = "{job}"
algorithm = "channel_demo"
params = {{ ciphertexts = 10, rounds = 2 }}

[party]
name = "shop"
role = "guest"
identity_key = "keys/shop.key"
output_dir = "out/{job}"
state_dir = "state"

[peers]
bank = "{bank_key}"

[kafka]
bootstrap_servers = "{servers}"
""")
    return path


def test_ticketed_job_runs_with_only_the_agent_started_and_an_expired_ticket_is_refused_on_both_sides(
        tmp_path, broker):
    issuer, peer = tmp_path / "bank", tmp_path / "shop"
    peer.mkdir()
    shop_key = generate_identity(peer / "keys" / "shop.key")
    conf, bank_key, _ = write_issuer(issuer.mkdir() or issuer, broker.bootstrap_servers, peer_key=shop_key)
    good = peer / "good.json"
    assert main(["ticket", "issue", "--conf", str(conf), "--peer", "shop", "--algorithm", "channel_demo",
                 "--dataset", "breast", "--max-runs", "1", "--out", str(good)]) == 0
    agent = agent_module.load_agent(conf)
    expired = tickets.issue(agent_module.load_identity(issuer / "keys" / "bank.key"), "bank", "shop", shop_key,
                            ["channel_demo"], agent.schemas(), time.time() - 10, 1, now=time.time() - 100)
    agent.store().add(expired)
    (peer / "expired.json").write_text(expired.to_json())

    env = dict(os.environ, PYTHONUNBUFFERED="1")
    command = [sys.executable, "-m", "fedps.engine.cli"]
    with open(issuer / "agent.log", "w") as log:
        daemon = subprocess.Popen([*command, "agent", "--conf", str(conf)], stderr=log, env=env)
    try:
        runs = {}
        for name in ("good", "expired"):
            job = f"tj{uuid.uuid4().hex[:10]}"
            runs[name] = (job, subprocess.Popen(
                [*command, "run", "--conf", str(_peer_conf(peer, job, bank_key, broker.bootstrap_servers)),
                 "--ticket", str(peer / f"{name}.json")],
                cwd=peer, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env))
        results = {name: proc.communicate(timeout=120) for name, (_, proc) in runs.items()}
        codes = {name: proc.returncode for name, (_, proc) in runs.items()}
        good_job, expired_job = runs["good"][0], runs["expired"][0]
        assert codes["good"] == 0, results["good"][1][-3000:]
        assert json.loads(results["good"][0].splitlines()[-1])["round_trips"] == 2
        assert codes["expired"] == 2, results["expired"][1][-3000:]
        assert f"bank refused the ticketed job {expired_job}: the ticket {expired.id} expired" in results["expired"][1]
        deadline = time.monotonic() + 60   # the issuer's side finishes on its own
        while "done" not in [u["outcome"] for u in agent.store().uses(json.loads(good.read_text())["ticket"]["id"])]:
            assert time.monotonic() < deadline, (issuer / "jobs" / good_job / "run.log").read_text()[-3000:]
            time.sleep(0.2)
        issuer_metrics = json.loads((issuer / "jobs" / good_job / "metrics.json").read_text())
        assert "error" not in issuer_metrics
        again = f"tj{uuid.uuid4().hex[:10]}"   # the ticket allowed one run, and had it
        rerun = subprocess.run(
            [*command, "run", "--conf", str(_peer_conf(peer, again, bank_key, broker.bootstrap_servers)),
             "--ticket", str(good)], cwd=peer, capture_output=True, text=True, env=env, timeout=120)
        assert rerun.returncode == 2 and "allows 1 run and has had 1" in rerun.stderr, rerun.stderr[-3000:]
        assert not (issuer / "jobs" / again).exists()
    finally:
        daemon.terminate()
        daemon.wait(30)
    agent_log = (issuer / "agent.log").read_text()
    assert f"refused job {expired_job} from shop (expired)" in agent_log
    assert f"refused job {again} from shop (over-run-count)" in agent_log
    listing = tickets.listing(agent.store())
    assert f"job {good_job}  done" in listing and f"job {expired_job}  refused  (expired" in listing


def test_job_that_gets_a_slot_only_after_its_requester_stopped_waiting_is_refused(tmp_path):
    conf, _, _ = write_issuer(tmp_path)
    agent = agent_module.Agent(agent_module.load_agent(conf))
    identity = agent_module.load_identity(tmp_path / "keys" / "bank.key")
    ticket = tickets.issue(identity, "bank", "shop", agent.config.party.peers["shop"], ["channel_demo"],
                           {"breast": schema_hash(COLUMNS)}, time.time() + 60, 1)
    agent.store.add(ticket)
    late = Request(ticket, "job-late", "channel_demo", "breast", requested_at=time.time() - 2, wait_s=6)
    with pytest.raises(TicketRefused) as caught:
        agent._admit(late, "shop", ticket.peer_key)
    assert caught.value.reason == "stale" and agent.store.runs(ticket.id) == 0
    assert not (tmp_path / "jobs" / "job-late").exists()
