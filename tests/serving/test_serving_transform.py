"""A model trained with a row transform (standardisation, row clip) is served with it."""

from __future__ import annotations

import json

import numpy as np
import pytest

from fedps.engine.vertical.standardize import RowTransform
from fedps.errors import DataError
from fedps.serving.model import load_model


def write(folder, transform: dict | None, features: int = 3) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    saved = {"party": "host", "features": [f"x{i}" for i in range(features)], "weights": [0.5, -1.0, 2.0],
             "intercept": 0.25}
    if transform is not None:
        saved["transform"] = transform
    (folder / "model.json").write_text(json.dumps(saved))
    (folder / "checkpoint").mkdir(exist_ok=True)
    (folder / "checkpoint" / "setup.json").write_text(json.dumps({"job": "j1"}))


def test_scores_apply_the_transform_the_batch_prediction_applies(tmp_path):
    transform = RowTransform((10.0, -3.0, 0.5), (2.0, 4.0, 0.1), clip_norm=1.5)
    write(tmp_path, transform.to_json())
    model = load_model(tmp_path, "host")
    x = np.array([[12.0, 1.0, 0.7], [10.0, -3.0, 0.5], [0.0, 0.0, 0.0]])
    expected = transform.apply(x) @ np.array([0.5, -1.0, 2.0]) + 0.25   # hetero_lr/predict.py's maths
    assert np.allclose(model.score(x), expected, atol=1e-12)
    assert not np.allclose(model.score(x), x @ np.array([0.5, -1.0, 2.0]) + 0.25)
    assert model.score(np.zeros((0, 3))).shape == (0,)


def test_a_transform_that_does_not_fit_the_weights_is_refused(tmp_path):
    write(tmp_path, {"shift": [0.0, 0.0], "scale": [1.0, 1.0]})
    with pytest.raises(DataError, match="row transform covers 2 features, its weights 3"):
        load_model(tmp_path, "host")
