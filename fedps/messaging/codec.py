"""Values on the wire: numpy arrays through Arrow, JSON scalars and small dicts, typed blobs.

Nothing here ever unpickles: every decoder reads a declared, typed format, so a
malicious peer can at worst send a value of the wrong shape, which the
receiving protocol then refuses.

Layout of an encoded value: one type byte, then the payload.

- ``A``: a numpy array as an Arrow IPC stream of one column; shape and dtype in
  the schema metadata.
- ``J``: UTF-8 JSON of a scalar, string, list or dict with string keys.
- ``B``: a typed opaque blob: 2-byte kind length, the kind (UTF-8), the bytes.
  The crypto layer's ciphertext vectors travel this way; messaging never looks
  inside.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa

from fedps.errors import DataError, ProtocolError

_ARRAY, _JSON, _BLOB = b"A", b"J", b"B"
_NUMERIC_KINDS = "biuf"
#: Scalars and dicts are meant for control messages; bulk data goes in arrays or blobs.
MAX_JSON_BYTES = 1 << 20


@dataclass(frozen=True)
class Blob:
    """Opaque bytes with a kind (for example ``"paillier.vector/1"``)."""

    kind: str
    data: bytes

    def __post_init__(self) -> None:
        if not self.kind or len(self.kind.encode()) > 255:
            raise ValueError("blob kind must be 1-255 bytes of text")
        if not isinstance(self.data, (bytes, bytearray, memoryview)):
            raise TypeError(f"blob data must be bytes, got {type(self.data).__name__}")


def encode(value: Any) -> bytes:
    """Serialise a value for the wire; raises DataError for anything unsupported."""
    if isinstance(value, np.ndarray):
        return b"".join((_ARRAY, memoryview(_array_stream(value))))   # one copy of the Arrow stream
    if isinstance(value, Blob):
        kind = value.kind.encode()
        return b"".join((_BLOB, struct.pack(">H", len(kind)), kind, bytes(value.data)))
    if isinstance(value, np.generic):
        value = value.item()
    _check_json(value, "value")
    text = json.dumps(value, separators=(",", ":"), allow_nan=True).encode()
    if len(text) > MAX_JSON_BYTES:
        raise DataError(
            f"a {len(text)}-byte JSON value is too large for a control message; "
            "send bulk data as a numpy array or a Blob"
        )
    return _JSON + text


def encode_parts(value: Any) -> list[memoryview]:
    """:func:`encode` as buffers whose concatenation it is; an array's Arrow stream is not copied again."""
    if isinstance(value, np.ndarray):
        return [memoryview(_ARRAY), memoryview(_array_stream(value))]
    return [memoryview(encode(value))]


def decode(data: bytes) -> Any:
    """Inverse of :func:`encode`; raises ProtocolError on malformed input."""
    if not data:
        raise ProtocolError("empty message body")
    kind, body = data[:1], memoryview(data)[1:]
    try:
        if kind == _ARRAY:
            return _decode_array(body)
        if kind == _JSON:
            return json.loads(bytes(body))
        if kind == _BLOB:
            (length,) = struct.unpack(">H", body[:2])
            return Blob(bytes(body[2 : 2 + length]).decode(), bytes(body[2 + length :]))
    except (ValueError, TypeError, struct.error, pa.ArrowException) as exc:
        raise ProtocolError(f"malformed {kind!r} value: {exc}") from exc
    raise ProtocolError(f"unknown value type byte {kind!r}")


def _array_stream(array: np.ndarray) -> pa.Buffer:
    if array.dtype.kind not in _NUMERIC_KINDS:
        raise DataError(
            f"arrays of dtype {array.dtype} cannot be sent; use a numeric or bool dtype"
        )
    flat = np.ascontiguousarray(array).reshape(-1)
    if flat.dtype.byteorder == ">":
        flat = flat.astype(flat.dtype.newbyteorder("<"))
    metadata = {b"shape": json.dumps(list(array.shape)).encode(), b"dtype": flat.dtype.str.encode()}
    schema = pa.schema([pa.field("v", pa.from_numpy_dtype(flat.dtype))], metadata=metadata)
    batch = pa.record_batch([pa.array(flat)], schema=schema)
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, schema) as writer:
        writer.write_batch(batch)
    return sink.getvalue()


def _decode_array(body: memoryview) -> np.ndarray:
    table = pa.ipc.open_stream(pa.py_buffer(body)).read_all()
    metadata = table.schema.metadata or {}
    shape = tuple(json.loads(metadata[b"shape"]))
    dtype = np.dtype(metadata[b"dtype"].decode())
    if dtype.kind not in _NUMERIC_KINDS or not all(isinstance(n, int) and n >= 0 for n in shape):
        raise ValueError("array header names an unsupported dtype or shape")
    column = table.column(0)
    flat = column.to_numpy() if column.num_chunks else np.empty(0, dtype)
    return np.asarray(flat, dtype=dtype).reshape(shape)


def _check_json(value: Any, where: str, depth: int = 0) -> None:
    if depth > 16:
        raise DataError(f"{where} is nested too deeply to send")
    if value is None or isinstance(value, (bool, int, float, str)):
        return
    if isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            _check_json(item, f"{where}[{i}]", depth + 1)
        return
    if isinstance(value, dict):
        for key, item in value.items():
            if not isinstance(key, str):
                raise DataError(f"{where} has a non-string key {key!r}; dict keys must be strings")
            _check_json(item, f"{where}[{key!r}]", depth + 1)
        return
    raise DataError(
        f"{where} of type {type(value).__name__} cannot be sent: use a numpy array, "
        "a Blob, or JSON-compatible scalars, lists and dicts"
    )
