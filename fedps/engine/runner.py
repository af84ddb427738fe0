"""Run one party of a federated job: open its channels, run its algorithm's role.

The algorithm is looked up by name: ``job.algorithm = "channel_demo"`` runs
``fedps.algorithms.channel_demo.run(context)``. (``engine`` never imports an
algorithm statically; the arrows point from algorithms down to engine.)
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import logging
import threading
import time
import types
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedps.engine import agreement, jobs
from fedps.engine.config import FedpsConfig
from fedps.engine.session import start_ray, start_spark, stop_ray, stop_spark
from fedps.engine.preflight import exchange, public_reason, run_checks
from fedps.errors import ConfigError, FedpsError, PeerError
from fedps.messaging.channel import Channel
from fedps.messaging.control import PeerStopped, send_stopped
from fedps.messaging.tags import Scope

log = logging.getLogger(__name__)

#: How long a party whose own checks failed waits for each peer, to tell it why before it stops.
TELL_PEERS_S = 15.0
#: Longest wait for a peer's own checks (one pass over its inputs) after the channels open.
PEER_CHECKS_S = 3600.0


@dataclass
class PartyContext:
    """What an algorithm's role function gets: its configuration and open channels."""

    config: FedpsConfig
    channels: dict[str, Channel]
    output_dir: Path
    metrics: dict[str, Any] = field(default_factory=dict)
    _spark: Any = None
    _ray_address: str | None = None

    @property
    def spark(self) -> Any:
        """This party's SparkSession, started on first use from ``[spark]``."""
        if self._spark is None:
            # the JVM's banners and warnings go to spark.log, unless this process logs at INFO (-v)
            quiet = not logging.getLogger().isEnabledFor(logging.INFO)
            self._spark = start_spark(self.config.spark, self.config.ray,
                                      jvm_log=self.output_dir / "spark.log" if quiet else None)
        return self._spark

    @property
    def ray_address(self) -> str:
        """The GCS address of this party's Ray, started on first use from ``[ray]``."""
        if self._ray_address is None:
            self._ray_address = start_ray(self.config.ray)
        return self._ray_address

    def close(self) -> None:
        """Stop the sessions this context started."""
        if self._spark is not None:
            stop_spark(self._spark)
            self._spark = None
        if self._ray_address is not None:
            stop_ray()
            self._ray_address = None

    @property
    def me(self) -> str:
        return self.config.party.name

    @property
    def role(self) -> str:
        return self.config.party.role

    def scope(self, phase: str) -> Scope:
        return Scope(self.config.job.id, phase)

    def write_metrics(self) -> Path:
        path = self.output_dir / "metrics.json"
        path.write_text(json.dumps(self.metrics, indent=2, sort_keys=True))
        return path


def resolve_algorithm(name: str) -> Any:
    if not name.replace("_", "").isalnum():
        raise ConfigError(f"job.algorithm {name!r} is not a valid algorithm name")
    try:
        module = importlib.import_module(f"fedps.algorithms.{name}")
    except ModuleNotFoundError as exc:
        if exc.name == f"fedps.algorithms.{name}":
            raise ConfigError(f"job.algorithm {name!r} does not exist in fedps.algorithms") from None
        raise
    if not hasattr(module, "run"):
        raise ConfigError(f"algorithm {name!r} has no run(context) entry point")
    return module


