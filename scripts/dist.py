"""Build what a cluster needs to run fedps: ``make dist`` calls this.

    python scripts/dist.py [--out dist] [--no-env]

writes into ``dist/``:

- ``fedps-<version>-py3-none-any.whl``: the package, for ``pip install`` in an image
  or a cluster's Python environment;
- ``fedps-<version>.zip``: the ``fedps`` package alone, for ``spark-submit --py-files``
  when the cluster's Python already has fedps's dependencies;
- ``fedps-env-<version>.tar.gz`` (unless ``--no-env``): a packed virtualenv with fedps
  and every dependency except PySpark, for ``spark-submit --archives
  dist/fedps-env-<version>.tar.gz#env`` with ``spark.pyspark.python=./env/bin/python``.
  Packed with venv-pack: it rewrites the environment's absolute paths
  (``bin/activate``, script shebangs) into relative ones, so the unpacked folder works
  wherever YARN or Kubernetes puts it. PySpark is left out: the cluster's Spark provides
  its own, and a second copy of a different version breaks the driver-executor protocol.

The wheel and the zip take seconds; the packed environment downloads and installs every
dependency (about 1 GB unpacked, 300 MB packed) and takes minutes.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tomllib
import venv
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# Left out of the packed environment: the cluster's Spark brings its own.
PROVIDED_BY_CLUSTER = ("pyspark",)


def version() -> str:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]


def build_wheel(out: Path) -> Path:
    """The fedps wheel, built in pip's isolated build environment (setuptools from the index)."""
    for old in out.glob("fedps-*.whl"):
        old.unlink()
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps",
                    "--wheel-dir", str(out), str(ROOT)], check=True)
    wheels = sorted(out.glob(f"fedps-{version()}-*.whl"))
    if len(wheels) != 1:
        raise SystemExit(f"dist: expected one fedps {version()} wheel in {out}, found {[w.name for w in wheels]}")
    return wheels[0]


def build_zip(out: Path) -> Path:
    """The ``fedps`` package as a zip for ``--py-files``: sources and package data, no caches."""
    path = out / f"fedps-{version()}.zip"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as archive:
        for file in sorted((ROOT / "fedps").rglob("*")):
            if file.is_file() and "__pycache__" not in file.parts and file.suffix != ".pyc":
                archive.write(file, file.relative_to(ROOT).as_posix())
    return path


def build_env(out: Path, wheel: Path) -> Path:
    """A fresh virtualenv with the wheel and its dependencies (not PySpark), packed by venv-pack."""
    folder = out / "env-build"
    shutil.rmtree(folder, ignore_errors=True)
    venv.create(folder, with_pip=True)
    python = folder / "bin" / "python"
    pip = [str(python), "-m", "pip", "install", "--quiet"]
    subprocess.run([*pip, "--upgrade", "pip"], check=True)
    subprocess.run([*pip, str(wheel), "venv-pack>=0.2,<0.3"], check=True)
    subprocess.run([str(python), "-m", "pip", "uninstall", "--quiet", "--yes", *PROVIDED_BY_CLUSTER], check=True)
    path = out / f"fedps-env-{version()}.tar.gz"
    path.unlink(missing_ok=True)
    subprocess.run([str(folder / "bin" / "venv-pack"), "--prefix", str(folder), "--output", str(path),
                    "--quiet"], check=True)
    shutil.rmtree(folder)
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "dist")
    parser.add_argument("--no-env", action="store_true", help="skip the packed virtualenv (minutes, ~1 GB download)")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    wheel = build_wheel(args.out)
    built = [wheel, build_zip(args.out)]
    if not args.no_env:
        built.append(build_env(args.out, wheel))
    for path in built:
        print(f"{path.relative_to(args.out.parent) if path.is_relative_to(args.out.parent) else path}"
              f"  {path.stat().st_size / 1e6:.1f} MB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
