"""OT-extension PSI (RR22) by SecretFlow's PSI library, its messages carried over fedps's sealed link.

The library (``spu.libpsi`` in the ``spu`` 0.9.5 wheel, Apache-2.0) needs
Python < 3.12 and numpy < 2, so it lives in a virtualenv of its own (``make
ot-env``; docs/operations.md, "OT PSI") and runs in a subprocess of that
venv's python (:mod:`~fedps.algorithms.psi.ot.worker`), one per bucket.

Steps of one bucket (docs/protocols.md, "OT PSI"), in the process serving
it (an executor task, or the driver for a small run), the same for both
parties:

1. refuse a bucket already started by an earlier run of this job (the
   library's messages cannot be replayed: see "resume" below)
2. write my ids of the bucket to a local CSV (hex, so the library's CSV
   reader keeps them as strings)
3. start the relay (:mod:`~fedps.algorithms.psi.ot.relay`): the library's
   blackbox transport on loopback, carried over the bucket's partition of
   the PSI link
4. run the library's RR22 on the CSV in a subprocess (guest rank 0, host
   rank 1; the receiver is the party that learns, or the guest with the
   result broadcast when both do)
5. if I learn the result: my ids in the library's output (kept in ``matched``,
   the same contract as ecdh and rsa, so the output step is shared)

Resume: buckets done before a kill are kept (``done/``, as for the other
protocols). A bucket in flight at the kill is refused on restart with a
ProtocolError (its library session is gone on one side and cannot be
replayed): rerun the job under a new job id.
"""

from __future__ import annotations

import logging
import os
import secrets
import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv

from fedps.errors import ConfigError, PeerError, ProtocolError

log = logging.getLogger(__name__)

#: The OT venv's python; default: ``.venv-ot/bin/python`` in the working directory or the checkout.
PYTHON_ENV = "FEDPS_OT_PYTHON"
WORKER = Path(__file__).with_name("worker.py")
LIBRARY = "spu"
LIBRARY_VERSION = "0.9.5"
PROTOCOL = "RR22"
PARTIES = ("guest", "host")      # ranks 0 and 1 in the library
STARTED = "ot_started"
INSTALL_HINT = ("install it with `make ot-env` (or scripts/ot_env.sh: a Python 3.11 venv .venv-ot with "
                f"{LIBRARY}=={LIBRARY_VERSION}) on every machine that serves buckets, or point "
                f"{PYTHON_ENV} at such a venv's python")


def ot_python() -> Path | None:
    """The OT venv's python, if there is one (``FEDPS_OT_PYTHON``, else ``.venv-ot`` nearby)."""
    named = os.environ.get(PYTHON_ENV)
    if named:
        return Path(named)
    for root in (Path.cwd(), Path(__file__).resolve().parents[4]):
        candidate = root / ".venv-ot" / "bin" / "python"
        if candidate.exists():
            return candidate
    return None


def check_installed() -> Path:
    """The OT venv's python, checked to import the library; ConfigError saying how to install it."""
    python = ot_python()
    if python is None or not python.exists():
        where = f"{PYTHON_ENV}={python}" if python else "no .venv-ot here and FEDPS_OT_PYTHON unset"
        raise ConfigError(f"job.params.protocol = \"ot\" needs SecretFlow's PSI library, which is not "
                          f"installed ({where}); {INSTALL_HINT}")
    probe = ("import importlib.util, os, sys; s = importlib.util.find_spec('spu'); "   # spu not imported
             "sys.exit(not (s and os.path.exists(os.path.join(s.submodule_search_locations[0], 'libpsi.so'))))")
    try:
        found = subprocess.run([str(python), "-I", "-c", probe], capture_output=True, timeout=60).returncode == 0
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise ConfigError(f"job.params.protocol = \"ot\": {python} does not run ({exc}); {INSTALL_HINT}") from None
    if not found:
        raise ConfigError(f"job.params.protocol = \"ot\": {python} has no spu (spu/libpsi.so); {INSTALL_HINT}")
    return python


def setup(run: Any, saved: dict[str, Any] | None) -> dict[str, Any]:
    """Nothing to choose before the buckets but the check that the library is there."""
    check_installed()
    return saved if saved else {"library": f"{LIBRARY}=={LIBRARY_VERSION}", "protocol": PROTOCOL}


def server(run: Any, state: dict[str, Any]) -> Callable[[Any], None]:
    params = run.params
    return serve(run.role, run.peer_role, params.result, float(run.wait_s))


