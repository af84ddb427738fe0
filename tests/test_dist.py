"""`make dist`'s --py-files zip carries the whole package and is importable on its own."""

import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
import dist  # noqa: E402


def test_the_zip_holds_every_module_and_resource_and_imports_first(tmp_path):
    path = dist.build_zip(tmp_path)
    names = set(zipfile.ZipFile(path).namelist())
    sources = {p.relative_to(ROOT).as_posix() for p in (ROOT / "fedps").rglob("*")
               if p.is_file() and "__pycache__" not in p.parts and p.suffix != ".pyc"}
    assert names == sources
    assert "fedps/engine/resources/log4j2.properties" in names
    # what spark-submit does with --py-files: the zip goes on PYTHONPATH, before site-packages
    code = ("import fedps, fedps.engine.runner, fedps.algorithms.hetero_lr, fedps.algorithms.psi; "
            "print(fedps.__file__)")
    out = subprocess.run([sys.executable, "-c", code], env={"PYTHONPATH": str(path)}, cwd=tmp_path,
                         capture_output=True, text=True, check=True).stdout
    assert out.strip() == f"{path}/fedps/__init__.py"
