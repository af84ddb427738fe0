"""The library's blackbox transport, served on loopback and carried over fedps's sealed link.

SecretFlow's link with ``link_type = "blackbox"`` never opens a socket to the
peer: it POSTs each message to a local transport service, and pulls the
peer's messages from it:

- ``POST /v1/interconn/chan/push``, header ``x-ptp-topic: <self>-<peer>``,
  body: one serialized message of the library (opaque here);
- ``POST /v1/interconn/chan/pop?timeout=<s>``, header ``x-ptp-topic:
  <peer>-<self>``: the next message from the peer, if one comes in time;
- both answer a ``TransportOutbound`` protobuf (``payload`` = 1, ``code`` = 2,
  ``message`` = 3; code ``E0000000000`` is OK).

:class:`Relay` is that service for one bucket of one party. A push is
answered at once (the message is queued); a sender thread packs every
message queued meanwhile into one frame (up to ``frame_bytes``) and sends
it on the bucket's partition of the PSI link (sealed, chunked, replays
dropped: ``fedps.messaging.partitioned``), as ``ot_frames`` at
``batch = 0, 1, 2, ...``; a receiver thread reads the peer's frames in that
order and queues their messages for the pops. So a round of the library
costs one broker round trip whatever the number of its messages, and the
HTTP connection is kept alive (HTTP/1.1). Requests must carry the token
given to this party's library process (``x-ptp-token``): another local
process cannot inject messages or read the peer's.
"""

from __future__ import annotations

import hmac
import logging
import queue
import socket
import struct
import threading
import time
from collections import deque
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable
from urllib.parse import parse_qs, urlsplit

from fedps.errors import PeerError, ProtocolError
from fedps.messaging.codec import Blob
from fedps.messaging.tags import Message, Scope

log = logging.getLogger(__name__)

PREFIX = "/v1/interconn/chan/"
OK, NOT_FOUND, BAD_REQUEST, FORBIDDEN = "E0000000000", "E0000000404", "E0000000400", "E0000000403"
FRAMES = Message("ot_frames", "either", "other", Blob)
BLOB_KIND = "ot.frames/1"
#: Longest a pop is held open (the library asks 1 s; an empty answer makes it ask again, and its
#: link waits for the last pop when it stops, so a short hold ends the bucket sooner).
MAX_POP_S = 0.25

Send = Callable[[Any, Any], None]            # (tag, value)
Recv = Callable[[Any, float], Any]           # (tag, timeout) -> value; PeerError when none came


def outbound(payload: bytes = b"", code: str = OK, message: str = "") -> bytes:
    """A ``TransportOutbound`` protobuf: fields 1 (bytes), 2 and 3 (strings), proto3 (empty omitted)."""
    out = bytearray()
    for number, value in ((1, payload), (2, code.encode()), (3, message.encode())):
        if value:
            out += _varint(number << 3 | 2) + _varint(len(value)) + value
    return bytes(out)


def parse_outbound(data: bytes) -> dict[str, Any]:
    """The fields of a ``TransportOutbound`` (for tests and the worker's checks)."""
    fields: dict[int, bytes] = {}
    i = 0
    while i < len(data):
        key, i = _read_varint(data, i)
        if key & 7 != 2:
            raise ProtocolError(f"TransportOutbound field {key >> 3} has wire type {key & 7}, expected 2")
        size, i = _read_varint(data, i)
        fields[key >> 3] = data[i:i + size]
        i += size
    return {"payload": fields.get(1, b""), "code": fields.get(2, b"").decode(),
            "message": fields.get(3, b"").decode()}


def pack(messages: list[bytes]) -> bytes:
    return b"".join(struct.pack(">I", len(m)) + m for m in messages)


def unpack(data: bytes) -> list[bytes]:
    messages, i = [], 0
    while i < len(data):
        if i + 4 > len(data):
            raise ProtocolError("an OT frame ends inside a message length")
        (size,) = struct.unpack_from(">I", data, i)
        if i + 4 + size > len(data):
            raise ProtocolError(f"an OT frame announces a message of {size} bytes past its end")
        messages.append(data[i + 4:i + 4 + size])
        i += 4 + size
    return messages


