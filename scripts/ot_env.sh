#!/usr/bin/env bash
# The optional OT PSI extra (job.params.protocol = "ot"): SecretFlow's PSI library in a venv of its own.
#
# spu 0.9.5 (Apache-2.0, ~750 MB with jax) needs Python 3.9-3.11 and numpy < 2, which cannot share
# fedps's venv (numpy 2); fedps runs it as a subprocess of this venv's python, one per bucket
# (docs/operations.md, "OT PSI"). Usage: scripts/ot_env.sh [venv folder, default .venv-ot]
# On a cluster, build it at the same path on every executor host, or set FEDPS_OT_PYTHON there.
set -euo pipefail
VENV="${1:-.venv-ot}"
PYTHON="${OT_PYTHON:-python3.11}"
SPU_VERSION="0.9.5"
if ! command -v "$PYTHON" >/dev/null 2>&1; then
    echo "ot_env: $PYTHON not found; install Python 3.11 (spu $SPU_VERSION has no wheel for 3.12+)" \
         "or set OT_PYTHON to a python3.9-3.11" >&2
    exit 2
fi
test -x "$VENV/bin/python" || "$PYTHON" -m venv "$VENV"
"$VENV/bin/python" -m pip install --quiet --upgrade pip
"$VENV/bin/python" -m pip install --quiet "spu==$SPU_VERSION"
"$VENV/bin/python" -c "import spu.libpsi" && touch "$VENV/.installed"
echo "ot_env: $VENV ready (spu $SPU_VERSION); fedps finds $VENV/bin/python in the working directory," \
     "or set FEDPS_OT_PYTHON=$(cd "$VENV" && pwd)/bin/python"
