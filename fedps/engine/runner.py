"""Run one party of a federated job: open its channels, run its algorithm's role.

The algorithm is looked up by name: ``job.algorithm = "channel_demo"`` runs
``fedps.algorithms.channel_demo.run(context)``. (``engine`` never imports an
algorithm statically; the arrows point from algorithms down to engine.)
"""

from __future__ import annotations

import importlib
import json
import logging
import time
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedps.engine.config import FedpsConfig
from fedps.engine.session import start_ray, start_spark, stop_ray, stop_spark
from fedps.errors import ConfigError
from fedps.messaging.channel import Channel
from fedps.messaging.tags import Scope

log = logging.getLogger(__name__)


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
            self._spark = start_spark(self.config.spark, self.config.ray)
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
    return module.run


def run_party(config: FedpsConfig) -> dict[str, Any]:
    """Run this party's role of the configured job; returns its metrics.

    ``metrics.json`` is written also when the algorithm fails (with ``error``),
    and always says how many records each channel refused, per reason.
    """
    run = resolve_algorithm(config.job.algorithm)
    output = Path(config.party.output_dir or f"out/{config.job.id}/{config.party.name}")
    output.mkdir(parents=True, exist_ok=True)
    # An algorithm's own checks of its settings and folders, before any peer is waited for.
    preflight = getattr(importlib.import_module(f"fedps.algorithms.{config.job.algorithm}"), "preflight", None)
    if preflight is not None:
        preflight(config, output)
    channel_config = config.channel_config()
    started = time.perf_counter()
    channels: dict[str, Channel] = {}
    context = PartyContext(config, channels, output)
    try:
        with ExitStack() as stack:
            for peer in sorted(config.peers):
                channel = Channel(config.job.id, config.party.name, peer, channel_config)
                channels[peer] = stack.enter_context(channel.open())
            log.info("%s: channels open to %s in %.2fs", config.party.name, ", ".join(channels),
                     time.perf_counter() - started)
            stack.callback(context.close)
            run(context)
    except BaseException as exc:
        context.metrics["error"] = f"{type(exc).__name__}: {exc}"
        raise
    finally:
        _record_refusals(context)
        context.metrics.setdefault("wall_s", round(time.perf_counter() - started, 3))
        context.write_metrics()
    return context.metrics


def _record_refusals(context: PartyContext) -> None:
    """Put each channel's refused records into the metrics, and warn once if there were any."""
    refused = {peer: channel.refused_counts for peer, channel in context.channels.items()}
    context.metrics["refused_records"] = refused
    for peer, channel in context.channels.items():
        if refused[peer]:
            log.warning("%s: %s", context.me, channel.refused_summary())
