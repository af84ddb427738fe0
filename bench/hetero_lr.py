"""Vertical LR: seconds per epoch of fedps against a value-by-value `phe` implementation.

    .venv/bin/python bench/hetero_lr.py [--data default_credit] [--bits 2048] [--batch 1024] [--baseline-batches 2]

fedps runs as two `fedps run` processes through the embedded broker (one
epoch, then validation AUC). The baseline (bench/phe_lr_baseline.py) runs
``--baseline-batches`` of the same epoch's batches in one process; its epoch
time is that per-batch time times the number of batches (every batch costs
the same), and its weights after those batches are checked against the exact
plaintext maths. ``--baseline-batches 0`` runs the whole baseline epoch.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from fedps.algorithms.hetero_lr.params import LRParams  # noqa: E402
from fedps.engine.vertical.plan import validation_rows  # noqa: E402
from fedps.messaging.broker import EmbeddedBroker  # noqa: E402
from fedps.messaging.identity import generate_identity  # noqa: E402

SHARED = Path("/work/shared/data")


def data_files(name: str) -> dict[str, Path]:
    local = ROOT / "data"
    pick = lambda f: local / f if (local / f).exists() else SHARED / f  # noqa: E731
    return {"guest": pick(f"{name}_hetero_guest.csv"), "host": pick(f"{name}_hetero_host.csv")}


def load(files: dict[str, Path]):
    """Guest features, labels, host features (rows aligned by id) and the rows' 63-bit keys."""
    import pandas as pd

    from fedps.engine.layout import id_digest

    guest = pd.read_csv(files["guest"])
    host = pd.read_csv(files["host"]).set_index("id").loc[guest["id"]]
    keys = np.array([int.from_bytes(id_digest(str(i))[:8], "big") >> 1 for i in guest["id"]], dtype=np.int64)
    return (guest.drop(columns=["id", "y"]).to_numpy(dtype=float), guest["y"].to_numpy(dtype=float),
            host.to_numpy(dtype=float), keys)


def run_fedps(files: dict[str, Path], settings: dict, folder: Path) -> dict:
    keys = {n: generate_identity(folder / f"{n}.key") for n in files}
    with EmbeddedBroker() as broker:
        procs = {}
        for name, path in files.items():
            other = next(p for p in files if p != name)
            params = ", ".join(f"{k} = {json.dumps(v)}" for k, v in {"train": str(path), **settings}.items())
            conf = folder / f"{name}.toml"
            conf.write_text(f"""[job]\nid = "bench{int(time.time())}"\nalgorithm = "hetero_lr"\nparams = {{ {params} }}
[party]\nname = "{name}"\nrole = "{'guest' if name == 'guest' else 'host'}"\nidentity_key = "{name}.key"
output_dir = "out/{name}"\n[peers]\n{other} = "{keys[other]}"\n[kafka]\nbootstrap_servers = "{broker.bootstrap_servers}"
[channel]\nrecv_timeout_s = 3600\n[ray]\nobject_store_mb = 100\nnum_cpus = 1\n""")
            procs[name] = subprocess.Popen([sys.executable, "-m", "fedps.engine.cli", "run", "--conf", str(conf)],
                                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        out = {}
        for name, proc in procs.items():
            stdout, stderr = proc.communicate()
            if proc.returncode:
                raise SystemExit(f"{name} failed:\n{stderr[-3000:]}")
            out[name] = json.loads(stdout.strip().splitlines()[-1])
    return out["guest"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="default_credit")
    parser.add_argument("--bits", type=int, default=2048)
    parser.add_argument("--batch", type=int, default=1024)
    parser.add_argument("--learning-rate", type=float, default=0.15)
    parser.add_argument("--baseline-batches", type=int, default=2)
    parser.add_argument("--partitions", type=int, default=4)
    args = parser.parse_args()

    files = data_files(args.data)
    gx, gy, hx, keys = load(files)
    params = LRParams(epochs=1, batch_size=args.batch, key_bits=args.bits, learning_rate=args.learning_rate)
    rows = np.flatnonzero(~validation_rows(keys, params.validation_fraction, params.seed))
    # the baseline's own batches: as many, of the same sizes, as fedps's epoch has
    order = rows[np.random.default_rng([params.seed, 0]).permutation(len(rows))]
    plan = np.array_split(order, max(1, len(order) // args.batch))

    settings = {"epochs": 1, "batch_size": args.batch, "key_bits": args.bits, "learning_rate": args.learning_rate,
                "partitions": args.partitions}
    with tempfile.TemporaryDirectory() as folder:
        fedps = run_fedps(files, settings, Path(folder))

    import phe_lr_baseline

    limit = args.baseline_batches or None
    (wg, bg, wh), times = phe_lr_baseline.run(gx, hx, gy, plan, args.bits, args.learning_rate, limit)
    # the exact plaintext maths over the same batches
    ref_g, ref_b, ref_h = np.zeros(gx.shape[1]), 0.0, np.zeros(hx.shape[1])
    for batch_rows in plan[: len(times)]:
        u = gx[batch_rows] @ ref_g + ref_b + hx[batch_rows] @ ref_h
        d = 0.25 * u + 0.5 - gy[batch_rows]
        ref_g = ref_g - args.learning_rate * gx[batch_rows].T @ d / len(batch_rows)
        ref_h = ref_h - args.learning_rate * hx[batch_rows].T @ d / len(batch_rows)
        ref_b -= args.learning_rate * float(np.mean(d))
    baseline_epoch = float(np.mean(times)) * len(plan)
    report = {
        "data": args.data, "key_bits": args.bits, "train_rows": int(len(rows)), "batch_size": args.batch,
        "batches_per_epoch": len(plan),
        "fedps_epoch_seconds": fedps["train_seconds"],
        "fedps_validation_auc_after_1_epoch": round(fedps["final"]["auc"], 4),
        "fedps_guest_seconds_by_work": fedps.get("seconds_by_work"),
        "fedps_guest_task_seconds_by_work": fedps.get("task_seconds_by_work"),
        "phe_seconds_per_batch": [round(t, 1) for t in times],
        "phe_epoch_seconds": round(baseline_epoch, 1),
        "phe_epoch_extrapolated": limit is not None,
        "speedup": round(baseline_epoch / fedps["train_seconds"], 1),
        "phe_max_weight_error_vs_exact": float(max(np.max(np.abs(wg - ref_g)), np.max(np.abs(wh - ref_h)),
                                                   abs(bg - ref_b))),
    }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
