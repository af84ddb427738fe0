"""Party processes for the end-to-end tests: write the party files, start `fedps run`, collect.

Every multi-process test (one `fedps run` per party through the embedded
broker) needs the same three things: an identity per party with the others
pinned, one TOML file per party, and a way to start the processes and read
their last stdout line (the metrics JSON) or their error. They live here once.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any, Mapping

from fedps.messaging.identity import generate_identity


def inline(params: Mapping[str, Any]) -> str:
    """A TOML inline table of ``params`` (nested tables and lists included)."""
    def value(v: Any) -> str:
        if isinstance(v, Mapping):
            return inline(v)
        if isinstance(v, (list, tuple)):
            return "[" + ", ".join(value(x) for x in v) + "]"
        return json.dumps(v)
    return "{ " + ", ".join(f"{k} = {value(v)}" for k, v in params.items()) + " }"


def party_files(tmp: Path, job: str, servers: str, algorithm: str, params: Mapping[str, Mapping[str, Any]],
                roles: Mapping[str, str] | None = None, sections: str = "") -> dict[str, Path]:
    """One TOML file per party in ``tmp`` (keys in ``tmp/keys``, outputs in ``tmp/out/<name>``).

    ``params`` maps each party to its ``[job] params``; ``roles`` to its role
    (default: ``guest`` for a party named so, else ``host``); ``sections`` is
    TOML appended to every file (``[channel]``, ``[spark]``, ...).
    """
    names = list(params)
    keys = {n: generate_identity(tmp / "keys" / f"{n}.key") for n in names}
    files = {}
    for name in names:
        role = (roles or {}).get(name, "guest" if name == "guest" else "host")
        peers = "\n".join(f'{p} = "{keys[p]}"' for p in names if p != name)
        path = tmp / f"{name}.toml"
        path.write_text(f"""[job]
id = "{job}"
algorithm = "{algorithm}"
params = {inline(params[name])}
[party]
name = "{name}"
role = "{role}"
identity_key = "keys/{name}.key"
output_dir = "out/{name}"
[peers]
{peers}
[kafka]
bootstrap_servers = "{servers}"
[ray]
object_store_mb = 80
num_cpus = 1
{sections}""")
        files[name] = path
    return files


def start(conf: Path, *args: str) -> subprocess.Popen:
    """``fedps run --conf <conf>`` in its own process group (so a test can kill -9 it whole)."""
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
    return subprocess.Popen([sys.executable, "-m", "fedps.engine.cli", "run", "--conf", str(conf), *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            start_new_session=True)


def finish(procs: Mapping[str, subprocess.Popen], timeout: float = 600,
           stderr: dict[str, str] | None = None) -> dict[str, dict]:
    """Each party's metrics (its last stdout line); a party that failed fails the test with its stderr.

    ``stderr``, when given, gets each party's stderr (its log).
    """
    out = {}
    for name, proc in procs.items():
        stdout, errors = proc.communicate(timeout=timeout)
        assert proc.returncode == 0, f"{name} failed:\n{errors[-4000:]}"
        out[name] = json.loads(stdout.strip().splitlines()[-1])
        if stderr is not None:
            stderr[name] = errors
    return out


def stopped(procs: Mapping[str, subprocess.Popen], timeout: float = 600, code: int = 2) -> dict[str, str]:
    """Each party's stderr, once it has exited with ``code`` (fedps's clear-error code) and no traceback."""
    errors = {}
    for name, proc in procs.items():
        _, stderr = proc.communicate(timeout=timeout)
        assert proc.returncode == code, f"{name} exited {proc.returncode}:\n{stderr[-3000:]}"
        assert "Traceback" not in stderr, stderr[-3000:]
        errors[name] = stderr
    return errors


def kill(proc: subprocess.Popen) -> None:
    """kill -9 of the party's whole process group (its Spark JVM and Ray processes too)."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.communicate()
