"""SecureBoost on the executor runtime, parties as threads of one process.

Real parts: the session's local Spark (barrier stages per tree), local Ray
(each party's accumulator), the embedded broker (driver channels and
per-partition links), and the real Paillier crypto at 512 bits. The trees
must equal the plaintext reference on the joined rows, split for split.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from fedps.algorithms.secureboost import reference
from fedps.algorithms.secureboost.local import run_in_threads
from fedps.algorithms.secureboost.params import SBParams
from fedps.engine.layout import build_layout, read_partition

DATA = Path(__file__).parents[2] / "data"
PARTITIONS = 4


def lay_out(spark, tmp: Path, files: dict[str, Path], labels: str = "binary") -> dict:
    return {name: build_layout(spark, str(path), folder=str(tmp / "layout" / name), partitions=PARTITIONS,
                               id_column="id", label_column="y" if name == "guest" else None,
                               labels=labels, missing_ok=True)
            for name, path in files.items()}


def joined(layouts: dict) -> tuple[dict[str, np.ndarray], np.ndarray, np.ndarray]:
    parts = {name: [read_partition(layout, p) for p in range(PARTITIONS)] for name, layout in layouts.items()}
    x = {name: np.vstack([r.x for r in rows]) for name, rows in parts.items()}
    y = np.concatenate([r.y for r in parts["guest"]])
    keys = np.concatenate([r.row_keys for r in parts["guest"]])
    return x, y, keys


def assert_same_trees(results: dict, model: reference.ReferenceModel, names: list[str]) -> None:
    guest = results["guest"].model
    assert len(guest["trees"]) == len(model.trees)
    for ours, theirs in zip(guest["trees"], model.trees):
        assert ours["class"] == theirs["class"]
        expected = {str(n): spec for n, spec in theirs["nodes"].items()}
        assert set(ours["nodes"]) == set(expected)
        for n, spec in ours["nodes"].items():
            if "leaf" in spec:
                assert spec["leaf"] == expected[n]["leaf"]
            else:
                assert (spec["party"], spec["split"]) == (expected[n]["party"], expected[n]["split"])
                assert spec["gain"] == expected[n]["gain"]
    for name in names:
        assert results[name].model["splits"] == model.tables[name].to_json()


@pytest.mark.timeout(600)   # training, two broker reads and a joint prediction: minutes on a loaded machine
def test_federated_trees_equal_the_reference(tmp_path, spark, ray_address, make_parties, job_id):
    files = {"guest": DATA / "breast_hetero_guest.csv", "host": DATA / "breast_hetero_host.csv"}
    layouts = lay_out(spark, tmp_path, files)
    params = SBParams(trees=2, max_depth=3, max_bin=16, key_bits=512, partitions=PARTITIONS, tasks=1,
                      validation_fraction=0.2, colsample_bytree=0.8, subsample=0.9)
    configs = make_parties("guest", "host", recv_timeout_s=120)
    channels: dict = {}
    results = run_in_threads(job_id, configs, layouts, {"guest": params, "host": params}, tmp_path / "out", spark,
                             channels_out=channels)
    errors = {n: r.error for n, r in results.items() if r.error is not None}
    assert not errors, errors
    check_what_crossed(results, channels, configs["guest"].kafka.bootstrap_servers)
    x, y, keys = joined(layouts)
    bins = {name: results[name].trainer.plan.bins for name in layouts}
    model = reference.train({name: (bins[name], x[name]) for name in layouts}, y, keys, params)
    assert_same_trees(results, model, ["guest", "host"])
    assert any(spec.get("party") == "host" for tree in model.trees for spec in tree["nodes"].values())
    final = results["guest"].state.metrics[-1]
    assert final["valid_auc"] > 0.9
    # the trained model scores aligned rows jointly (mode = "predict"): the reference's margins
    predictions = predict_in_threads(results, configs, files, params, tmp_path / "predict", spark)
    expected = reference.predict(model, x, 0.0, 1)[:, 0]
    order = np.argsort(predictions["row_key"].to_numpy())
    np.testing.assert_allclose(predictions["score"].to_numpy()[order], expected[np.argsort(keys)], rtol=0, atol=1e-12)


def predict_in_threads(results: dict, configs: dict, files: dict, params: SBParams, folder: Path, spark):
    """Both parties' side of a joint prediction on ``files`` with the models just trained."""
    import dataclasses
    import json
    import threading
    import uuid
    from types import SimpleNamespace

    from fedps.algorithms.secureboost.predict import predict
    from fedps.messaging.channel import Channel

    job, errors = f"p{uuid.uuid4().hex[:12]}", {}

    def party(name: str) -> None:
        model = folder / name / "model.json"
        model.parent.mkdir(parents=True, exist_ok=True)
        model.write_text(json.dumps(results[name].model))
        peer = "host" if name == "guest" else "guest"
        channel = Channel(job, name, peer, configs[name]).open()
        context = SimpleNamespace(me=name, channels={peer: channel}, spark=spark, output_dir=folder / name,
                                  ray_address=None,
                                  config=SimpleNamespace(job=SimpleNamespace(id=job), source="<memory>",
                                                         ray=SimpleNamespace(namespace="fedps")))
        mine = dataclasses.replace(params, mode="predict", model=str(model), train=str(files[name]))
        try:
            predict(context, mine, "guest", ["host"])
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors[name] = exc
        finally:
            channel.close()

    threads = [threading.Thread(target=party, args=(n,), daemon=True) for n in ("guest", "host")]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(600)
    assert not errors, errors
    return pd.read_parquet(folder / "guest" / "predictions")


