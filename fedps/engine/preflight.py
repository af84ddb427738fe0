"""A party's checks of its whole job before any work, and their exchange with its peers.

An algorithm's ``preflight(config, output_dir)`` checks its settings (every
key, nested tables included, named as ``job.params.psi.id_column`` with the
file and a did-you-mean) and returns the :class:`InputCheck` of each input
it will read. The runner runs those with the party's Spark session (started
once, kept for the job) in one pass over each input: the path, the id
column, the label's values for the algorithm's :class:`LabelRule`, and every
feature column's type, missing values and constancy. Then, right after the
channels open and before any protocol step, the parties exchange the
outcome (:func:`exchange`): a mistake on either side stops both, each
naming the reason.

A problem is a :class:`Problem`: the full message for this party's own log,
and a ``public`` sentence (which setting or check failed, no values, no
paths, no ids) that is all the peers are told.
"""

from __future__ import annotations

import difflib
import logging
from dataclasses import dataclass
from typing import Any, Iterable, Mapping

from fedps.engine import agreement
from fedps.errors import ConfigError, DataError, FedpsError
from fedps.messaging.control import PeerStopped
from fedps.messaging.tags import Message, Tag

log = logging.getLogger(__name__)

READY = Message("ready", "either", "other", dict)


def public_reason(exc: BaseException) -> str:
    """``<kind>: <sentence>`` a peer may be told about this error (never data)."""
    kind = type(exc).__name__
    public = getattr(exc, "public", None)
    if public:
        return f"{kind}: {public}"
    if isinstance(exc, (ConfigError,)) or type(exc).__name__ in ("ProtocolError", "PeerError", "CryptoError"):
        return f"{kind}: {' '.join(str(exc).split())}"
    if isinstance(exc, FedpsError):
        return f"{kind}: a problem with its data or setup (its log names it)"
    if isinstance(exc, KeyboardInterrupt):
        return "interrupted: the party was stopped by its operator"
    return f"internal error: {kind} (its log has the details)"


def with_public(exc: FedpsError, public: str) -> FedpsError:
    """``exc`` carrying the sentence its peers are told (kept across pickling)."""
    exc.public = public  # type: ignore[attr-defined]
    return exc


# ---------------------------------------------------------------- settings
def check_keys(raw: Mapping[str, Any], known: Iterable[str], where: str, source: str) -> None:
    """ConfigError naming each unknown key of the table ``where`` (with a did-you-mean)."""
    known = sorted(known)
    unknown = sorted(set(raw) - set(known))
    if not unknown:
        return
    parts = []
    for key in unknown:
        close = difflib.get_close_matches(key, known, n=1, cutoff=0.6)
        hint = f" (did you mean {where}.{close[0]}?)" if close else ""
        parts.append(f"{where}.{key}{hint}")
    names = ", ".join(f"{where}.{k}" for k in unknown)
    raise with_public(ConfigError(f"unknown key {', '.join(parts)} in {source}; the keys of {where} are "
                                  f"{', '.join(known)}"), f"unknown setting {names}")


def renamed(exc: ConfigError, where: str) -> ConfigError:
    """A ConfigError of a nested table's settings, its key names put under ``where``."""
    text = str(exc).replace("job.params.", f"{where}.")
    return with_public(ConfigError(text), getattr(exc, "public", None) or text)


