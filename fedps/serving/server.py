"""A party's serving process: ``fedps serve --conf party.toml --model <output folder>``.

Starts the party's gRPC service (the public Guest API on the guest, the
mutual-TLS Host API on a host) and its operations endpoint, then waits:
SIGHUP (or ``POST /reload``) loads the model folder again without dropping a
request; SIGTERM or SIGINT stops taking requests (readiness turns 503), lets
those in flight finish within ``serving.grace_s``, and exits.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import threading
from concurrent import futures
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedps.engine.config import FedpsConfig
from fedps.errors import ConfigError
from fedps.serving.config import ServingConfig
from fedps.serving.metrics import Metrics
from fedps.serving.model import Models, load_model

log = logging.getLogger(__name__)


@dataclass
class Serving:
    """A started serving process's parts (also what tests and the bench drive in-process)."""

    me: str
    role: str
    server: Any
    ops: Any
    models: Models
    metrics: Metrics
    grace_s: float
    port: int
    closers: list[Any] = field(default_factory=list)
    service: Any = None
    draining: bool = False

    def status(self) -> tuple[bool, dict]:
        model = self.models.current
        ready = not self.draining
        return ready, {"ready": ready, "party": self.me, "role": self.role, "model_version": model.version,
                       "model_digest": model.digest, "versions": self.models.versions}

    def reload(self) -> dict:
        try:
            model = self.models.reload()
        except Exception:
            self.metrics.inc("reload_failures_total")
            raise
        self.metrics.inc("reloads_total")
        self.metrics.info.update(model_version=model.version, model_digest=model.digest)
        return {"model_version": model.version, "model_digest": model.digest, "versions": self.models.versions}

    def stop(self) -> None:
        """Refuse new requests, let those in flight finish (``grace_s``), close everything."""
        self.draining = True
        self.server.stop(self.grace_s).wait()
        for close in self.closers:
            close()
        self.ops.stop()


def _guest_of(config: FedpsConfig, serving: ServingConfig) -> str:
    if serving.guest:
        return serving.guest
    named = config.job.params.get("guest") if isinstance(config.job.params, dict) else None
    if named:
        return str(named)
    if len(config.peers) == 1:
        return next(iter(config.peers))
    raise ConfigError("serving.guest must name the guest when a host pins several peers")


def start(config: FedpsConfig, serving: ServingConfig, model_folder: str | Path) -> Serving:
    """Load the model, open the store and channels, bind the ports; returns the running parts."""
    import grpc

    from fedps.messaging.identity import load_identity, parse_public
    from fedps.serving.ops import OpsServer
    from fedps.serving.tls import PinnedTLS

    me, role = config.party.name, config.party.role
    if role not in ("guest", "host"):
        raise ConfigError(f"fedps serve runs a guest or a host, not a {role} (party.role)")
    if not config.party.identity_key:
        raise ConfigError(f"party.identity_key is not set in {config.source}")
    identity = load_identity(config.party.identity_key)
    pinned = {name: parse_public(text, name) for name, text in config.peers.items()}
    tls = PinnedTLS(me, identity, pinned)
    folder = Path(model_folder)
    first = load_model(folder, me)
    if first.version != config.job.id:
        raise ConfigError(f"--model {folder} holds the model of job {first.version!r}, but {config.source} "
                          f"is for job {config.job.id!r}: serve the output folder of job {config.job.id!r}")
    metrics = Metrics()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=serving.workers, thread_name_prefix="fedps-serve"),
                         options=[("grpc.so_reuseport", 0)])
    closers: list[Any] = []
    store = _store(serving) if serving.store else None
    if store is not None:
        closers.append(store.close)
    if role == "guest":
        service = _guest(me, config, serving, tls, store, metrics, closers)
    else:
        if store is None:
            raise ConfigError("a host serves its features from a store: set serving.store "
                              "(build one with `fedps serve --build-store`)")
        from fedps.serving.host import HostService

        service = HostService(me, _guest_of(config, serving), None, store, tls, metrics,  # type: ignore[arg-type]
                              serving.unknown_score, serving.max_rows, _masker(me, serving, identity, pinned))
    models = Models(first, lambda: load_model(folder, me), service.check)
    service.models = models
    server.add_generic_rpc_handlers((service.handlers(),))
    if role == "host":
        port = server.add_secure_port(serving.listen, tls.server_credentials([service.guest]))
    elif serving.public_cert:
        creds = grpc.ssl_server_credentials([(Path(serving.public_key).read_bytes(),
                                              Path(serving.public_cert).read_bytes())])
        port = server.add_secure_port(serving.listen, creds)
    else:
        port = server.add_insecure_port(serving.listen)
    if not port:
        raise ConfigError(f"serving.listen {serving.listen} could not be bound")
    metrics.info.update(party=me, role=role, model_version=first.version, model_digest=first.digest)
    running = Serving(me, role, server, None, models, metrics, serving.grace_s, port, closers, service)
    running.ops = OpsServer(serving.ops_listen, running.status, metrics.render, running.reload)
    server.start()
    running.ops.start()
    if serving.port_file:
        ports = Path(serving.port_file)
        ports.with_name(ports.name + ".tmp").write_text(json.dumps({"listen": port, "ops": running.ops.port,
                                                                    "pid": os.getpid()}))
        ports.with_name(ports.name + ".tmp").replace(ports)   # whole or absent, for whoever polls it
    log.info("%s serving model %s on port %d (ops on %d)", me, first.version, port, running.ops.port)
    return running


