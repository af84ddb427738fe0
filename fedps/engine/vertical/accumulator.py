"""Where a party's executor tasks hand their per-partition results to their own driver.

One named Ray actor per party and job (in the party's own Ray, beside its PS
shards). Tasks ``put`` a partition's partial result of a step; a repeated put
of the same ``(step, name, partition)`` replaces the first, so a task retried
by Spark never counts twice. The driver asks for the ``total`` of a step:
ciphertext vectors are added *under encryption inside the actor* (DESIGN.md,
"No partial decrypts"), so neither the driver nor anybody else ever sees a
partition's partial statistic; plaintext statistics of the party's own data
are summed alike. Tasks also record, after each step, where their Kafka
links stand on every partition; the job checkpoint stores those positions.
"""

from __future__ import annotations

import asyncio
import logging
import os
from dataclasses import dataclass
from typing import Any

import numpy as np

from fedps.errors import PeerError

log = logging.getLogger(__name__)

#: Kinds of partial results.
CIPHER, KEYED_CIPHER, PLAIN = "cipher", "keyed", "plain"
#: Prefix of a kind whose partials an algorithm's own function adds (``"reduce:<module>:<function>"``,
#: called as ``function(values, n)`` inside the actor), e.g. encrypted histograms.
REDUCE = "reduce:"


def _sum_cipher(blobs: list[bytes], n: int) -> bytes:
    from fedps.engine.crypto import CipherVector
    from phe import paillier

    key = paillier.PaillierPublicKey(n)
    vectors = [CipherVector.from_bytes(b, key) for b in blobs]
    total = vectors[0]
    for vector in vectors[1:]:
        total = total + vector
    return total.to_bytes()


def _sum_keyed(parts: list[tuple[np.ndarray, bytes]], n: int) -> tuple[np.ndarray, bytes]:
    """Partials over different feature ids: the union of ids, ciphertexts multiplied per id."""
    from fedps.engine.crypto import CipherVector
    from phe import paillier

    key = paillier.PaillierPublicKey(n)
    vectors = [(np.asarray(k, dtype=np.int64), CipherVector.from_bytes(b, key)) for k, b in parts]
    keys = np.unique(np.concatenate([k for k, _ in vectors]))
    nsq = vectors[0][1].nsquare
    out: list[Any] = [None] * len(keys)
    frac = max(v.frac_bits for _, v in vectors)
    bound = 0
    for ids, vector in vectors:
        vector = vector.rescale(frac)
        bound += vector.bound
        for slot, c in zip(np.searchsorted(keys, ids).tolist(), vector.ciphertexts):
            out[slot] = c if out[slot] is None else out[slot] * c % nsq
    first = vectors[0][1].rescale(frac)
    total = CipherVector(first.public_key, out, len(keys), frac, bound)
    return keys, total.to_bytes()


def _reduce(kind: str, values: list[Any], n: int) -> Any:
    import importlib

    module, _, function = kind[len(REDUCE):].rpartition(":")
    if not module.startswith("fedps."):
        raise PeerError(f"accumulator kind {kind!r} does not name a fedps function")
    return getattr(importlib.import_module(module), function)(values, n)


def _sum_plain(values: list[dict]) -> dict:
    total: dict[str, Any] = {}
    for value in values:
        for name, v in value.items():
            total[name] = total[name] + v if name in total else v
    return total


