"""The sealed frame: what one Kafka record carries.

    b"FPS" | version (1 byte) | kind (1 byte) | header length (2 bytes) | header
           | nonce (12 bytes) | ChaCha20-Poly1305 ciphertext of the chunk

The header is compact JSON: job, sender, receiver, tag, message id
``(epoch, seq)``, chunk index and count. Everything before the nonce is the
authenticated associated data, so none of it can be changed without the
receiver noticing. A *hello* frame carries a signed key-exchange message in
clear instead of a sealed chunk (its signature is its protection).
"""

from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

from fedps.errors import ProtocolError

MAGIC = b"FPS"
VERSION = 1
KIND_DATA = 1
KIND_HELLO = 2
NONCE_BYTES = 12
TAG_BYTES = 16
#: Room reserved in every record for the frame's own bytes.
MAX_OVERHEAD = 1024
_PREFIX = struct.Struct(">3sBBH")


class NotAFrame(ProtocolError):
    """A record that is not a fedps frame at all (no magic bytes, or no value)."""


class WrongVersion(ProtocolError):
    """A frame of a wire-format version this party does not speak."""


class ForeignMessage(ProtocolError):
    """A frame for another job, another receiver, or from an unexpected sender."""


class TamperedMessage(ProtocolError):
    """A frame whose seal does not verify: changed in transit, or sealed by another key."""


@dataclass(frozen=True)
class Frame:
    kind: int
    job: str
    sender: str
    receiver: str
    tag: str
    epoch: int
    seq: int
    chunk: int
    chunks: int
    associated: bytes
    nonce: bytes
    body: bytes

    @property
    def message_id(self) -> tuple[int, int]:
        return (self.epoch, self.seq)

    @property
    def frame_id(self) -> tuple[int, int, int]:
        return (self.epoch, self.seq, self.chunk)


def _prefix_and_header(kind: int, header: dict) -> bytes:
    text = json.dumps(header, separators=(",", ":"), ensure_ascii=True).encode()
    if len(text) + _PREFIX.size + NONCE_BYTES + TAG_BYTES > MAX_OVERHEAD:
        raise ProtocolError(f"message header of {len(text)} bytes is too long; shorten the tag")
    return _PREFIX.pack(MAGIC, VERSION, kind, len(text)) + text


def seal(
    key: bytes,
    *,
    job: str,
    sender: str,
    receiver: str,
    tag: str,
    epoch: int,
    seq: int,
    chunk: int,
    chunks: int,
    plaintext: bytes,
) -> bytes:
    """Build one sealed data frame."""
    header = {"job": job, "from": sender, "to": receiver, "tag": tag,
              "id": [epoch, seq], "chunk": [chunk, chunks]}
    associated = _prefix_and_header(KIND_DATA, header)
    nonce = os.urandom(NONCE_BYTES)
    return associated + nonce + ChaCha20Poly1305(key).encrypt(nonce, plaintext, associated)


def hello_frame(*, job: str, sender: str, receiver: str, body: bytes) -> bytes:
    header = {"job": job, "from": sender, "to": receiver, "tag": "", "id": [0, 0], "chunk": [0, 1]}
    return _prefix_and_header(KIND_HELLO, header) + bytes(NONCE_BYTES) + body


def parse(record: bytes) -> Frame:
    """Split a record into its parts; raises ProtocolError if it is not a fedps frame."""
    if not isinstance(record, (bytes, bytearray)):
        raise NotAFrame("record has no value; it is not a fedps frame")
    if len(record) < _PREFIX.size or record[:3] != MAGIC:
        raise NotAFrame(f"record of {len(record)} bytes is not a fedps frame (bad magic bytes)")
    _, version, kind, length = _PREFIX.unpack_from(record)
    if version != VERSION:
        raise WrongVersion(
            f"frame has wire-format version {version}; this party speaks version {VERSION}"
        )
    end = _PREFIX.size + length
    if kind not in (KIND_DATA, KIND_HELLO) or len(record) < end + NONCE_BYTES:
        raise TamperedMessage("frame is truncated or of an unknown kind")
    try:
        header = json.loads(record[_PREFIX.size : end])
        epoch, seq = (int(v) for v in header["id"])
        chunk, chunks = (int(v) for v in header["chunk"])
        fields = (str(header["job"]), str(header["from"]), str(header["to"]), str(header["tag"]))
    except (ValueError, KeyError, TypeError) as exc:
        raise TamperedMessage(f"frame header is malformed: {exc}") from exc
    if not 0 <= chunk < chunks:
        raise TamperedMessage(f"frame has chunk {chunk} of {chunks}")
    return Frame(kind, *fields, epoch, seq, chunk, chunks, record[:end],
                 record[end : end + NONCE_BYTES], record[end + NONCE_BYTES :])


def check_route(frame: Frame, job: str, sender: str, receiver: str) -> None:
    if (frame.job, frame.sender, frame.receiver) != (job, sender, receiver):
        raise ForeignMessage(
            f"foreign message: it is addressed job {frame.job!r}, {frame.sender} -> "
            f"{frame.receiver}, but this channel is job {job!r}, {sender} -> {receiver}"
        )


def open_sealed(key: bytes, frame: Frame) -> bytes:
    """Verify and decrypt a data frame's chunk."""
    try:
        return ChaCha20Poly1305(key).decrypt(frame.nonce, frame.body, frame.associated)
    except InvalidTag:
        raise TamperedMessage(
            f"message {frame.tag or '(untagged)'} from {frame.sender!r} failed authentication: "
            "it was altered in transit or sealed with a key other than this channel's"
        ) from None
