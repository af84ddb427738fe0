"""One shard of a parameter server: the Ray actor that stores rows and applies updates.

A shard holds its part of every table of the PS (one process per shard, not
per table) and the step state the tables share. ``Shard`` is a plain class
with ``async`` methods; ``start_shard`` makes it a named Ray actor (an asyncio
actor, so a pull can wait for a step barrier without blocking pushes). All work on keys is vectorised: a pull is one
lookup and one gather, a push one merge, one lookup-or-insert and one
optimizer call over the whole batch.
"""

from __future__ import annotations

import asyncio
import logging
import os
from typing import Any, Callable

import numpy as np

from fedps.errors import DataError, PeerError, ProtocolError
from fedps.ps import checkpoint
from fedps.ps.config import PSConfig, TableSpec
from fedps.ps.keys import initial_values, shard_of
from fedps.ps.optimizers import Rows, apply_update
from fedps.ps.sync import Clocks, StepBuffer, merge
from fedps.ps.table import make_rows

log = logging.getLogger(__name__)


def actor_name(ps_name: str, shard: int) -> str:
    """The Ray actor name of a shard: executors find shards by it."""
    return f"fedps-ps:{ps_name}:{shard}"


class _Table:
    """One table's rows on this shard and the pushes waiting for their step to end."""

    def __init__(self, spec: TableSpec, shard: int, num_shards: int) -> None:
        self.spec = spec
        self.rows = make_rows(spec, shard, num_shards)
        self.buffer = StepBuffer()


