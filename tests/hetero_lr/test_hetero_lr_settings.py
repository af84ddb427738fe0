"""Where an LR job's inline PSI writes its result: PSI's own path rules, URIs included."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

from fedps.algorithms.hetero_lr import _psi_output


def test_the_inline_psi_output_is_relative_to_output_dir_or_absolute_or_a_uri(tmp_path):
    context = SimpleNamespace(output_dir=tmp_path / "out")
    assert str(_psi_output(context, {})) == str(tmp_path / "out" / "psi")
    assert str(_psi_output(context, {"output": "aligned"})) == str(tmp_path / "out" / "aligned")
    assert str(_psi_output(context, {"output": str(tmp_path / "elsewhere")})) == str(tmp_path / "elsewhere")
    uri = f"file://{tmp_path}/on-a-filesystem/"
    assert str(_psi_output(context, {"output": uri})) == uri.rstrip("/")   # not <output_dir>/file:/...
    folder = _psi_output(context, {"output": uri})
    folder.make().write_json("manifest.json", {"count": 1})
    assert folder.exists("manifest.json") and (Path(tmp_path) / "on-a-filesystem" / "manifest.json").exists()
