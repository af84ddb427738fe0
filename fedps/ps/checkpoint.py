"""Checkpoints of a parameter server: Parquet per shard, a manifest, atomic commit.

Layout under ``checkpoint_dir`` (a local path or any ``pyarrow.fs`` URI, e.g.
``hdfs://namenode/fedps/job``)::

    step-000000000120/manifest.json
    step-000000000120/<table>/shard-00000.parquet
    _tmp-step-000000000140-<nonce>/...      (being written, or crash debris)

A checkpoint is written into a ``_tmp-`` folder (each file to a ``.tmp`` name,
then renamed), the manifest is written last, and the folder is renamed to
``step-<S>``. A checkpoint is *complete* when its manifest parses, names the
folder's step and every file it lists exists with its recorded size; anything
else is ignored by restore and removed by later pruning. Step ``S`` means that
``S`` steps have been applied: a restored server continues with step ``S``.

The tree holds weights and optimizer state, so on the local disk every folder
is made mode 0700 and every file 0600 (pyarrow writes with the process umask,
so modes are set after writing, before a file gets its final name). On HDFS or
object stores, the folder's own permissions and the cluster's umask apply.
"""

from __future__ import annotations

import json
import logging
import os
import re
import time
import uuid
from typing import Any, Callable

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from fedps.errors import DataError
from fedps.ps.config import TableSpec

log = logging.getLogger(__name__)

FORMAT = 1
MANIFEST = "manifest.json"
_STEP_DIR = re.compile(r"^step-(\d{12})$")
_TMP_DIR = re.compile(r"^_tmp-step-(\d{12})-[0-9a-f]+$")
PRIVATE_DIR = 0o700
PRIVATE_FILE = 0o600


def filesystem(uri: str) -> tuple[pafs.FileSystem, str]:
    """The pyarrow filesystem and path of ``uri`` (a plain path means the local disk)."""
    if "://" not in uri:
        uri = os.path.abspath(uri)
    try:
        return pafs.FileSystem.from_uri(uri)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError, OSError) as exc:
        raise DataError(f"cannot open checkpoint location {uri!r}: {exc}") from exc


def join(uri: str, *parts: str) -> str:
    return "/".join([uri.rstrip("/"), *parts])


def make_private(fs: pafs.FileSystem, path: str, mode: int) -> None:
    """Give a local file or folder ``mode`` (other filesystems keep their own permissions)."""
    if isinstance(fs, pafs.LocalFileSystem):
        os.chmod(path, mode)


def create_private_dir(uri: str) -> None:
    """Create the folder ``uri`` (and missing parents, all mode 0700 on the local disk)."""
    fs, path = filesystem(uri)
    missing = []
    parent = path
    while fs.get_file_info(parent).type == pafs.FileType.NotFound:
        missing.append(parent)
        parent = os.path.dirname(parent.rstrip("/"))
        if not parent or parent == "/":
            break
    fs.create_dir(path)
    for folder in [path, *missing]:
        make_private(fs, folder, PRIVATE_DIR)


def step_dir(step: int) -> str:
    return f"step-{step:012d}"


def tmp_dir(step: int) -> str:
    return f"_tmp-step-{step:012d}-{uuid.uuid4().hex[:12]}"


# --- one shard's rows -------------------------------------------------------


# pyarrow's own numpy conversions import pandas (a second per process); these do not.


def _arrow(array: np.ndarray) -> pa.Array:
    flat = np.ascontiguousarray(array).reshape(-1)
    return pa.Array.from_buffers(pa.from_numpy_dtype(flat.dtype), flat.size, [None, pa.py_buffer(flat)])


def _numpy(array: pa.Array) -> np.ndarray:
    if array.null_count:
        raise DataError("checkpoint column has nulls; the file is not a fedps checkpoint")
    values = np.frombuffer(array.buffers()[1], dtype=array.type.to_pandas_dtype())
    return values[array.offset : array.offset + len(array)]


def _column(array: np.ndarray) -> pa.FixedSizeListArray:
    return pa.FixedSizeListArray.from_arrays(_arrow(array), array.shape[1])


def write_rows(uri: str, keys: np.ndarray, weights: np.ndarray, state: dict[str, np.ndarray], meta: dict) -> int:
    """Write rows to Parquet at ``uri`` through a temporary name; return the file size."""
    columns = {"key": _arrow(keys.astype(np.int64, copy=False)), "weights": _column(weights)}
    columns.update({f"state.{name}": _column(array) for name, array in state.items()})
    table = pa.Table.from_arrays(list(columns.values()), names=list(columns))
    table = table.replace_schema_metadata({"fedps": json.dumps(meta)})
    fs, path = filesystem(uri)
    pq.write_table(table, path + ".tmp", filesystem=fs)
    make_private(fs, path + ".tmp", PRIVATE_FILE)
    fs.move(path + ".tmp", path)
    return fs.get_file_info(path).size


