"""Every example in conf/local/ loads, names a real algorithm, and passes that algorithm's settings checks.

Inputs under data/ must exist; an input or model that an earlier example job
writes (under out/) is the only thing allowed to be missing.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from fedps.engine import config as config_module
from fedps.engine.runner import find_preflight, resolve_algorithm
from fedps.errors import FedpsError

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = sorted((ROOT / "conf" / "local").glob("*.toml"))


def test_there_is_an_example_for_every_job():
    names = {path.stem for path in EXAMPLES}
    for job in ("psi", "lr", "lr-prepared", "predict"):
        assert {f"{job}-guest", f"{job}-host"} <= names, job


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.name for p in EXAMPLES])
def test_example_loads_and_passes_its_settings_checks(path, tmp_path):
    config = config_module.load(path)
    resolve_algorithm(config.job.algorithm)
    preflight = find_preflight(config.job.algorithm)
    if preflight is None:
        return
    try:
        checks = preflight(config, tmp_path)
    except FedpsError as exc:
        assert "/out/" in str(exc), f"{path.name}: {exc}"   # written by an earlier example job
        return
    for check in checks or []:
        if "/data/" in check.path:
            assert Path(check.path).exists(), f"{path.name}: {check.path_setting} = {check.path}"
        else:
            assert "/out/" in check.path, f"{path.name}: {check.path_setting} = {check.path}"