def serve(role: str, peer_role: str, result: str, wait_s: float) -> Callable[[Any], None]:
    """The steps of one bucket, for :mod:`fedps.algorithms.psi.tasks` (primitives only: it is pickled)."""
    if sorted((role, peer_role)) != sorted(PARTIES):
        raise ConfigError(f"OT PSI runs between a guest and a host, not {role} and {peer_role}")
    i_learn = result in ("both", role)
    receiver = PARTIES.index("guest" if result == "both" else result)

    def run_bucket(io: Any) -> None:
        from fedps.algorithms.psi.ot.relay import Relay

        if io.load(STARTED) is not None:                                            # 1
            raise ProtocolError(f"OT PSI bucket {io.bucket} was started by an earlier run of this job "
                                "and cannot resume (the library's messages cannot be replayed); "
                                "rerun the job under a new job id")
        io.save(STARTED, pa.table({"at": pa.array([time.time()])}))
        python = check_installed()
        local = Path(tempfile.mkdtemp(prefix=f"fedps-ot-{io.bucket}-"))
        try:
            ids = pc.unique(io.ids().column("id"))   # the library wants unique keys (kept repeats: once)
            _write_ids(ids, local / "ids.csv")                                     # 2
            token = secrets.token_hex(16)
            p = io.bucket
            relay = Relay(role, peer_role, io.scope.at(iteration=p),               # 3
                          send=lambda tag, value: io.link.send(p, tag, value),
                          recv=lambda tag, seconds: io.link.recv(p, tag, timeout=seconds),
                          token=token, wait_s=wait_s)
            job = {"parties": list(PARTIES), "rank": PARTIES.index(role), "transport": "",
                   "token": token, "session": f"fedps-{io.scope.job}-{p}", "protocol": PROTOCOL,
                   "receiver_rank": receiver, "broadcast": result == "both",
                   "input": str(local / "ids.csv"), "output": str(local / "out.csv"),
                   "recv_timeout_ms": int(wait_s * 1000), "parent": os.getpid()}
            with relay:
                job["transport"] = relay.address
                counts = _run_library(python, job, local, relay, io, wait_s)          # 4
            io.stats.update({"peer_ids": 0, "ot_ids": len(ids), **relay.stats,
                             "ot_library_ms": int(1000 * counts.get("seconds", 0)),
                             "ot_process_ms": int(1000 * counts.get("process_s", 0)),
                             "ot_load_ms": int(1000 * counts.get("load_s", 0))})
            found = _read_ids(local / "out.csv") if i_learn else pa.array([], pa.string())   # 5
            if i_learn:
                if len(found) != counts.get("intersection", len(found)):
                    raise ProtocolError(f"OT PSI bucket {p}: the library reported "
                                        f"{counts.get('intersection')} ids in common but wrote {len(found)}")
                io.save("matched", pa.table({"id": found}))
        finally:
            shutil.rmtree(local, ignore_errors=True)
    return run_bucket


def _run_library(python: Path, job: dict, local: Path, relay: Any, io: Any, wait_s: float) -> dict:
    import json

    (local / "job.json").write_text(json.dumps(job))
    errors = (local / "library.log").open("wb")
    env = {**os.environ, "TMPDIR": str(local)}   # the library's scratch files and traces go with the bucket
    # -I: the OT venv's python ignores PYTHONPATH (a Spark worker's points at fedps's numpy 2)
    started = time.perf_counter()
    process = subprocess.Popen([str(python), "-I", str(WORKER), str(local / "job.json")], cwd=local,
                               stdout=errors, stderr=errors, env=env)
    deadline = time.monotonic() + wait_s
    try:
        while process.poll() is None:
            failure = relay.error()
            if failure is None and io.stop is not None and io.stop.is_set():
                failure = PeerError(f"stopped OT PSI bucket {io.bucket}: the peer stopped the job")
            if failure is None and time.monotonic() > deadline:
                failure = PeerError(f"OT PSI bucket {io.bucket} took more than {wait_s:g}s (job.params.wait_s)")
            if failure is not None:
                raise failure
            time.sleep(0.02)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        errors.close()
    if process.returncode != 0:
        lines = (local / "library.log").read_text(errors="replace").strip().splitlines()
        said = next((line for line in reversed(lines) if line.startswith("OT PSI failed")),
                    lines[-1] if lines else f"exit status {process.returncode}")
        raise ProtocolError(f"OT PSI bucket {io.bucket}: {said}")
    return {**json.loads((local / "out.csv.json").read_text()), "process_s": time.perf_counter() - started}


def _write_ids(ids: pa.ChunkedArray | pa.Array, path: Path) -> None:
    """One column ``id``: each id as ``x`` + its UTF-8 in hex (never read back as a number)."""
    values = ids.to_pylist()
    with path.open("w", encoding="ascii") as handle:
        handle.write("id\n")
        handle.writelines(f"x{value.encode().hex()}\n" for value in values)


def _read_ids(path: Path) -> pa.Array:
    if not path.exists() or path.stat().st_size == 0:
        return pa.array([], pa.string())
    table = pacsv.read_csv(path, convert_options=pacsv.ConvertOptions(column_types={"id": pa.string()}))
    return pa.array([bytes.fromhex(v[1:]).decode() for v in table.column("id").to_pylist()], pa.string())

