"""The job a party is about to run, as its peers must see it too: compared before any data work.

Every party builds a :func:`descriptor` of its job from its own configuration: the
algorithm, the parties and their roles, and the settings all parties must share (the
algorithm says which, through an optional ``agreed_settings(config)`` function in its
package), plus a digest of all of it. The parties swap descriptors right after their
channels open (``fedps.engine.preflight.exchange``); :func:`differences` names every
setting that differs, in one message that every side prints, before PSI or training
starts.

What a peer learns from a descriptor: the algorithm and settings it must agree on
anyway, and a hash of the column names this party declared (so a peer can tell when a
data set's schema changed between jobs, and a horizontal job can check that all parties
have the same one). No data and no statistics.
"""

from __future__ import annotations

import hashlib
import importlib
import json
from collections.abc import Mapping
from typing import Any

VERSION = 1


def _canonical(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), default=str)


def digest(value: Any) -> str:
    return hashlib.sha256(_canonical(value).encode()).hexdigest()


def schema_hash(columns: list[str] | tuple[str, ...] | None) -> str | None:
    """A hash of the declared column names, in order (None when the party declares none)."""
    return None if not columns else digest(list(columns))[:16]


def agreed_settings(config: Any) -> dict[str, Any]:
    """The algorithm's settings that every party must share (its ``agreed_settings`` hook)."""
    try:
        module = importlib.import_module(f"fedps.algorithms.{config.job.algorithm}")
    except ModuleNotFoundError:
        return {}
    hook = getattr(module, "agreed_settings", None)
    return dict(hook(config)) if hook is not None else {}


def descriptor(config: Any, columns: list[str] | None = None) -> dict[str, Any]:
    """This party's view of the job, to compare with every peer's before any data work."""
    parties = sorted([config.party.name, *config.peers])
    body = {
        "version": VERSION,
        "job": config.job.id,
        "algorithm": config.job.algorithm,
        "parties": parties,
        "settings": agreed_settings(config),
    }
    return {**body, "party": config.party.name, "role": config.party.role,
            "schema": schema_hash(columns), "digest": digest(body)}


def differences(mine: Mapping[str, Any], theirs: Mapping[str, Any], peer: str) -> list[str]:
    """Every shared field that differs, as ``"<field>: <mine> here, <theirs> at <peer>"``."""
    found = []
    if mine.get("role") == theirs.get("role") == "guest":
        found.append(f"role: {mine.get('party')} and {peer} both say they are the guest")
    if mine.get("digest") == theirs.get("digest"):
        return found
    for key in ("version", "job", "algorithm", "parties"):
        if mine.get(key) != theirs.get(key):
            found.append(f"{key}: {_show(mine.get(key))} here, {_show(theirs.get(key))} at {peer}")
    ours, yours = mine.get("settings") or {}, theirs.get("settings") or {}
    for key in sorted(set(ours) | set(yours)):
        if ours.get(key, _MISSING) != yours.get(key, _MISSING):
            found.append(f"job.params.{key}: {_show(ours.get(key, _MISSING))} here, "
                         f"{_show(yours.get(key, _MISSING))} at {peer}")
    return found or [f"the job descriptors differ (digest {mine.get('digest', '?')[:12]} here, "
                     f"{str(theirs.get('digest', '?'))[:12]} at {peer})"]


class _Missing:
    def __repr__(self) -> str:
        return "(not set)"


_MISSING = _Missing()


def _show(value: Any) -> str:
    return repr(value) if not isinstance(value, _Missing) else "(not set)"
