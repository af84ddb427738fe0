"""The jobs a party knows, with their state and last progress: what ``fedps jobs`` lists.

One small JSON file per (party, job) under ``$FEDPS_HOME/jobs/<party>/`` (default
``~/.fedps``), written atomically (mode 0600) by the runner as a job moves through its
states:

- ``proposed``: the party has checked its own side and waits for its peers to join
  (channels opening, descriptors being compared);
- ``running``: every party agreed on the job and the algorithm runs;
- ``done`` or ``failed`` (with the error's one-line reason).

``progress`` is the last progress line the algorithm reported. The files hold no data:
the job's settings digest, folders and timestamps only.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

STATES = ("proposed", "running", "done", "failed")


def home() -> Path:
    return Path(os.environ.get("FEDPS_HOME") or Path.home() / ".fedps")


@dataclass
class JobEntry:
    job: str
    party: str
    algorithm: str
    peers: list[str]
    state: str
    output_dir: str
    started: float = field(default_factory=time.time)
    updated: float = field(default_factory=time.time)
    progress: str = ""
    error: str = ""
    digest: str = ""


def _path(party: str, job: str) -> Path:
    return home() / "jobs" / party / f"{job}.json"


def record(config: Any, state: str, output_dir: str | Path, **fields: Any) -> JobEntry:
    """Write the (party, job) entry with ``state``; earlier fields are kept unless given."""
    if state not in STATES:
        raise ValueError(f"job state must be one of {STATES}, not {state!r}")
    previous = read(config.party.name, config.job.id)
    entry = previous or JobEntry(job=config.job.id, party=config.party.name, algorithm=config.job.algorithm,
                                 peers=sorted(config.peers), state=state, output_dir=str(output_dir))
    if previous is not None and previous.state in ("done", "failed") and state == "proposed":
        entry = JobEntry(job=entry.job, party=entry.party, algorithm=config.job.algorithm,
                         peers=sorted(config.peers), state=state, output_dir=str(output_dir))   # a rerun
    entry.state, entry.updated = state, time.time()
    for key, value in fields.items():
        setattr(entry, key, value)
    if state != "failed":
        entry.error = fields.get("error", "")
    _write(_path(entry.party, entry.job), asdict(entry))
    return entry


def read(party: str, job: str) -> JobEntry | None:
    path = _path(party, job)
    try:
        return JobEntry(**json.loads(path.read_text()))
    except (FileNotFoundError, TypeError, ValueError):
        return None


def entries(party: str | None = None) -> list[JobEntry]:
    """Every known job (of one party, or of all), most recently updated first."""
    root = home() / "jobs"
    found = []
    for path in sorted(root.glob(f"{party or '*'}/*.json")):
        entry = read(path.parent.name, path.stem)
        if entry is not None:
            found.append(entry)
    return sorted(found, key=lambda e: e.updated, reverse=True)


def table(found: list[JobEntry]) -> str:
    """The listing ``fedps jobs`` prints."""
    if not found:
        return f"no jobs known under {home() / 'jobs'}\n"
    rows = [("JOB", "PARTY", "ALGORITHM", "STATE", "UPDATED (UTC)", "LAST")]
    for e in found:
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(e.updated))
        rows.append((e.job, e.party, e.algorithm, e.state, when, e.error or e.progress))
    widths = [max(len(row[i]) for row in rows) for i in range(5)]
    return "".join("  ".join(cell.ljust(widths[i]) for i, cell in enumerate(row[:5])) + "  " + row[5] + "\n"
                   for row in rows)


def _write(path: Path, value: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as out:
        json.dump(value, out, indent=1, sort_keys=True)
    os.replace(tmp, path)