def run_party(config: FedpsConfig) -> dict[str, Any]:
    """Run this party's role of the configured job; returns its metrics.

    Before any work the algorithm's ``preflight`` checks the party's whole job
    (its settings, then each input in one Spark pass, with the Spark session
    kept for the job); right after the channels open the parties exchange
    the outcome, so a mistake on either side stops both before the first
    protocol step. A party that stops on an error tells every peer why (one
    ``stopped`` control message: the kind and a sentence, never data).
    ``metrics.json`` is written also when the algorithm fails (with ``error``),
    and always says how many records each channel refused, per reason.
    """
    algorithm = resolve_algorithm(config.job.algorithm)
    output = Path(config.party.output_dir or f"out/{config.job.id}/{config.party.name}")
    output.mkdir(parents=True, exist_ok=True)
    channel_config = config.channel_config()
    if hasattr(algorithm, "channel_settings"):   # e.g. a smaller fetch bound where a party holds many channels
        channel_config = dataclasses.replace(channel_config, **algorithm.channel_settings(config))
    _record_job(config, "proposed", output)
    started = time.perf_counter()
    channels: dict[str, Channel] = {}
    context = PartyContext(config, channels, output)
    try:
        with ExitStack() as stack:
            stack.callback(context.close)
            checks, failed = _settings_checks(context)
            if failed is not None:   # tell the peers why, if they come soon; never wait long to stop
                channel_config = dataclasses.replace(
                    channel_config, handshake_timeout_s=min(channel_config.handshake_timeout_s, TELL_PEERS_S))
            # the key exchanges run while this party reads its inputs once, so a peer whose pass is
            # long does not time out waiting for this party's hello
            openers = {peer: _Opener(Channel(config.job.id, config.party.name, peer, channel_config))
                       for peer in sorted(config.peers)}
            try:
                if failed is None:
                    failed = _data_checks(context, checks)
                for peer, opener in openers.items():
                    opener.thread.join(None if failed is None else TELL_PEERS_S)
                    if opener.thread.is_alive() or isinstance(opener.error, PeerError) and failed is not None:
                        log.warning("%s: %s did not come within %gs to be told why this party stops",
                                    config.party.name, peer, TELL_PEERS_S)
                        raise failed
                    if opener.error is not None:
                        raise opener.error
                    channels[peer] = stack.enter_context(opener.channel)
                log.info("%s: channels open to %s in %.2fs", config.party.name, ", ".join(channels),
                         time.perf_counter() - started)
                if failed is not None:
                    raise failed
                exchange(channels, config.job.id, descriptor=agreement.descriptor(config),
                         timeout_s=max(channel_config.recv_timeout_s, PEER_CHECKS_S))
                _record_job(config, "running", output)
                algorithm.run(context)
            except BaseException as exc:
                _tell_peers(context, exc)
                raise
    except BaseException as exc:
        context.metrics["error"] = f"{type(exc).__name__}: {exc}"
        _record_job(config, "failed", output, error=" ".join(f"{type(exc).__name__}: {exc}".split())[:400])
        raise
    else:
        _record_job(config, "done", output)
    finally:
        _record_refusals(context)
        context.metrics.setdefault("wall_s", round(time.perf_counter() - started, 3))
        context.write_metrics()
    return context.metrics


def _record_job(config: FedpsConfig, state: str, output: Path, **fields: Any) -> None:
    """Keep ``fedps jobs`` current; a registry that cannot be written never stops a job."""
    try:
        jobs.record(config, state, output, **fields)
    except OSError as exc:
        log.warning("%s: could not record job state %s in %s: %s", config.party.name, state, jobs.home(), exc)


class _Opener:
    """Opens one channel in a thread of its own (the key exchange waits for the peer)."""

    def __init__(self, channel: Channel) -> None:
        self.channel, self.error = channel, None
        self.thread = threading.Thread(target=self._open, name=f"open-{channel.peer}", daemon=True)
        self.thread.start()

    def _open(self) -> None:
        try:
            self.channel.open()
        except BaseException as exc:  # noqa: BLE001 - raised by the runner's thread
            self.error = exc


def _settings_checks(context: PartyContext) -> tuple[list, FedpsError | None]:
    """The algorithm's checks of this party's settings; the input checks to run, or the error found."""
    config = context.config
    preflight = find_preflight(config.job.algorithm)
    if preflight is None:
        return [], None
    try:
        return list(preflight(config, context.output_dir) or []), None
    except FedpsError as exc:
        log.error("%s: %s", config.party.name, exc)
        return [], exc


def _data_checks(context: PartyContext, checks: list) -> FedpsError | None:
    """One Spark pass over each input (the session is kept for the job); the error found, if any."""
    if not checks:
        return None
    tick = time.perf_counter()
    try:
        context.metrics["inputs"] = run_checks(context.spark, checks)
    except FedpsError as exc:
        log.error("%s: %s", context.me, exc)
        return exc
    log.info("%s: checked its settings and %d input%s in %.1fs", context.me, len(checks),
             "" if len(checks) == 1 else "s", time.perf_counter() - tick)
    return None


def find_preflight(algorithm: str) -> Any:
    """``fedps.algorithms.<name>.preflight``: a function of the package, or of its ``preflight`` module."""
    found = getattr(importlib.import_module(f"fedps.algorithms.{algorithm}"), "preflight", None)
    if found is None:
        try:
            found = importlib.import_module(f"fedps.algorithms.{algorithm}.preflight")
        except ModuleNotFoundError as exc:
            if exc.name != f"fedps.algorithms.{algorithm}.preflight":
                raise
            return None
    if isinstance(found, types.ModuleType):
        found = getattr(found, "preflight", None)
    return found


def _tell_peers(context: PartyContext, exc: BaseException) -> None:
    """Send every open channel's peer the ``stopped`` message (not back to a peer that stopped)."""
    if isinstance(exc, PeerStopped):
        return
    reason = public_reason(exc)
    kind, _, text = reason.partition(": ")
    for channel in context.channels.values():
        send_stopped(channel, kind, text)


def _record_refusals(context: PartyContext) -> None:
    """Put each channel's refused records into the metrics, and warn once if there were any."""
    refused = {peer: channel.refused_counts for peer, channel in context.channels.items()}
    context.metrics["refused_records"] = refused
    for peer, channel in context.channels.items():
        if refused[peer]:
            log.warning("%s: %s", context.me, channel.refused_summary())