def received(servers: str, topic: str, key: bytes, partitions: int) -> list:
    """Every value sealed on ``topic`` (all partitions), unsealed with the receiver's key and decoded."""
    from attacks import records

    from fedps.messaging import codec, wire
    from fedps.messaging.tags import Tag

    values = []
    for p in range(partitions):
        pieces: dict = {}
        for record in records(servers, topic, p):
            frame = wire.parse(record)
            if frame.kind != wire.KIND_DATA:
                continue
            pieces.setdefault(frame.message_id, []).append(wire.open_sealed(key, frame))
            if len(pieces[frame.message_id]) == frame.chunks:
                tag = Tag.decode(frame.tag)
                if tag.phase == "tree":   # the setup messages (layout digests, keys, settings) are public
                    values.append((tag, codec.decode(b"".join(pieces.pop(frame.message_id)))))
    return values


def _payload(value) -> bytes:
    from fedps.messaging.codec import Blob

    if isinstance(value, Blob):
        return value.data
    if isinstance(value, np.ndarray):
        return value.tobytes()
    import json

    return json.dumps(value).encode()


def check_what_crossed(results: dict, channels: dict, servers: str) -> None:
    """No raw host threshold reached the guest; the host got ciphertexts, bits and split ids only."""
    from fedps.messaging.codec import Blob

    seen = {}
    for me, peer in (("guest", "host"), ("host", "guest")):
        channel = channels[me][peer]
        link = results[me].trainer.job.stage_spec.links[peer]
        seen[me] = (received(servers, channel.in_topic, bytes.fromhex(channel._state.recv_key), 1)
                    + received(servers, link.in_topic, link.recv_key, PARTITIONS))
    guest_bytes = b"".join(_payload(v) for _, v in seen["guest"])
    host_bins = results["host"].trainer.plan.bins
    thresholds = [float(c) for cuts in host_bins.cuts for c in cuts]
    assert len(guest_bytes) > 10000 and thresholds
    for value in thresholds:
        assert np.float64(value).tobytes() not in guest_bytes and repr(value).encode() not in guest_bytes
    names = {tag.name.split("_p")[0] for tag, _ in seen["host"]}
    assert names == {"row_gh", "route", "splits", "next_tree"}, names
    for tag, value in seen["host"]:
        if isinstance(value, Blob):
            assert value.kind.startswith("sb.") or value.kind.startswith("paillier"), value.kind
        elif isinstance(value, np.ndarray):
            assert value.dtype == np.uint8, (tag, value.dtype)     # packed direction bits
        else:
            assert not any(isinstance(v, float) for v in _leaves(value)), (tag, value)
    # the first tree's (g, h) are (+-0.5, 0.25) exactly: neither as floats nor as packed plaintexts
    from fedps.algorithms.secureboost.tasks import packer_for

    host_bytes = b"".join(_payload(v) for _, v in seen["host"])
    packer = packer_for(results["guest"].trainer.plan)
    plains = packer.encode(np.array([0.5, -0.5]), np.array([0.25, 0.25]))
    patterns = [np.float64(0.5).tobytes(), np.float64(-0.5).tobytes()]
    patterns += [v.to_bytes((v.bit_length() + 7) // 8, "big") for v in plains]
    for pattern in patterns:
        assert pattern not in host_bytes


def _leaves(value):
    if isinstance(value, dict):
        for v in value.values():
            yield from _leaves(v)
    elif isinstance(value, list):
        for v in value:
            yield from _leaves(v)
    else:
        yield value


@pytest.mark.parametrize("data, settings", [
    ("vehicle_scale", {"objective": "multi:softmax", "num_class": 4, "trees": 1, "max_depth": 2}),
    ("student", {"objective": "reg:squarederror", "trees": 2, "max_depth": 2})])
def test_multi_class_and_regression_equal_the_reference(tmp_path, spark, ray_address, make_parties, data, settings):
    import uuid

    files = {"guest": DATA / f"{data}_hetero_guest.csv", "host": DATA / f"{data}_hetero_host.csv"}
    layouts = lay_out(spark, tmp_path, files, labels="number")
    params = SBParams(max_bin=8, key_bits=512, partitions=PARTITIONS, tasks=1, validation_fraction=0.2, **settings)
    configs = make_parties("guest", "host", recv_timeout_s=120)
    results = run_in_threads(f"t{uuid.uuid4().hex[:12]}", configs, layouts, {"guest": params, "host": params},
                             tmp_path / "out", spark)
    errors = {n: r.error for n, r in results.items() if r.error is not None}
    assert not errors, errors
    x, y, keys = joined(layouts)
    bins = {name: results[name].trainer.plan.bins for name in layouts}
    model = reference.train({name: (bins[name], x[name]) for name in layouts}, y, keys, params)
    assert_same_trees(results, model, ["guest", "host"])
    assert len(results["guest"].model["trees"]) == params.trees * params.classes
    final = results["guest"].state.metrics[-1]
    if params.classes > 1:   # one tree per class and round, from (g, h) of all classes packed per row
        assert {t["class"] for t in results["guest"].model["trees"]} == {0, 1, 2, 3}
        assert final["valid_accuracy"] > 0.4
    else:
        assert final["valid_rmse"] < np.std(y)


@pytest.mark.parametrize("case", ["constant", "all missing", "one class", "more bins than rows"])
def test_data_that_cannot_train_stops_both_parties_at_setup(tmp_path, spark, ray_address, make_parties, job_id,
                                                            case):
    guest = pd.read_csv(DATA / "breast_hetero_guest.csv")
    host = pd.read_csv(DATA / "breast_hetero_host.csv")
    max_bin, at_fault = 16, "host"
    if case == "constant":
        host["x3"], expected = 7.0, "feature 'x3' of host is constant (7) in every row"
    elif case == "all missing":
        host["x3"], expected = np.nan, "feature 'x3' of host is missing in every row"
    elif case == "one class":
        guest["y"], expected, at_fault = 1, "the label column holds one class only", "guest"
    else:
        guest, host = guest.head(20), host[host["id"].isin(guest.head(20)["id"])]
        max_bin, expected = 32, "max_bin = 32 is more bins than the 20 training rows"
    guest.to_csv(tmp_path / "guest.csv", index=False)
    host.to_csv(tmp_path / "host.csv", index=False)
    files = {"guest": tmp_path / "guest.csv", "host": tmp_path / "host.csv"}
    layouts = lay_out(spark, tmp_path, files)
    params = SBParams(trees=1, max_bin=max_bin, key_bits=512, partitions=PARTITIONS, tasks=1)
    configs = make_parties("guest", "host", recv_timeout_s=60)
    results = run_in_threads(job_id, configs, layouts, {"guest": params, "host": params}, tmp_path / "out", spark)
    assert expected in str(results[at_fault].error), results[at_fault].error
    other = "guest" if at_fault == "host" else "host"
    if case == "more bins than rows":   # both parties have 20 rows: each names its own problem
        assert expected in str(results[other].error)
    else:
        other_error = str(results[other].error)
        assert f"{at_fault} stopped the job before training" in other_error and "x3" not in other_error


@pytest.mark.timeout(600)   # four trees: minutes when the shared machine is loaded
def test_early_stopping_stops_both_parties_at_the_same_tree(tmp_path, spark, ray_address, make_parties, job_id):
    import dataclasses

    files = {"guest": DATA / "breast_hetero_guest.csv", "host": DATA / "breast_hetero_host.csv"}
    layouts = lay_out(spark, tmp_path, files)
    # validation loss on this split: 0.288, 0.188, 0.179 (best), 0.211 -> stop after round 4, keep 3
    params = SBParams(trees=8, max_depth=2, max_bin=16, key_bits=512, partitions=PARTITIONS, tasks=1,
                      learning_rate=1.0, reg_lambda=0.1, validation_fraction=0.3, early_stopping_rounds=1)
    configs = make_parties("guest", "host", recv_timeout_s=120)
    results = run_in_threads(job_id, configs, layouts, {"guest": params, "host": params}, tmp_path / "out", spark)
    errors = {n: r.error for n, r in results.items() if r.error is not None}
    assert not errors, errors
    guest, host = results["guest"].state, results["host"].state
    assert (guest.tree, guest.done, guest.keep) == (host.tree, host.done, host.keep) == (4, True, 3)
    assert len(guest.metrics) == 4 and guest.best == 2
    assert len(results["guest"].model["trees"]) == 3
    x, y, keys = joined(layouts)
    bins = {name: results[name].trainer.plan.bins for name in layouts}
    model = reference.train({name: (bins[name], x[name]) for name in layouts}, y, keys,
                            dataclasses.replace(params, trees=3))
    assert_same_trees(results, model, ["guest", "host"])     # the host dropped the splits of round 4
    assert all(int(sid.split(".")[0]) < 3 for sid in results["host"].model["splits"])


@pytest.mark.timeout(600)
def test_goss_trees_equal_the_reference(tmp_path, spark, ray_address, make_parties, job_id):
    import dataclasses

    files = {"guest": DATA / "breast_hetero_guest.csv", "host": DATA / "breast_hetero_host.csv"}
    layouts = lay_out(spark, tmp_path, files)
    params = SBParams(trees=3, max_depth=2, max_bin=16, key_bits=512, partitions=PARTITIONS, tasks=1,
                      validation_fraction=0.2, goss_top_rate=0.2, goss_other_rate=0.3)
    configs = make_parties("guest", "host", recv_timeout_s=120)
    results = run_in_threads(job_id, configs, layouts, {"guest": params, "host": params}, tmp_path / "out", spark)
    errors = {n: r.error for n, r in results.items() if r.error is not None}
    assert not errors, errors
    x, y, keys = joined(layouts)
    bins = {name: results[name].trainer.plan.bins for name in layouts}
    parties = {name: (bins[name], x[name]) for name in layouts}
    model = reference.train(parties, y, keys, params)
    assert_same_trees(results, model, ["guest", "host"])
    plain = reference.train(parties, y, keys, dataclasses.replace(params, goss_top_rate=0.0, goss_other_rate=0.0))
    assert plain.trees[1:] != model.trees[1:]        # from the second tree on, GOSS grows other trees
    assert results["guest"].state.metrics[-1]["valid_auc"] > 0.9


@pytest.mark.timeout(600)
def test_categorical_columns_split_one_against_the_rest_as_the_reference(tmp_path, spark, ray_address,
                                                                         make_parties, job_id):
    import dataclasses

    host = pd.read_csv(DATA / "breast_hetero_host.csv")
    codes = np.array([17.0, 42.0, 23.0, 57.0, 31.0])    # five categories from x0's quintiles, unordered codes
    host["x0"] = codes[pd.qcut(host["x0"], 5, labels=False)]
    host.loc[host.index % 13 == 0, "x0"] = np.nan
    guest = pd.read_csv(DATA / "breast_hetero_guest.csv")
    guest = guest[["id", "y", "x0", "x1"]]                # a weak guest: the host's features must win splits
    host.to_csv(tmp_path / "host.csv", index=False)
    guest.to_csv(tmp_path / "guest.csv", index=False)
    files = {"guest": tmp_path / "guest.csv", "host": tmp_path / "host.csv"}
    layouts = lay_out(spark, tmp_path, files)
    params = SBParams(trees=2, max_depth=3, max_bin=16, key_bits=512, partitions=PARTITIONS, tasks=1,
                      validation_fraction=0.2)
    mine = {"guest": params, "host": dataclasses.replace(params, categorical=("x0",))}
    configs = make_parties("guest", "host", recv_timeout_s=120)
    channels: dict = {}
    results = run_in_threads(job_id, configs, layouts, mine, tmp_path / "out", spark, channels_out=channels)
    errors = {n: r.error for n, r in results.items() if r.error is not None}
    assert not errors, errors
    check_what_crossed(results, channels, configs["guest"].kafka.bootstrap_servers)   # no category code either
    bins = {name: results[name].trainer.plan.bins for name in layouts}
    assert bins["host"].categorical[0] and bins["host"].cuts[0].tolist() == sorted(codes)
    x, y, keys = joined(layouts)
    model = reference.train({name: (bins[name], x[name]) for name in layouts}, y, keys, params)
    assert_same_trees(results, model, ["guest", "host"])
    chosen = [s for s in results["host"].model["splits"].values() if s.get("categorical")]
    assert chosen and all(s["category"] in codes and s["threshold"] is None for s in chosen)