def _masker(me: str, serving: ServingConfig, identity: Any, pinned: dict[str, Any]) -> Any:
    from fedps.serving.masking import Masker, pair_key

    if not serving.mask_with:
        return None
    if me not in serving.mask_with:
        raise ConfigError(f"serving.mask_with must name this host ({me}) with the others")
    unpinned = [h for h in serving.mask_with if h != me and h not in pinned]
    if unpinned:
        raise ConfigError(f"serving.mask_with names {', '.join(unpinned)}, which [peers] does not pin: "
                          "hosts derive their mask keys from each other's pinned identities")
    keys = {h: pair_key(identity, me, h, pinned[h]) for h in serving.mask_with if h != me}
    return Masker(me, serving.mask_with, keys)


def _store(serving: ServingConfig) -> Any:
    from fedps.serving.store import SqliteStore

    return SqliteStore(serving.store)


def _guest(me: str, config: FedpsConfig, serving: ServingConfig, tls: Any, store: Any, metrics: Metrics,
           closers: list[Any]) -> Any:
    from fedps.serving.guest import GuestService
    from fedps.serving.keys import hasher, load_id_key

    if not serving.hosts:
        raise ConfigError("the guest needs serving.hosts: each host's name and gRPC address")
    unpinned = sorted(set(serving.hosts) - set(config.peers))
    if unpinned:
        raise ConfigError(f"serving.hosts names {', '.join(unpinned)}, which [peers] does not pin")
    channels = {name: tls.channel(name, address) for name, address in serving.hosts.items()}
    closers.extend(channel.close for channel in channels.values())
    key = load_id_key(serving.id_key_file) if serving.id_hash == "hmac" else None
    return GuestService(me, None, channels, hasher(serving.id_hash, key), store, metrics,
                        host_timeout_s=serving.host_timeout_s, on_host_failure=serving.on_host_failure,
                        max_rows=serving.max_rows)


def _freeze() -> None:
    """Move everything loaded so far out of the garbage collector's sight: a full collection of a
    serving process's ~80,000 start-up objects took 280 ms at a load average of 23 (measured): a pause in some request."""
    import gc

    gc.collect()
    gc.freeze()


def serve_forever(config: FedpsConfig, serving: ServingConfig, model_folder: str | Path) -> int:
    """Run until SIGTERM/SIGINT; SIGHUP reloads the model. Returns the exit status."""
    running = start(config, serving, model_folder)
    _freeze()
    wake, asked = threading.Event(), {"stop": False, "reload": False}

    def ask(what: str) -> Any:
        def handle(*_: object) -> None:
            asked[what] = True
            wake.set()
        return handle

    signal.signal(signal.SIGTERM, ask("stop"))
    signal.signal(signal.SIGINT, ask("stop"))
    signal.signal(signal.SIGHUP, ask("reload"))
    while not asked["stop"]:
        wake.wait(1.0)
        wake.clear()
        if asked["reload"]:
            asked["reload"] = False
            try:
                running.reload()
                _freeze()
            except Exception as exc:  # noqa: BLE001 - the old model keeps serving
                log.error("reload refused, still serving %s: %s", running.models.current.version, exc)
    log.info("%s draining (grace %.1fs)", running.me, running.grace_s)
    running.stop()
    log.info("%s stopped", running.me)
    return 0