class Shard:
    """Shard ``shard`` of ``num_shards`` of every table of a PS, with the step state they share."""

    def __init__(self, config: PSConfig, shard: int) -> None:
        self.config = config
        self.shard = shard
        self.tables = {spec.name: _Table(spec, shard, config.num_shards) for spec in config.tables}
        self.step = 0
        self.clocks = Clocks(config.num_workers)
        self._changed: asyncio.Condition | None = None

    # --- reads and writes -------------------------------------------------

    async def pull(self, table: str, keys: np.ndarray, step: int | None = None) -> np.ndarray:
        """Rows of ``keys``; never-touched keys get their initial values (not stored)."""
        if step is not None:
            await self._wait_for_step(step)
        spec, rows = self._table(table).spec, self._table(table).rows
        slots = rows.find(keys)
        out = np.empty((keys.size, spec.width), dtype=rows.dtype)
        hit = slots >= 0
        out[hit] = rows.weights[slots[hit]]
        if not hit.all():
            out[~hit] = initial_values(keys[~hit], spec.initializer, spec.width, rows.dtype)
        return out

    async def push(
        self, table: str, keys: np.ndarray, grads: np.ndarray, step: int | None, worker: int, seq: int
    ) -> None:
        """Add a batch of gradients: buffered until the step ends, or applied now under staleness."""
        state = self._table(table)
        step = self.step if step is None else step
        if self.config.staleness:
            _apply(state, keys, grads, step)
            return
        if step < self.step:
            raise ProtocolError(
                f"push for step {step} arrived after the step ended (shard is at step {self.step}); "
                "a worker is late or was restarted without restoring"
            )
        # Merged (and so copied out of the object store) on arrival: deterministic per push.
        state.buffer.add(step, worker, seq, *merge(keys, grads))

    async def finish_step(self, worker: int, step: int) -> int:
        """Worker ``worker`` is done with ``step``; ends the step once every worker is."""
        self.clocks.finish(worker, step)
        if not self.config.staleness:
            while self.clocks.everyone_finished(self.step):
                self._commit(self.step)
        await self._notify()
        return self.step

    async def end_step(self, step: int) -> int:
        """The driver's barrier: apply step ``step`` of every table and move to the next step."""
        if step != self.step:
            raise ProtocolError(f"end_step({step}) but shard {self.shard} is at step {self.step}")
        self._commit(step)
        await self._notify()
        return self.step

    # --- checkpoints --------------------------------------------------------

    async def save(self, paths: dict[str, str]) -> dict[str, dict[str, Any]]:
        """Write each table's rows and optimizer state to Parquet at ``paths[table]``."""
        saved = {}
        for name, path in paths.items():
            state = self._table(name)
            if state.buffer.pending():
                raise ProtocolError(f"checkpoint of step {self.step} with unapplied pushes for {state.buffer.pending()}")
            keys, weights, columns = state.rows.export()
            meta = {"table": name, "shard": self.shard, "num_shards": self.config.num_shards, "step": self.step}
            size = checkpoint.write_rows(path, keys, weights, columns, meta)
            saved[name] = {"path": path, "rows": int(keys.size), "bytes": size}
        return saved

    async def load(self, paths: dict[str, list[str]], step: int) -> int:
        """Replace each table's rows with this shard's rows in ``paths[table]``; set the step."""
        loaded = 0
        for name, files in paths.items():
            state = self._table(name)
            keys, weights, columns = checkpoint.read_rows(files, state.spec, self._owner(state.spec))
            state.rows.load(keys, weights, columns)
            state.buffer = StepBuffer()
            loaded += int(keys.size)
        self.step = step
        self.clocks.reset(step)
        await self._notify()
        return loaded

    # --- introspection ----------------------------------------------------

    async def describe(self) -> dict[str, Any]:
        return {"config": self.config, "shard": self.shard, "step": self.step}

    async def stats(self, table: str) -> dict[str, int]:
        """Rows of ``table`` held here, their bytes, and this process's resident memory."""
        rows = self._table(table).rows
        return {"rows": rows.count, "nbytes": rows.nbytes(), "rss": _rss_bytes(), "step": self.step}

    async def dump(self, table: str) -> tuple[np.ndarray, np.ndarray, dict[str, np.ndarray]]:
        """Every row of ``table`` here in key order, with its optimizer state (for tests and export)."""
        return self._table(table).rows.export()

    # --- internals ----------------------------------------------------------

    def _table(self, name: str) -> _Table:
        try:
            return self.tables[name]
        except KeyError:
            raise DataError(f"ps {self.config.name} has no table {name!r}") from None

    def _owner(self, spec: TableSpec) -> Callable[[np.ndarray], np.ndarray]:
        """Selects the keys of ``spec`` that belong to this shard."""

        def mine(keys: np.ndarray) -> np.ndarray:
            return shard_of(keys, spec, self.config.num_shards) == self.shard

        return mine

    def _commit(self, step: int) -> None:
        for state in self.tables.values():
            pushed = state.buffer.take(step)
            if pushed is not None:
                _apply(state, *pushed, step)
        self.step = step + 1

    async def _wait_for_step(self, step: int) -> None:
        if self.config.staleness:
            ready: Callable[[], bool] = lambda: self.clocks.slowest() >= step - self.config.staleness
        else:
            ready = lambda: self.step >= step
        if ready():
            return
        changed = self._condition()
        async with changed:
            try:
                await asyncio.wait_for(changed.wait_for(ready), self.config.wait_timeout_s)
            except asyncio.TimeoutError:
                raise PeerError(
                    f"pull for step {step} waited {self.config.wait_timeout_s}s: shard {self.shard} is at step "
                    f"{self.step}, the slowest worker finished {self.clocks.slowest()} steps"
                ) from None

    def _condition(self) -> asyncio.Condition:
        if self._changed is None:
            self._changed = asyncio.Condition()
        return self._changed

    async def _notify(self) -> None:
        changed = self._condition()
        async with changed:
            changed.notify_all()


def _apply(state: _Table, keys: np.ndarray, grads: np.ndarray, step: int) -> None:
    """Apply summed gradients to a table: create missing rows, run the optimizer on the batch."""
    keys, grads = merge(keys, grads)
    if keys.size == 0:
        return
    rows = state.rows
    slots = rows.slots(keys)
    touched = Rows(rows.weights[slots], {n: a[slots] for n, a in rows.state.items()})
    apply_update(state.spec.optimizer, touched, grads, step)
    rows.weights[slots] = touched.weights
    for name, array in touched.state.items():
        rows.state[name][slots] = array


def _rss_bytes() -> int:
    try:
        with open("/proc/self/statm", encoding="ascii") as statm:
            return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError):
        return 0


def start_shard(config: PSConfig, shard: int) -> Any:
    """Create the named actor of ``shard`` (it holds that shard of every table); returns its handle."""
    import ray

    actor = ray.remote(Shard).options(
        name=actor_name(config.name, shard),
        namespace=config.namespace,
        num_cpus=config.shard_num_cpus,
        max_restarts=0,
    )
    return actor.remote(config, shard)
