"""Two parties configured for different jobs both stop, before any data work, with one sentence.

A real two-process run (`fedps run` per party, through the embedded broker): the
guest trains for 5 epochs, the host for 3, and the host's PSI uses another bucket
count. Both exit with code 2, print the same sentence naming both differences, and
neither ran a PSI; `fedps jobs` shows the job as failed on both.
"""

from __future__ import annotations

import json

import pytest

from fedps.engine import jobs
from processes import start, stopped
from test_first_hour import DATA, write_job


@pytest.mark.timeout(400)
def test_different_settings_stop_both_parties_with_the_same_sentence(tmp_path, broker, job_id):
    inputs = {"guest": DATA / "breast_hetero_guest.csv", "host": DATA / "breast_hetero_host.csv"}
    confs = write_job(tmp_path, job_id, broker.bootstrap_servers, inputs)
    confs["guest"].write_text(confs["guest"].read_text().replace('id_column = "id",', 'id_column = "id", epochs = 5,'))
    confs["host"].write_text(confs["host"].read_text().replace('id_column = "id",', 'id_column = "id", epochs = 3,')
                             .replace("buckets = 2", "buckets = 3"))
    sentences = {}
    for name, stderr in stopped({name: start(conf) for name, conf in confs.items()}, timeout=360).items():
        (line,) = [ln for ln in stderr.splitlines() if "the parties configured different jobs" in ln]
        sentences[name] = line[line.index("the parties"):]
    assert sentences["guest"] == sentences["host"]
    assert "job.params.epochs: guest has 5, host has 3" in sentences["guest"]
    assert "job.params.psi.buckets: guest has 2, host has 3" in sentences["guest"]
    for name in confs:
        metrics = json.loads((tmp_path / "out" / name / "metrics.json").read_text())
        assert not [key for key in metrics if key.startswith("psi")], metrics   # no PSI ran
        entry = jobs.read(name, job_id)
        assert entry.state == "failed" and "configured different jobs" in entry.error
