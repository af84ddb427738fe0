"""The client of one table: batch ``pull`` and ``push`` of numpy arrays.

A client routes each key to its shard with one vectorised hash, sends one
request per shard in parallel and puts the answers back in the caller's order.
It works wherever Ray is connected: on the driver, and in a Spark executor,
where ``connect`` joins the cluster once per Python worker with
``ray.init(address=...)`` and finds the shard actors by name, so later tasks
in the same worker reuse both the connection and the handles.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any

import numpy as np

from fedps.errors import ConfigError, PeerError
from fedps.ps.config import PSConfig, TableSpec
from fedps.ps.keys import as_keys, as_rows, shard_of
from fedps.ps.shard import actor_name

log = logging.getLogger(__name__)

_CLIENTS: dict[tuple[str, str, str, str], "TableClient"] = {}


@dataclass(frozen=True)
class TableRef:
    """What an executor needs to reach a table: picklable, small, ship it in a closure.

    ``address`` is the Ray address to join when this process is not connected
    yet: a GCS ``host:port`` (a process on a Ray node, e.g. a Spark executor in
    local mode) or ``ray://host:10001`` (Ray client, from outside the cluster).
    ``auth_mode`` is the driver's ``RAY_AUTH_MODE``: Ray (2.5x and later) only
    turns token authentication on for an explicit address when that variable
    says so. The token itself is never shipped: it comes from
    ``~/.ray/auth_token``, ``RAY_AUTH_TOKEN_PATH`` or ``RAY_AUTH_TOKEN``.
    """

    ps_name: str
    table: str
    namespace: str
    address: str = ""
    auth_mode: str = ""

    def client(self) -> "TableClient":
        """The cached client of this table in this process (connecting if needed)."""
        return connect(self)


def _ensure_ray(address: str, namespace: str, auth_mode: str) -> None:
    import ray

    if ray.is_initialized():
        return
    if not address:
        raise ConfigError("Ray is not connected here and the table reference has no address to join")
    if auth_mode and "RAY_AUTH_MODE" not in os.environ:
        _set_auth_mode(auth_mode)
    log.info("joining ray at %s", address)
    ray.init(address=address, namespace=namespace, log_to_driver=False, logging_level=logging.WARNING)


def _set_auth_mode(mode: str) -> None:
    """Use the driver's authentication mode in a process that was started before Ray."""
    os.environ["RAY_AUTH_MODE"] = mode
    try:  # Ray caches its config on import; this is what ray.init does after setting the mode
        from ray._raylet import Config

        Config.initialize("")
    except (ImportError, AttributeError):
        log.warning("could not refresh Ray's config; set RAY_AUTH_MODE=%s in the executors' environment", mode)


def connect(ref: TableRef) -> "TableClient":
    """A client of ``ref``'s table, cached per process; joins Ray if this process has not."""
    key = (ref.ps_name, ref.table, ref.namespace, ref.address)
    client = _CLIENTS.get(key)
    if client is None:
        _ensure_ray(ref.address, ref.namespace, ref.auth_mode)
        client = TableClient.lookup(ref.ps_name, ref.table, ref.namespace)
        _CLIENTS[key] = client
    return client


def forget_clients() -> None:
    """Drop cached clients (after the server's actors were replaced)."""
    _CLIENTS.clear()