def _matrix(column: pa.ChunkedArray, width: int, dtype: np.dtype) -> np.ndarray:
    flat = _numpy(column.combine_chunks().flatten())
    return flat.astype(dtype, copy=False).reshape(-1, width)


def read_rows(
    uris: list[str], spec: TableSpec, keep: Callable[[np.ndarray], np.ndarray]
) -> tuple[np.ndarray, np.ndarray, dict[str, np.ndarray]]:
    """Rows in ``uris`` whose keys ``keep`` selects, sorted by key."""
    parts = []
    for uri in uris:
        fs, path = filesystem(uri)
        with fs.open_input_file(path) as source:
            parts.append(pq.ParquetFile(source).read())
    table = pa.concat_tables(parts)
    keys = _numpy(table.column("key").combine_chunks())
    chosen = np.flatnonzero(keep(keys))
    order = chosen[np.argsort(keys[chosen], kind="stable")]
    dtype = np.dtype(spec.dtype)
    weights = _matrix(table.column("weights"), spec.width, dtype)[order]
    state = {}
    for name in table.column_names:
        if name.startswith("state."):
            column = table.column(name)
            width = column.type.list_size
            state[name[len("state.") :]] = _matrix(column, width, dtype)[order]
    return keys[order], weights, state


# --- manifests and the checkpoint folder ------------------------------------


def _write_json(fs: pafs.FileSystem, path: str, value: dict) -> None:
    with fs.open_output_stream(path + ".tmp") as out:
        out.write(json.dumps(value, indent=1, sort_keys=True).encode())
    make_private(fs, path + ".tmp", PRIVATE_FILE)
    fs.move(path + ".tmp", path)


def commit(root: str, tmp: str, step: int, tables: dict[str, Any]) -> str:
    """Write the manifest into ``tmp`` and rename it to the step's folder; return its URI."""
    fs, root_path = filesystem(root)
    manifest = {"format": FORMAT, "step": step, "written_at": time.time(), "tables": tables}
    _write_json(fs, f"{root_path}/{tmp}/{MANIFEST}", manifest)
    final = f"{root_path}/{step_dir(step)}"
    if fs.get_file_info(final).type != pafs.FileType.NotFound:
        fs.delete_dir(final)
    fs.move(f"{root_path}/{tmp}", final)
    log.info("checkpoint of step %d written to %s", step, join(root, step_dir(step)))
    return join(root, step_dir(step))


def read_manifest(root: str, step: int) -> dict | None:
    """The manifest of step ``step`` if that checkpoint is complete, else None."""
    fs, root_path = filesystem(root)
    folder = f"{root_path}/{step_dir(step)}"
    try:
        with fs.open_input_stream(f"{folder}/{MANIFEST}") as stream:
            manifest = json.loads(stream.read())
        if manifest.get("format") != FORMAT or manifest.get("step") != step:
            return None
        for table in manifest["tables"].values():
            for entry in table["files"]:
                info = fs.get_file_info(f"{folder}/{entry['path']}")
                if info.type != pafs.FileType.File or info.size != entry["bytes"]:
                    return None
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return manifest


def _folders(root: str) -> list[tuple[str, int, bool]]:
    """(name, step, is_tmp) of every checkpoint-like folder under ``root``."""
    fs, root_path = filesystem(root)
    selector = pafs.FileSelector(root_path, allow_not_found=True)
    found = []
    for info in fs.get_file_info(selector):
        if info.type != pafs.FileType.Directory:
            continue
        for pattern, is_tmp in ((_STEP_DIR, False), (_TMP_DIR, True)):
            match = pattern.match(info.base_name)
            if match:
                found.append((info.base_name, int(match.group(1)), is_tmp))
    return found


def complete_steps(root: str) -> list[int]:
    """Steps with a complete checkpoint under ``root``, oldest first."""
    steps = sorted(step for _, step, is_tmp in _folders(root) if not is_tmp)
    return [step for step in steps if read_manifest(root, step) is not None]


def prune(root: str, keep: int) -> None:
    """Keep the newest ``keep`` complete checkpoints; remove older ones and older debris."""
    complete = complete_steps(root)
    if not complete:
        return
    kept = set(complete[-keep:])
    newest = complete[-1]
    fs, root_path = filesystem(root)
    for name, step, _ in _folders(root):
        if step in kept and name == step_dir(step):
            continue
        if step <= newest:
            fs.delete_dir(f"{root_path}/{name}")
            log.info("removed old or incomplete checkpoint folder %s", name)
