"""The checks of a party's whole job before any work: settings (nested tables), inputs in one pass.

Real parts: the session's local Spark reads small CSV, LibSVM and tag:value
files written by each test; settings go through the real config loader.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from fedps.algorithms.hetero_lr import preflight as lr_preflight, split_settings
from fedps.engine import config as config_module
from fedps.engine.preflight import InputCheck, LabelRule, public_reason, run_checks
from fedps.errors import ConfigError, DataError

LR = LabelRule.binary("vertical logistic regression")


def frame(rows: int = 12, **columns) -> pd.DataFrame:
    data = {"id": list(range(rows)), "y": [i % 2 for i in range(rows)],
            "x0": [0.5 * i for i in range(rows)], "x1": [1.0 - 0.1 * i for i in range(rows)]}
    data.update(columns)
    return pd.DataFrame(data)


def check_of(path: Path, **settings) -> InputCheck:
    return InputCheck("the training data", str(path), "job.params.train", label_column="y", label=LR, **settings)


def problems(spark, tmp_path: Path, table: pd.DataFrame, **settings) -> str:
    path = tmp_path / "data.csv"
    table.to_csv(path, index=False)
    with pytest.raises(DataError) as error:
        run_checks(spark, [check_of(path, **settings)])
    return str(error.value)


def test_clean_input_passes_with_its_row_count(spark, tmp_path):
    path = tmp_path / "data.csv"
    frame().to_csv(path, index=False)
    assert run_checks(spark, [check_of(path)]) == {"job.params.train": {"rows": 12, "features": 2}}


def test_count_label_is_not_binary_and_says_what_it_found(spark, tmp_path):
    message = problems(spark, tmp_path, frame(y=[i % 10 for i in range(12)]))
    assert "counts 0–9" in message and "this is not a binary label" in message
    assert "job.params.label_column" in message


def test_every_data_problem_is_reported_at_once(spark, tmp_path):
    table = frame(x0=[float("nan")] + [1.0 * i for i in range(11)], x1=["a"] * 12, x2=[3.0] * 12)
    message = problems(spark, tmp_path, table)
    assert "3 problems" in message
    assert "'x0'" in message and "missing or non-finite" in message
    assert "'x1'" in message and "not numeric" in message and "'a'" in message
    assert "'x2'" in message and "constant" in message
    tolerant = problems(spark, tmp_path, table, missing_ok=True)   # e.g. SecureBoost: NaN is a branch
    assert "2 problems" in tolerant and "missing or non-finite" not in tolerant


def test_missing_id_and_label_columns_are_named_with_a_suggestion(spark, tmp_path):
    table = frame().rename(columns={"id": "sid", "y": "label"})
    message = problems(spark, tmp_path, table)
    assert "id column 'id' (job.params.id_column)" in message and "did you mean 'sid'?" in message
    assert "label column 'y' (job.params.label_column)" in message


def test_missing_input_path_is_named_with_its_setting(spark, tmp_path):
    with pytest.raises(DataError) as error:
        run_checks(spark, [check_of(tmp_path / "nowhere.csv")])
    assert "job.params.train" in str(error.value) and "does not exist" in str(error.value)
    assert "nowhere" not in public_reason(error.value)   # the peer learns which setting, not the path


def test_sparse_tag_value_and_libsvm_inputs_are_read_and_their_labels_checked(spark, tmp_path):
    tags = tmp_path / "guest.tag"
    tags.write_text("id,y,features\n1,1,a:0.5;b:1\n2,0,a:1.5\n3,3,c:2;a:0\n")
    with pytest.raises(DataError, match="values 0–3|counts 0–3"):
        run_checks(spark, [check_of(tags, format="tag_value")])
    svm = tmp_path / "guest.libsvm"
    svm.write_text("1 1 0:0.5 3:1\n2 0 1:1.5\n")
    assert run_checks(spark, [check_of(svm)])["job.params.train"]["rows"] == 2


def lr_config(tmp_path: Path, params: str, role: str = "guest") -> config_module.FedpsConfig:
    path = tmp_path / f"{role}.toml"
    path.write_text(f'[job]\nid = "j1"\nalgorithm = "hetero_lr"\nparams = {params}\n'
                    f'[party]\nname = "{role}"\nrole = "{role}"\n[peers]\nother = "x"\n')
    return config_module.load(path)


def test_misspelled_nested_key_is_named_with_the_file_and_a_suggestion(tmp_path):
    config = lr_config(tmp_path, '{ psi = { input = "a.csv", id_colum = "sid" } }')
    with pytest.raises(ConfigError) as error:
        lr_preflight(config, tmp_path / "out")
    message = str(error.value)
    assert "job.params.psi.id_colum" in message and "did you mean job.params.psi.id_column?" in message
    assert str(tmp_path / "guest.toml") in message


def test_misspelled_training_key_is_named_with_a_suggestion(tmp_path):
    config = lr_config(tmp_path, '{ train = "a.csv", learning_rat = 0.1 }')
    with pytest.raises(ConfigError, match=r"job.params.learning_rat \(did you mean job.params.learning_rate\?\)"):
        lr_preflight(config, tmp_path / "out")


def test_id_column_is_given_once_for_psi_and_training():
    training, psi = split_settings({"id_column": "sid", "psi": {"input": "a.csv"}})
    assert training["id_column"] == psi["id_column"] == "sid"
    training, psi = split_settings({"psi": {"input": "a.csv", "id_column": "sid"}})
    assert training["id_column"] == "sid"
    with pytest.raises(ConfigError, match="give it once"):
        split_settings({"id_column": "a", "psi": {"input": "a.csv", "id_column": "b"}})


def test_guest_checks_the_psi_input_for_training_with_its_label(tmp_path):
    config = lr_config(tmp_path, '{ id_column = "sid", psi = { input = "a.csv" } }')
    (check,) = lr_preflight(config, tmp_path / "out")
    assert (check.path, check.id_column, check.label_column) == (str(tmp_path / "a.csv"), "sid", "y")
    host = lr_config(tmp_path, '{ psi = { input = "b.csv" } }', role="host")
    assert lr_preflight(host, tmp_path / "out")[0].label is None


def test_an_ot_psi_without_its_library_is_refused_in_preflight_with_the_install_step(tmp_path, monkeypatch):
    from fedps.algorithms.psi.preflight import preflight as psi_preflight

    monkeypatch.setenv("FEDPS_OT_PYTHON", str(tmp_path / "no-venv" / "bin" / "python"))
    config = lr_config(tmp_path, '{ psi = { input = "a.csv", protocol = "ot" } }')
    with pytest.raises(ConfigError) as error:
        lr_preflight(config, tmp_path / "out")
    assert "job.params.psi.protocol = \"ot\"" in str(error.value) and "make ot-env" in str(error.value)
    assert "not installed" in public_reason(error.value)
    path = tmp_path / "psi.toml"
    path.write_text('[job]\nid = "j1"\nalgorithm = "psi"\nparams = { input = "a.csv", protocol = "ot" }\n'
                    '[party]\nname = "guest"\nrole = "guest"\n[peers]\nother = "x"\n')
    with pytest.raises(ConfigError, match=r'job.params.protocol = "ot".*make ot-env'):
        psi_preflight(config_module.load(path), tmp_path / "out")
