"""The PSI's folders on any filesystem pyarrow reaches: local paths, ``file://``, ``hdfs://``, ``s3a://``.

A :class:`Folder` is a picklable location (a URI or a local path) that the
driver and the executors open the same way, through ``pyarrow.fs``. Every
file is committed atomically: written under a temporary name in the same
folder, then moved into place, so a reader (or a restarted party) sees the
whole file or none. On object stores where a move is a copy (S3), the copy is
still all-or-nothing for a reader.
"""

from __future__ import annotations

import json
import os
import re
import uuid
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import pyarrow as pa
import pyarrow.parquet as pq
from pyarrow import fs

from fedps.errors import DataError


@lru_cache(maxsize=16)
def _root(uri: str) -> tuple[Any, str]:
    try:
        return fs.FileSystem.from_uri(uri)
    except (pa.ArrowException, ValueError, OSError) as exc:
        raise DataError(f"cannot open {uri} with pyarrow: {exc}") from exc


def is_uri(location: str) -> bool:
    return "://" in str(location)


@dataclass(frozen=True)
class Folder:
    """A folder by location; ``child`` builds sub-folders, the other methods do I/O."""

    location: str

    @classmethod
    def at(cls, location: str | Path) -> Folder:
        text = str(location)
        return cls(text.rstrip("/") if is_uri(text) else os.path.abspath(text))

    def child(self, *names: str) -> Folder:
        return Folder("/".join([self.location, *names]))

    @property
    def local(self) -> Path | None:
        """The local path, for a plain path or a ``file://`` URI; else None."""
        if not is_uri(self.location):
            return Path(self.location)
        if self.location.startswith("file://"):
            return Path(urlparse(self.location).path)
        return None

    @property
    def spark_path(self) -> str:
        """The location as Spark's readers and writers take it (Hadoop scheme kept)."""
        return self.location

    def _fs(self) -> tuple[Any, str]:
        if not is_uri(self.location):
            return _root("file:///")[0], self.location
        parsed = urlparse(re.sub(r"^s3[an]://", "s3://", self.location))  # pyarrow spells S3 s3://
        filesystem, base = _root(f"{parsed.scheme}://{parsed.netloc}/")
        return filesystem, (base.rstrip("/") + "/" + parsed.path.lstrip("/")) if parsed.netloc else parsed.path

    # ------------------------------------------------------------------ queries
    def exists(self, name: str | None = None) -> bool:
        filesystem, path = self._fs()
        target = f"{path}/{name}" if name else path
        return filesystem.get_file_info(target).type != fs.FileType.NotFound

    def files(self, suffix: str = ".parquet") -> list[str]:
        """Paths (in this folder's filesystem) of its files ending in ``suffix``, sorted; [] if none."""
        filesystem, path = self._fs()
        if filesystem.get_file_info(path).type == fs.FileType.NotFound:
            return []
        infos = filesystem.get_file_info(fs.FileSelector(path, recursive=False))
        return sorted(i.path for i in infos if i.type == fs.FileType.File and i.base_name.endswith(suffix)
                      and not i.base_name.startswith((".", "_")))

    def subfolders(self) -> list[Folder]:
        """The folders directly in this one (not hidden), by name; [] if none."""
        filesystem, path = self._fs()
        if filesystem.get_file_info(path).type == fs.FileType.NotFound:
            return []
        infos = filesystem.get_file_info(fs.FileSelector(path, recursive=False))
        return [self.child(name) for name in sorted(i.base_name for i in infos if i.type == fs.FileType.Directory
                                                    and not i.base_name.startswith("."))]

    def schema(self) -> pa.Schema | None:
        """The schema of this folder's first Parquet file, or None if it has none."""
        filesystem, _ = self._fs()
        files = self.files()
        if not files:
            return None
        with pq.ParquetFile(files[0], filesystem=filesystem, coerce_int96_timestamp_unit="us") as first:
            return first.schema_arrow

    # ------------------------------------------------------------------ reading
    def read_text(self, name: str) -> str | None:
        filesystem, path = self._fs()
        try:
            with filesystem.open_input_stream(f"{path}/{name}") as stream:
                return stream.read().decode()
        except FileNotFoundError:
            return None

    def read_json(self, name: str) -> dict[str, Any] | None:
        text = self.read_text(name)
        if text is None:
            return None
        try:
            return json.loads(text)
        except ValueError:
            raise DataError(f"{self.location}/{name} is not valid JSON") from None

    def read_table(self, columns: list[str] | None = None) -> pa.Table | None:
        """Every Parquet file of this folder as one table, or None if it has none.

        Spark's INT96 timestamps are read in microseconds, Spark's own unit: in nanoseconds (pyarrow's
        default) a date outside 1677-2262, such as a 9999-12-31 sentinel, would come back wrong.
        """
        filesystem, _ = self._fs()
        files = self.files()
        if not files:
            return None
        return pa.concat_tables(pq.read_table(f, columns=columns, filesystem=filesystem,
                                              coerce_int96_timestamp_unit="us") for f in files)

    # ------------------------------------------------------------------ writing
    def make(self) -> Folder:
        filesystem, path = self._fs()
        filesystem.create_dir(path, recursive=True)
        return self

    def write_bytes(self, name: str, data: bytes, private: bool = False) -> None:
        """Write ``name`` atomically (temporary file, then move); ``private``: mode 0600 where local."""
        filesystem, path = self.make()._fs()
        temporary = f"{path}/.{name}.{uuid.uuid4().hex}.tmp"
        with filesystem.open_output_stream(temporary) as stream:
            stream.write(data)
        if private and self.local is not None:
            os.chmod(temporary, 0o600)
        filesystem.move(temporary, f"{path}/{name}")

    def write_json(self, name: str, value: dict[str, Any], private: bool = False) -> None:
        self.write_bytes(name, json.dumps(value, indent=2, sort_keys=True).encode(), private)

    def write_table(self, name: str, table: pa.Table, compression: str = "snappy") -> None:
        """Write one Parquet file atomically (``compression="none"`` for values that do not compress,
        such as curve points)."""
        filesystem, path = self.make()._fs()
        temporary = f"{path}/.{name}.{uuid.uuid4().hex}.tmp"
        pq.write_table(table, temporary, filesystem=filesystem, compression=compression)
        filesystem.move(temporary, f"{path}/{name}")

    def remove(self) -> None:
        """Delete the folder and everything in it (nothing if it does not exist)."""
        filesystem, path = self._fs()
        if filesystem.get_file_info(path).type != fs.FileType.NotFound:
            filesystem.delete_dir(path)

    def __str__(self) -> str:
        return self.location
