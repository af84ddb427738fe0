"""metrics.json counts the records each channel refused, also when the algorithm fails."""

from __future__ import annotations

import json
import sys
import threading
import types

import pytest

from attacks import produce
from fedps.engine import config as config_module
from fedps.engine.runner import run_party


def _probe(context) -> None:
    """host: junk into its topic, then "go"; guest: x after "go", so the junk comes first; host fails."""
    (peer,) = context.channels
    channel = context.channels[peer]
    scope = context.scope("probe")
    if context.role == "guest":
        channel.recv(scope.tag("go"), timeout=30)
        channel.send(scope.tag("x"), 1)
        channel.recv(scope.tag("ack"), timeout=30)
        channel.send(scope.tag("done"), 1, wait=True)   # before the host fails and says so
        return
    servers = context.config.kafka.bootstrap_servers
    produce(servers, channel.in_topic, b"junk" * 100)
    channel.send(scope.tag("go"), 1)
    assert channel.recv(scope.tag("x"), timeout=30) == 1
    channel.send(scope.tag("ack"), 1, wait=True)
    assert channel.recv(scope.tag("done"), timeout=30) == 1
    raise RuntimeError("the algorithm failed after the junk")


def test_metrics_count_refused_records_per_peer_even_when_the_job_fails(
        monkeypatch, make_parties, job_id, tmp_path, kafka_config):
    monkeypatch.setitem(sys.modules, "fedps.algorithms.hostile_probe",
                        types.SimpleNamespace(run=_probe))
    channels = make_parties("guest", "host")
    configs = {
        name: config_module.from_mapping({
            "job": {"id": job_id, "algorithm": "hostile_probe"},
            "party": {"name": name, "role": name, "identity_key": channels[name].identity_key,
                      "state_dir": str(tmp_path / name / "state"), "output_dir": str(tmp_path / name)},
            "peers": dict(channels[name].peers),
            "kafka": {"bootstrap_servers": kafka_config.bootstrap_servers},
        })
        for name in ("guest", "host")
    }
    guest = threading.Thread(target=run_party, args=(configs["guest"],))
    guest.start()
    with pytest.raises(RuntimeError, match="failed after the junk"):
        run_party(configs["host"])
    guest.join(60)
    host_metrics = json.loads((tmp_path / "host" / "metrics.json").read_text())
    guest_metrics = json.loads((tmp_path / "guest" / "metrics.json").read_text())
    assert host_metrics["refused_records"] == {"guest": {"not-a-frame": 1}}
    assert host_metrics["error"] == "RuntimeError: the algorithm failed after the junk"
    assert guest_metrics["refused_records"] == {"host": {}} and "error" not in guest_metrics