class TableClient:
    """Batch access to the shards of one table."""

    def __init__(self, config: PSConfig, spec: TableSpec, shards: list[Any]) -> None:
        self.config = config
        self.spec = spec
        self.shards = shards
        self.dtype = np.dtype(spec.dtype)

    @classmethod
    def lookup(cls, ps_name: str, table: str, namespace: str) -> "TableClient":
        """Find the shard actors of ``table`` by name (Ray must be connected)."""
        import ray

        try:
            first = ray.get_actor(actor_name(ps_name, 0), namespace=namespace)
            config: PSConfig = ray.get(first.describe.remote())["config"]
            shards = [first] + [
                ray.get_actor(actor_name(ps_name, i), namespace=namespace) for i in range(1, config.num_shards)
            ]
        except ValueError as exc:
            raise PeerError(f"no shards of ps {ps_name!r} in namespace {namespace!r}") from exc
        return cls(config, config.table(table), shards)

    def _call(self, method: str, args_per_shard: dict[int, tuple]) -> list[Any]:
        """Call ``method(table, *args)`` on the given shards in parallel.

        If a shard died (a restarted job replaced the actors), look the shards up
        by name again and send once more; synchronous pushes are idempotent per
        ``(worker, seq)``, so only bounded-staleness pushes are not resent.
        """
        import ray
        from ray.exceptions import RayActorError

        def send() -> list[Any]:
            name = self.spec.name
            return [getattr(self.shards[i], method).remote(name, *args) for i, args in args_per_shard.items()]

        try:
            return ray.get(send())
        except RayActorError:
            if method == "push" and self.config.staleness:
                raise  # applied on arrival: sending again could apply a batch twice
            log.warning("a shard of %s died; looking the shards up again", self.spec.name)
            self.shards = TableClient.lookup(self.config.name, self.spec.name, self.config.namespace).shards
            return ray.get(send())

    def _route(self, keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Permutation grouping keys by shard, and the group boundaries."""
        owner = shard_of(keys, self.spec, self.config.num_shards)
        order = np.argsort(owner, kind="stable")
        bounds = np.searchsorted(owner[order], np.arange(self.config.num_shards + 1))
        return order, bounds

    def _busy(self, bounds: np.ndarray) -> list[int]:
        return [i for i in range(self.config.num_shards) if bounds[i + 1] > bounds[i]]

    def pull(self, keys: object, step: int | None = None) -> np.ndarray:
        """Rows of ``keys`` as a ``(len(keys), width)`` array, in the order given.

        With ``step``, waits for that step's barrier (synchronous mode) or for the
        staleness bound (bounded-staleness mode) before reading.
        """
        keys = as_keys(keys, self.spec.dim)
        order, bounds = self._route(keys)
        grouped = keys[order]
        args = {i: (grouped[bounds[i] : bounds[i + 1]], step) for i in self._busy(bounds)}
        out = np.empty((keys.size, self.spec.width), dtype=self.dtype)
        for i, rows in zip(args, self._call("pull", args)):
            out[order[bounds[i] : bounds[i + 1]]] = rows
        return out

    def push(self, keys: object, grads: object, step: int | None = None, worker: int = 0, seq: int = 0) -> None:
        """Send gradients of ``keys`` (``(len(keys), width)``; equal keys are summed).

        In synchronous mode the shards buffer them until step ``step`` ends;
        ``(worker, seq)`` orders the pushes of a step and a repeated pair
        replaces the earlier push. Returns once every shard has the batch.
        """
        keys = as_keys(keys, self.spec.dim)
        grads = as_rows(grads, keys.size, self.spec.width, self.dtype)
        order, bounds = self._route(keys)
        grouped_keys, grouped_grads = keys[order], grads[order]
        args = {
            i: (grouped_keys[bounds[i] : bounds[i + 1]], grouped_grads[bounds[i] : bounds[i + 1]], step, worker, seq)
            for i in self._busy(bounds)
        }
        self._call("push", args)

    def finish_step(self, worker: int, step: int) -> None:
        """Tell every shard that ``worker`` is done with ``step`` (worker-driven barrier)."""
        import ray

        ray.get([shard.finish_step.remote(worker, step) for shard in self.shards])

    def stats(self) -> list[dict[str, int]]:
        """Per-shard rows, bytes of row storage and process memory."""
        return self._call("stats", {i: () for i in range(self.config.num_shards)})

    def dump(self) -> tuple[np.ndarray, np.ndarray, dict[str, np.ndarray]]:
        """Every stored row of the table in key order, with optimizer state."""
        parts = self._call("dump", {i: () for i in range(self.config.num_shards)})
        keys = np.concatenate([p[0] for p in parts])
        order = np.argsort(keys, kind="stable")
        weights = np.concatenate([p[1] for p in parts])[order]
        state = {name: np.concatenate([p[2][name] for p in parts])[order] for name in parts[0][2]}
        return keys[order], weights, state
