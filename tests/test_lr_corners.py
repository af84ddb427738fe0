"""Vertical LR at every legal corner at once runs to a complete report.

No validation rows, one epoch, one batch, one host feature: both parties
train through real channels (embedded broker), Spark tasks and PS on Ray,
as threads of this process, and each writes its report as ``fedps run``
does (``_write_report``): model.json, metrics.json figures, loss.png.
"""

from __future__ import annotations

import json
import threading
from pathlib import Path
from types import SimpleNamespace

import pandas as pd
import pytest

from fedps.algorithms.hetero_lr import _write_report, make_trainer, open_job
from fedps.algorithms.hetero_lr.params import LRParams
from fedps.engine.config import PSSettings
from fedps.engine.layout import build_layout
from fedps.engine.vertical.checkpoint import JobRecords
from fedps.messaging.channel import Channel

DATA = Path(__file__).resolve().parents[1] / "data"


def train_and_report(job: str, configs: dict, layouts: dict, params: LRParams, folder: Path, spark) -> dict:
    errors: dict[str, BaseException] = {}

    def party(name: str) -> None:
        channels = {peer: Channel(job, name, peer, configs[name]) for peer in layouts if peer != name}
        try:
            for channel in channels.values():
                channel.open()
            context = SimpleNamespace(
                me=name, channels=channels, spark=spark, output_dir=folder / name, metrics={},
                config=SimpleNamespace(job=SimpleNamespace(id=job), ps=PSSettings(),
                                       ray=SimpleNamespace(namespace="fedps")))
            context.output_dir.mkdir(parents=True)
            records = JobRecords(folder / name / "checkpoint", job)
            vertical = open_job(context, params, layouts[name], records, "guest", ["host"])
            try:
                trainer = make_trainer(vertical, params)
                trainer.run()
                _write_report(context, trainer, 1.0)
                (folder / name / "metrics.json").write_text(json.dumps(context.metrics))
            finally:
                vertical.stop()
        except BaseException as exc:  # noqa: BLE001 - handed to the test
            errors[name] = exc
        finally:
            for channel in channels.values():
                channel.close()

    threads = [threading.Thread(target=party, args=(name,), daemon=True) for name in layouts]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(600)
    return errors


@pytest.mark.timeout(900)   # parties as threads; slow only on a crowded machine
def test_no_validation_one_epoch_one_batch_one_host_feature_gives_a_full_report(
        tmp_path, spark, ray_address, make_parties, job_id):
    guest = pd.read_csv(DATA / "breast_hetero_guest.csv").iloc[:80]
    host = pd.read_csv(DATA / "breast_hetero_host.csv")[["id", "x0"]]
    guest.to_csv(tmp_path / "guest.csv", index=False)
    host.to_csv(tmp_path / "host.csv", index=False)
    files = {"guest": tmp_path / "guest.csv", "host": tmp_path / "host.csv"}
    # the host's rows outside the guest's 80 ids would not align: keep the same ids (as a PSI would)
    host[host["id"].isin(guest["id"])].to_csv(files["host"], index=False)
    layouts = {name: build_layout(spark, str(path), folder=str(tmp_path / "layout" / name), partitions=2,
                                  id_column="id", label_column="y" if name == "guest" else None)
               for name, path in files.items()}
    params = LRParams(epochs=1, batch_size=80, validation_fraction=0.0, key_bits=512, partitions=2, tasks=1,
                      min_batch_ratio=1.0)
    errors = train_and_report(job_id, make_parties("guest", "host", recv_timeout_s=120), layouts, params,
                              tmp_path / "out", spark)
    assert not errors, errors
    guest_metrics = json.loads((tmp_path / "out" / "guest" / "metrics.json").read_text())
    assert guest_metrics["epochs"] == 1 and guest_metrics["steps"] == 1
    assert len(guest_metrics["loss"]) == 1 and guest_metrics["validation"] == [] and guest_metrics["final"] == {}
    assert (tmp_path / "out" / "guest" / "loss.png").exists()
    host_model = json.loads((tmp_path / "out" / "host" / "model.json").read_text())
    assert host_model["features"] == ["x0"] and len(host_model["weights"]) == 1
    assert json.loads((tmp_path / "out" / "guest" / "model.json").read_text())["intercept"] is not None
