"""The operations endpoint of a serving process, plain HTTP on its own address:
``GET /healthz`` (the process is up), ``GET /readyz`` (it takes requests: 503
while it starts or drains), ``GET /metrics`` (Prometheus text) and
``POST /reload`` (load the model folder again; 409 with the reason if the new
model is refused, and the old one keeps serving). Keep it on loopback or an
operations network: it is not authenticated."""

from __future__ import annotations

import json
import logging
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Callable

log = logging.getLogger(__name__)


class OpsServer:
    def __init__(self, address: str, status: Callable[[], tuple[bool, dict]], metrics: Callable[[], str],
                 reload: Callable[[], dict]) -> None:
        host, _, port = address.rpartition(":")

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 - http.server's naming
                if self.path == "/healthz":
                    self._send(200, "text/plain", b"ok\n")
                elif self.path == "/readyz":
                    ready, body = status()
                    self._send(200 if ready else 503, "application/json", json.dumps(body).encode())
                elif self.path == "/metrics":
                    self._send(200, "text/plain; version=0.0.4", metrics().encode())
                else:
                    self._send(404, "text/plain", b"not found\n")

            def do_POST(self) -> None:  # noqa: N802
                if self.path != "/reload":
                    self._send(404, "text/plain", b"not found\n")
                    return
                try:
                    body, code = reload(), 200
                except Exception as exc:  # noqa: BLE001 - a refused model is an answer, not a crash
                    body, code = {"error": f"{type(exc).__name__}: {exc}"}, 409
                self._send(code, "application/json", json.dumps(body).encode())

            def _send(self, code: int, kind: str, body: bytes) -> None:
                self.send_response(code)
                self.send_header("Content-Type", kind)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, fmt: str, *args: object) -> None:
                log.debug("ops: " + fmt, *args)

        self.httpd = ThreadingHTTPServer((host or "127.0.0.1", int(port)), Handler)
        self.httpd.daemon_threads = True
        self.port = self.httpd.server_address[1]
        self._thread = threading.Thread(target=self.httpd.serve_forever, name="fedps-serving-ops", daemon=True)

    def start(self) -> "OpsServer":
        self._thread.start()
        return self

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