class Accumulator:
    """Partial results of steps, by ``(step, name)`` and partition; an asyncio Ray actor."""

    def __init__(self) -> None:
        self._parts: dict[tuple[int, str], dict[int, tuple[str, Any]]] = {}
        self._positions: dict[int, dict[str, int]] = {}
        self._changed: asyncio.Condition | None = None
        self._failed = ""
        self._published: dict[tuple[int, str], Any] = {}

    def _condition(self) -> asyncio.Condition:
        if self._changed is None:
            self._changed = asyncio.Condition()
        return self._changed

    async def put(self, step: int, name: str, partition: int, kind: str, value: Any) -> None:
        self._parts.setdefault((step, name), {})[partition] = (kind, value)
        async with self._condition():
            self._condition().notify_all()

    async def publish(self, step: int, name: str, value: Any) -> None:
        """The driver hands a value of ``(step, name)`` to every task that fetches it (a decision)."""
        self._published[(step, name)] = value
        for old in [key for key in self._published if key[0] < step - 2]:
            del self._published[old]
        async with self._condition():
            self._condition().notify_all()

    async def fetch(self, step: int, name: str, timeout_s: float = 600.0) -> Any:
        """What the driver published as ``(step, name)``, waiting for it."""
        condition = self._condition()
        async with condition:
            try:
                await asyncio.wait_for(condition.wait_for(
                    lambda: self._failed or (step, name) in self._published), timeout_s)
            except asyncio.TimeoutError:
                raise PeerError(f"step {step}: the driver did not publish {name} within {timeout_s:g}s") from None
        if (step, name) not in self._published:
            raise PeerError(self._failed)
        return self._published[(step, name)]

    async def record_positions(self, step: int, positions: dict[str, int]) -> None:
        """Link positions (``"<peer>/<partition>" -> offset``) from which step ``step`` can be replayed."""
        self._positions.setdefault(step, {}).update(positions)

    async def positions(self, step: int) -> dict[str, int]:
        return dict(self._positions.get(step, {}))

    async def restore_positions(self, step: int, positions: dict[str, int]) -> None:
        self._positions = {step: dict(positions)}

    async def fail(self, message: str) -> None:
        """The stage failed: wake every waiting ``total`` with this message."""
        self._failed = message
        async with self._condition():
            self._condition().notify_all()

    async def clear_failure(self) -> None:
        self._failed = ""

    async def total(self, step: int, name: str, partitions: int, n: int = 0, timeout_s: float = 600.0) -> Any:
        """The sum over all ``partitions`` of ``(step, name)``, waiting for missing ones.

        Returns None when every partition put None (nothing to add: empty slices).
        """
        condition = self._condition()
        async with condition:
            try:
                await asyncio.wait_for(condition.wait_for(
                    lambda: self._failed or len(self._parts.get((step, name), {})) >= partitions), timeout_s)
            except asyncio.TimeoutError:
                have = sorted(self._parts.get((step, name), {}))
                raise PeerError(f"step {step}: {name} of partitions {have} arrived, but not of all "
                                f"{partitions} within {timeout_s:g}s") from None
        if self._failed:
            raise PeerError(self._failed)
        parts = self._parts.pop((step, name))
        values = [v for _, (kind, v) in sorted(parts.items()) if v is not None]
        kind = next(iter(parts.values()))[0]
        # forget positions older than the step: a checkpoint only needs recent ones
        for old in [s for s in self._positions if s < step - 2]:
            del self._positions[old]
        if not values:
            return None
        if kind == CIPHER:
            return _sum_cipher(values, n)
        if kind == KEYED_CIPHER:
            return _sum_keyed(values, n)
        if kind.startswith(REDUCE):
            return _reduce(kind, values, n)
        return _sum_plain(values)


@dataclass(frozen=True)
class AccumulatorRef:
    """Picklable handle for executors: the actor's name and the party's Ray."""

    name: str
    namespace: str
    address: str
    auth_mode: str = ""      # the driver's RAY_AUTH_MODE, as TableRef carries it

    def actor(self) -> Any:
        import ray

        from fedps.ps.client import _ensure_ray

        _ensure_ray(self.address, self.namespace, self.auth_mode)
        return ray.get_actor(self.name, namespace=self.namespace)

    def put(self, step: int, name: str, partition: int, kind: str, value: Any) -> None:
        import ray

        ray.get(self.actor().put.remote(step, name, partition, kind, value))

    def record_positions(self, step: int, positions: dict[str, int]) -> None:
        import ray

        ray.get(self.actor().record_positions.remote(step, positions))

    def positions(self, step: int) -> dict[str, int]:
        import ray

        return ray.get(self.actor().positions.remote(step))

    def fetch(self, step: int, name: str, timeout_s: float = 600.0) -> Any:
        import ray

        return ray.get(self.actor().fetch.remote(step, name, timeout_s))


def start_accumulator(name: str, namespace: str) -> tuple[Any, AccumulatorRef]:
    """Start the party's accumulator actor (replacing a dead one of the same name)."""
    import ray

    import time

    try:
        ray.kill(ray.get_actor(name, namespace=namespace))
    except ValueError:
        pass
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:   # ray.kill returns before the name is free
        try:
            ray.get_actor(name, namespace=namespace)
        except ValueError:
            break
        time.sleep(0.05)
    handle = ray.remote(num_cpus=0)(Accumulator).options(name=name, namespace=namespace,
                                                         max_concurrency=64).remote()
    ray.get(handle.positions.remote(0))
    address = ray.get_runtime_context().gcs_address
    return handle, AccumulatorRef(name, namespace, address, os.environ.get("RAY_AUTH_MODE", ""))