def suggest(name: str, columns: Iterable[str]) -> str:
    close = difflib.get_close_matches(name, list(columns), n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


# ---------------------------------------------------------------- inputs
@dataclass(frozen=True)
class LabelRule:
    """What an algorithm needs of its label: ``binary`` (0 and 1) or ``number`` (any finite value)."""

    kind: str = "binary"
    algorithm: str = "this algorithm"

    @staticmethod
    def binary(algorithm: str) -> LabelRule:
        return LabelRule("binary", algorithm)


@dataclass(frozen=True)
class InputCheck:
    """One input a party's job reads, and what it must hold."""

    what: str                          # "the PSI input", "the training data", ...
    path: str
    path_setting: str                  # e.g. job.params.psi.input
    id_column: str = "id"
    id_setting: str = "job.params.id_column"
    format: str = "auto"
    label_column: str | None = None    # checked only with a label rule
    label_setting: str = "job.params.label_column"
    label: LabelRule | None = None
    features: bool = True              # check every feature column's type and values
    feature_columns: tuple[str, ...] = ()
    feature_setting: str = "job.params.feature_columns"
    #: Fewest rows the job can use, and why (an intersection is never larger than the input).
    min_rows: int = 0
    min_rows_reason: str = ""
    #: The algorithm handles missing feature values itself (e.g. SecureBoost's missing-value branch).
    missing_ok: bool = False


@dataclass(frozen=True)
class Problem:
    message: str
    public: str


def run_checks(spark: Any, checks: Iterable[InputCheck]) -> dict[str, Any]:
    """Run every check; one DataError listing all problems found, or a summary per input."""
    problems: list[Problem] = []
    summary: dict[str, Any] = {}
    for check in checks:
        found, info = _check_input(spark, check)
        problems += found
        summary[check.path_setting] = info
    if problems:
        head = problems[0].message if len(problems) == 1 else (
            f"{len(problems)} problems found before any work:\n  - " + "\n  - ".join(p.message for p in problems))
        publics = list(dict.fromkeys(p.public for p in problems))
        raise with_public(DataError(head), "; ".join(publics))
    return summary


def _check_input(spark: Any, check: InputCheck) -> tuple[list[Problem], dict[str, Any]]:
    from fedps.engine import formats

    try:
        table = formats.open_table(spark, check.path, check.format, check.id_column,
                                   label_column=check.label_column if check.label else None)
    except FedpsError as exc:
        return [Problem(f"{check.what} ({check.path_setting}): {exc}",
                        f"{check.what} named by {check.path_setting} cannot be read")], {}
    problems: list[Problem] = []
    columns = table.columns
    if not table.sparse and table.id_column not in columns:
        problems.append(Problem(
            f"the id column {check.id_column!r} ({check.id_setting}) is not in {check.path}"
            f"{suggest(check.id_column, columns)}; its columns are {', '.join(columns)}",
            f"its id column ({check.id_setting}) is not in {check.what}"))
    label = check.label_column if check.label else None
    if label is not None and not table.sparse and label not in columns:
        problems.append(Problem(
            f"the label column {label!r} ({check.label_setting}) is not in {check.path}"
            f"{suggest(label, columns)}; its columns are {', '.join(columns)}",
            f"its label column ({check.label_setting}) is not in {check.what}"))
        label = None
    features: list[str] = []
    if check.features and not table.sparse:
        excluded = {table.id_column, check.label_column, *formats.NOT_FEATURES}
        features = list(check.feature_columns) or [c for c in columns if c not in excluded]
        for name in check.feature_columns:
            if name not in columns:
                problems.append(Problem(
                    f"the feature column {name!r} ({check.feature_setting}) is not in {check.path}"
                    f"{suggest(name, columns)}; its columns are {', '.join(columns)}",
                    f"a feature column named in {check.feature_setting} is not in {check.what}"))
        features = [f for f in features if f in columns]
    if problems:   # a column is missing: its name is the problem to fix first
        return problems, {}
    stats = formats.column_stats(table, label, features if check.features else [])
    info = {"rows": stats["rows"], "features": len(features) if not table.sparse else None}
    problems += _judge(check, table, stats, label, features)
    return problems, info


def _judge(check: InputCheck, table: Any, stats: dict[str, Any], label: str | None,
           features: list[str]) -> list[Problem]:
    problems = []
    where = check.path
    if stats["rows"] == 0:
        return [Problem(f"{check.what} {where} ({check.path_setting}) holds no rows", f"{check.what} is empty")]
    if stats["rows"] < check.min_rows:
        problems.append(Problem(f"{check.what} {where} holds {stats['rows']} rows, fewer than the "
                                f"{check.min_rows} needed for {check.min_rows_reason}",
                                f"{check.what} has too few rows for {check.min_rows_reason}"))
    if stats["null_ids"]:
        problems.append(Problem(
            f"{stats['null_ids']} of {stats['rows']} rows have a null or empty id in column "
            f"{check.id_column!r} of {where}", f"some rows of {check.what} have no id"))
    if stats.get("bad_lines"):
        problems.append(Problem(f"{stats['bad_lines']} lines of {where} are malformed ({table.kind}); "
                                f"the first: {stats['bad_example']}", f"{check.what} has malformed lines"))
    if label is not None and check.label is not None:
        problems += _judge_label(check, stats, label)
    for name in features:
        column = stats["features"][name]
        if column.get("non_numeric"):
            problems.append(Problem(
                f"feature column {name!r} of {where} is not numeric (type {column['type']}, e.g. "
                f"{column['example']!r}); encode it as numbers, or leave it out with {check.feature_setting}",
                f"a feature column of {check.what} is not numeric"))
        elif column["missing"] and not check.missing_ok:
            problems.append(Problem(
                f"feature column {name!r} of {where} has {column['missing']} missing or non-finite values "
                f"(null, NaN or infinity); impute them, or leave the column out with {check.feature_setting}",
                f"a feature column of {check.what} has missing values"))
        elif stats["rows"] > 1 and column["min"] is not None and column["min"] == column["max"]:
            problems.append(Problem(
                f"feature column {name!r} of {where} is constant (every row holds {column['min']:g}); it "
                f"cannot help the model: leave it out with {check.feature_setting}",
                f"a feature column of {check.what} is constant"))
    if stats.get("nonfinite") and not check.missing_ok:
        problems.append(Problem(f"{where} has {stats['nonfinite']} non-finite feature values (NaN or infinity)",
                                f"{check.what} has missing values"))
    return problems


def _judge_label(check: InputCheck, stats: dict[str, Any], label: str) -> list[Problem]:
    info = stats["label"]
    where = f"the label column {label!r} ({check.label_setting}) of {check.path}"
    public = f"its label column ({check.label_setting}) is not a binary 0/1 label for {check.label.algorithm}"
    if info["non_numeric"]:
        return [Problem(f"{where} is not numeric (e.g. {info['example']!r}): {check.label.algorithm} needs "
                        "labels 0 and 1", public)]
    if info["missing"]:
        return [Problem(f"{where} has {info['missing']} missing values; every row needs a label", public)]
    if check.label.kind != "binary" or not info["outside"]:
        return []
    low, high = info["min"], info["max"]
    span = f"{low:g}–{high:g}" if low != high else f"{low:g}"
    kind = "counts" if info["integral"] and low >= 0 else "values"
    return [Problem(f"{where} holds {kind} {span} ({info['distinct']} distinct values, {info['outside']} rows "
                    f"neither 0 nor 1): this is not a binary label; {check.label.algorithm} needs 0 and 1 "
                    "(map the classes to 0/1 first)", public)]


# ---------------------------------------------------------------- with the peers
def exchange(channels: Mapping[str, Any], job: str, timeout_s: float | None = None,
             descriptor: Mapping[str, Any] | None = None) -> None:
    """Tell every peer this party's checks passed, and wait for theirs (PeerStopped if one failed).

    With ``descriptor`` (``fedps.engine.agreement``), the parties also swap their views of
    the job, and a difference stops every side with a ConfigError that names it.

    A resumed channel skips it: its peer is past this point of the job.
    """
    tag = Tag(job, "preflight", -1, -1, READY.name)
    fresh = {peer: ch for peer, ch in channels.items() if not getattr(ch, "resumed", False)}
    for channel in fresh.values():
        channel.send(tag, READY.check({"ok": True, "job": descriptor}))
    differ = []
    for peer, channel in fresh.items():
        theirs = READY.check(channel.recv(tag, timeout=timeout_s))
        if not theirs.get("ok"):
            raise PeerStopped(f"{peer} stopped: {theirs.get('reason') or 'its checks failed'}")
        if descriptor is not None and isinstance(theirs.get("job"), dict):
            differ += agreement.differences(descriptor, theirs["job"], peer)
    if differ:   # every party sees the same differences, and stops with them, before any data work
        sentence = "the parties configured different jobs: " + "; ".join(differ)
        raise with_public(ConfigError(sentence), sentence)   # shared settings: the peers know them
    if fresh:
        log.info("checks passed here and at %s", ", ".join(sorted(fresh)))
