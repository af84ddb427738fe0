"""Reading a party's training rows: PSI output (Parquet) or an id-keyed CSV/Parquet file.

Rows are put in the order of a hash of the canonical id, so two parties with
the same ids hold them in the same order; PSI output is already in that order.
Column problems (missing, text or NaN in a numeric column, no label on the
guest) are DataErrors that name the column and the file.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pandas as pd

from fedps.algorithms.hetero_lr.trainer import PartyData
from fedps.errors import DataError

#: Column of a prepared file holding a 63-bit hash of the canonical id (int64).
HASHED_ID = "hashed_id"
#: Columns of PSI output (fedps.algorithms.psi.output): keyed id hash and dense row index.
PSI_HASH, PSI_INDEX = "psi_hash", "psi_index"


def canonical(ids: pd.Series) -> pd.Series:
    """Strings trimmed; integers as decimal strings without leading zeros."""
    if pd.api.types.is_integer_dtype(ids):
        return ids.astype("int64").astype(str)
    text = ids.astype(str).str.strip()
    numeric = text.str.fullmatch(r"[+-]?\d+")
    return text.where(~numeric, text[numeric].map(lambda v: str(int(v)) if isinstance(v, str) else v))


def id_hash(ids: pd.Series) -> np.ndarray:
    """A 63-bit hash of each canonical id (row order and validation split)."""
    return np.array([int.from_bytes(hashlib.sha256(v.encode()).digest()[:8], "big") >> 1
                     for v in canonical(ids)], dtype=np.int64)


def read_frame(path: str | Path) -> pd.DataFrame:
    """A CSV or Parquet file, or a PSI output folder (rows in PSI order, hashed ids as int64)."""
    path = Path(path)
    if (path / "manifest.json").exists():
        frame = pd.read_parquet(path / "rows").sort_values(PSI_INDEX, kind="stable").reset_index(drop=True)
        frame[HASHED_ID] = [int.from_bytes(bytes(h)[:8], "big") >> 1 for h in frame[PSI_HASH]]
        return frame.drop(columns=[PSI_HASH, PSI_INDEX])
    try:
        if path.is_dir() or path.suffix == ".parquet":
            return pd.read_parquet(path)
        return pd.read_csv(path)
    except FileNotFoundError:
        raise DataError(f"training data {path} does not exist") from None
    except (ValueError, OSError) as exc:
        raise DataError(f"training data {path} cannot be read: {exc}") from exc


def load_party_data(path: str | Path, id_column: str, label_column: str | None,
                    feature_columns: tuple[str, ...] = ()) -> PartyData:
    """Features (and labels for the guest) in canonical row order."""
    if Path(path).suffix in (".libsvm", ".svm"):
        return load_libsvm(path, label_column is not None)
    frame = read_frame(path)
    if HASHED_ID in frame.columns:
        keys = frame[HASHED_ID].to_numpy(dtype=np.int64)
        drop = {HASHED_ID, id_column, "row_index"}
    else:
        if id_column not in frame.columns:
            raise DataError(f"id column {id_column!r} is missing from {path}; it has {list(frame.columns)[:10]}")
        if frame[id_column].isna().any():
            raise DataError(f"id column {id_column!r} of {path} has empty values")
        keys = id_hash(frame[id_column])
        drop = {id_column}
    if label_column is not None:
        if label_column not in frame.columns:
            raise DataError(f"label column {label_column!r} is missing from {path}")
        drop.add(label_column)
    names = list(feature_columns) or [c for c in frame.columns if c not in drop]
    missing = [c for c in names if c not in frame.columns]
    if missing:
        raise DataError(f"feature column {missing[0]!r} is missing from {path}")
    for name in names:
        column = frame[name]
        if not pd.api.types.is_numeric_dtype(column) or pd.api.types.is_bool_dtype(column):
            sample = column[pd.to_numeric(column, errors="coerce").isna()].iloc[:1].tolist()
            raise DataError(f"feature column {name!r} of {path} is not numeric (e.g. {sample})")
        if column.isna().any():
            raise DataError(f"feature column {name!r} of {path} has {int(column.isna().sum())} "
                            "missing values (NaN); impute them before training")
    order = np.argsort(keys, kind="stable") if HASHED_ID not in frame.columns else np.arange(len(keys))
    y = None
    if label_column is not None:
        labels = pd.to_numeric(frame[label_column], errors="coerce")
        if labels.isna().any() or not set(labels.unique()) <= {0, 1}:
            raise DataError(f"label column {label_column!r} of {path} must hold only 0 and 1")
        y = labels.to_numpy(dtype=np.float64)[order]
    x = frame[names].to_numpy(dtype=np.float64)[order]
    ids = frame[id_column].to_numpy()[order] if id_column in frame.columns else None
    return PartyData(x=x, row_keys=keys[order], y=y, feature_names=names, ids=ids)


def load_libsvm(path: str | Path, has_label: bool) -> PartyData:
    """Sparse rows ``<id> [<label>] <feature id>:<value> ...``; feature ids are int64 (hashed).

    Only the features that occur get a column; the model keeps a row per
    feature id only once a batch touches it.
    """
    from scipy import sparse

    ids, labels, indptr, keys, values = [], [], [0], [], []
    try:
        with open(path) as lines:
            for number, line in enumerate(lines, start=1):
                tokens = line.split()
                if not tokens or tokens[0].startswith("#"):
                    continue
                ids.append(tokens[0])
                if has_label:
                    if len(tokens) < 2 or tokens[1] not in ("0", "1"):
                        raise DataError(f"{path}:{number}: the label after the id must be 0 or 1")
                    labels.append(float(tokens[1]))
                for token in tokens[1 + has_label:]:
                    key, sep, value = token.partition(":")
                    try:
                        keys.append(int(key))
                        values.append(float(value) if sep else 1.0)
                    except ValueError:
                        raise DataError(f"{path}:{number}: {token!r} is not <feature id>:<value>") from None
                indptr.append(len(keys))
    except FileNotFoundError:
        raise DataError(f"training data {path} does not exist") from None
    keys_arr = np.asarray(keys, dtype=np.int64)
    if keys_arr.size and keys_arr.min() < 0:
        raise DataError(f"{path}: feature ids must be non-negative")
    feature_keys, columns = np.unique(keys_arr, return_inverse=True)
    x = sparse.csr_matrix((np.asarray(values), columns, np.asarray(indptr)), shape=(len(ids), len(feature_keys)))
    row_keys = id_hash(pd.Series(ids, dtype=str))
    if len(set(row_keys.tolist())) != len(row_keys):
        raise DataError(f"{path} has duplicate ids")
    order = np.argsort(row_keys, kind="stable")
    y = np.asarray(labels)[order] if has_label else None
    return PartyData(x=x[order], row_keys=row_keys[order], y=y, feature_keys=feature_keys,
                     ids=np.asarray(ids, dtype=object)[order])
