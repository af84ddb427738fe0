"""The job a party is about to run, as its peers must see it too: compared before any data work.

Every party builds a :func:`descriptor` of its job from its own configuration: the
algorithm, its role, and the settings all parties must share (the algorithm says which,
through an optional ``agreed_settings(config)`` function in its package; an algorithm
whose parties all talk to each other includes the set of parties, one with a star
topology such as FedAvg's does not), plus a digest of all of it. The parties swap descriptors right after their
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

from fedps.errors import FedpsError

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
    if hook is None:
        return {}
    try:
        return {key: _plain(value) for key, value in dict(hook(config)).items()}
    except FedpsError:
        return {}   # the algorithm's preflight reports bad settings, with their file


def _plain(value: Any) -> Any:
    """A settings value as JSON carries it (tuples become lists), so both sides compare alike."""
    return json.loads(_canonical(value))


def descriptor(config: Any, columns: list[str] | None = None) -> dict[str, Any]:
    """This party's view of the job, to compare with every peer's before any data work."""
    body = {
        "version": VERSION,
        "job": config.job.id,
        "algorithm": config.job.algorithm,
        "settings": agreed_settings(config),
    }
    return {**body, "party": config.party.name, "role": config.party.role,
            "schema": schema_hash(columns), "digest": digest(body)}


def differences(mine: Mapping[str, Any], theirs: Mapping[str, Any], peer: str) -> list[str]:
    """Every shared field that differs, as ``"<field>: <a> has <x>, <b> has <y>"``.

    The parties are named in sorted order, so every side prints the same sentence.
    """
    me = str(mine.get("party", "this party"))
    found = []
    if mine.get("role") == theirs.get("role") == "guest":
        found.append(f"role: {' and '.join(sorted([me, peer]))} both say they are the guest")
    if mine.get("digest") == theirs.get("digest"):
        return found

    def line(name: str, ours: Any, yours: Any) -> str:
        (a, x), (b, y) = sorted([(me, ours), (peer, yours)], key=lambda pair: pair[0])
        return f"{name}: {a} has {_show(x)}, {b} has {_show(y)}"

    for key in ("version", "job", "algorithm"):
        if mine.get(key) != theirs.get(key):
            found.append(line(key, mine.get(key), theirs.get(key)))
    ours, yours = mine.get("settings") or {}, theirs.get("settings") or {}
    for key in sorted(set(ours) | set(yours)):
        if ours.get(key, _MISSING) != yours.get(key, _MISSING):
            if key == "parties":
                name = "the parties ([peers])"
            elif key.split(".")[-1] == "scheme":   # not a setting: the fedps versions bucket differently
                name = "the PSI scheme (the parties' fedps versions differ)"
            else:
                name = f"job.params.{key}"
            found.append(line(name, ours.get(key, _MISSING), yours.get(key, _MISSING)))
    return found or [f"the job descriptors differ (digests {str(mine.get('digest'))[:12]} at {me}, "
                     f"{str(theirs.get('digest'))[:12]} at {peer})"]


class _Missing:
    def __repr__(self) -> str:
        return "(not set)"


_MISSING = _Missing()


def _show(value: Any) -> str:
    return repr(value) if not isinstance(value, _Missing) else "(not set)"