class Relay:
    """The blackbox transport of one party's library for one bucket (see the module docstring)."""

    def __init__(self, me: str, peer: str, scope: Scope, send: Send, recv: Recv, token: str,
                 frame_bytes: int = 8 << 20, wait_s: float = 3600.0) -> None:
        self.me, self.peer, self.scope, self.token = me, peer, scope, token
        self._send, self._recv = send, recv
        self.frame_bytes, self.wait_s = frame_bytes, wait_s
        self._out: queue.Queue[bytes | None] = queue.Queue()
        self._in: deque[bytes] = deque()
        self._arrived = threading.Condition()
        self._stop = threading.Event()
        self._errors: list[BaseException] = []
        self.stats = {"ot_pushed": 0, "ot_popped": 0, "ot_frames_sent": 0, "ot_frames_received": 0,
                      "ot_bytes_sent": 0, "ot_bytes_received": 0}
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self))
        self._server.daemon_threads = True
        self._threads = [threading.Thread(target=self._server.serve_forever, args=(0.1,), daemon=True,
                                          name="ot-relay-http"),
                         threading.Thread(target=self._sender, daemon=True, name="ot-relay-send"),
                         threading.Thread(target=self._receiver, daemon=True, name="ot-relay-recv")]

    @property
    def address(self) -> str:
        host, port = self._server.server_address[:2]
        return f"{host}:{port}"

    def start(self) -> Relay:
        for thread in self._threads:
            thread.start()
        return self

    def error(self) -> BaseException | None:
        """The first failure of the sender or receiver thread, if any."""
        return self._errors[0] if self._errors else None

    def close(self) -> None:
        """Send what the library pushed, then stop serving (the library has exited)."""
        self._out.put(None)
        self._threads[1].join(self.wait_s)
        self._stop.set()
        self._server.shutdown()
        self._server.server_close()
        self._threads[2].join(5)

    def __enter__(self) -> Relay:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --------------------------------------------------------------- HTTP side
    def push(self, topic: str, body: bytes) -> bytes:
        if topic != f"{self.me}-{self.peer}":
            return outbound(code=BAD_REQUEST, message=f"push to topic {topic!r}; this relay sends "
                                                      f"{self.me}-{self.peer} only")
        if self._stop.is_set() or self.error() is not None:
            return outbound(code=NOT_FOUND, message="the relay stopped")
        self._out.put(body)
        self.stats["ot_pushed"] += 1
        return outbound()

    def pop(self, topic: str, timeout_s: float) -> bytes:
        if topic != f"{self.peer}-{self.me}":
            return outbound(code=BAD_REQUEST, message=f"pop of topic {topic!r}; this relay receives "
                                                      f"{self.peer}-{self.me} only")
        with self._arrived:
            self._arrived.wait_for(lambda: self._in, timeout=max(0.0, min(timeout_s, MAX_POP_S)))
            if not self._in:
                return outbound()     # empty payload: the library asks again
            message = self._in.popleft()
        self.stats["ot_popped"] += 1
        return outbound(payload=message)

    def unpop(self, reply: bytes) -> None:
        """A pop's answer that could not be written (the library dropped the connection): keep its
        message first in line for the next pop, so that no message is lost."""
        message = parse_outbound(reply)["payload"]
        if message:
            with self._arrived:
                self._in.appendleft(message)
                self._arrived.notify()
            self.stats["ot_popped"] -= 1
            self.stats["ot_pop_retries"] = self.stats.get("ot_pop_retries", 0) + 1

    # --------------------------------------------------------------- link side
    def _sender(self) -> None:
        batch = 0
        try:
            while True:
                first = self._out.get()
                if first is None:
                    return
                messages, size, last = [first], len(first), False
                while size < self.frame_bytes:
                    try:
                        more = self._out.get_nowait()
                    except queue.Empty:
                        break
                    if more is None:
                        last = True
                        break
                    messages.append(more)
                    size += len(more)
                self._send(self.scope.at(batch=batch).tag(FRAMES.name),
                           FRAMES.check(Blob(BLOB_KIND, pack(messages))))
                batch += 1
                self.stats["ot_frames_sent"] += 1
                self.stats["ot_bytes_sent"] += size
                if last:
                    return
        except BaseException as exc:  # noqa: BLE001 - reported by error() to the bucket's server
            self._errors.append(exc)

    def _receiver(self) -> None:
        batch, deadline = 0, time.monotonic() + self.wait_s
        try:
            while not self._stop.is_set():
                try:
                    value = self._recv(self.scope.at(batch=batch).tag(FRAMES.name), 0.5)
                except PeerError as exc:
                    if not str(exc).startswith("timed out") or time.monotonic() > deadline:
                        raise
                    continue
                blob = FRAMES.check(value)
                if blob.kind != BLOB_KIND:
                    raise ProtocolError(f"an OT frame of kind {blob.kind!r}, expected {BLOB_KIND!r}")
                with self._arrived:
                    self._in.extend(unpack(bytes(blob.data)))
                    self._arrived.notify_all()
                batch += 1
                deadline = time.monotonic() + self.wait_s
                self.stats["ot_frames_received"] += 1
                self.stats["ot_bytes_received"] += len(blob.data)
        except BaseException as exc:  # noqa: BLE001 - reported by error() to the bucket's server
            self._errors.append(exc)


def _handler(relay: Relay) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"     # keep-alive: the library reuses its connection

        def setup(self) -> None:
            super().setup()
            self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

        def do_POST(self) -> None:  # noqa: N802 - the http.server name
            length = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(length) if length else b""
            url = urlsplit(self.path)
            topic = self.headers.get("x-ptp-topic", "")
            if not hmac.compare_digest(self.headers.get("x-ptp-token", ""), relay.token):
                reply = outbound(code=FORBIDDEN, message="wrong or missing x-ptp-token")
            elif url.path == PREFIX + "push":
                reply = relay.push(topic, body)
            elif url.path == PREFIX + "pop":
                timeout = parse_qs(url.query).get("timeout", ["1"])[0]
                reply = relay.pop(topic, float(timeout) if timeout.replace(".", "", 1).isdigit() else 1.0)
            else:
                reply = outbound(code=NOT_FOUND, message=f"no such path {url.path}")
            head = (f"HTTP/1.1 200 OK\r\nContent-Type: application/x-protobuf\r\n"
                    f"Content-Length: {len(reply)}\r\n\r\n").encode()
            try:
                self.wfile.write(head + reply)     # one write: no Nagle wait between head and body
                self.wfile.flush()
            except OSError as exc:                 # the library closed the connection (it stops, or gave up)
                log.debug("ot relay: could not answer %s: %s", url.path, exc)
                if url.path == PREFIX + "pop":
                    relay.unpop(reply)
                self.close_connection = True

        def handle(self) -> None:
            try:
                super().handle()
            except OSError as exc:                 # reset while reading a request: the library stopped
                log.debug("ot relay: connection ended: %s", exc)

        def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the http.server name
            log.debug("ot relay: " + format, *args)

    return Handler


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _read_varint(data: bytes, i: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if i >= len(data) or shift > 63:
            raise ProtocolError("a truncated protobuf varint")
        byte = data[i]
        value |= (byte & 0x7F) << shift
        i, shift = i + 1, shift + 7
        if not byte & 0x80:
            return value, i
