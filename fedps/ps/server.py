"""The driver's handle on a parameter server: start shards, end steps, checkpoint, restore.

``ParameterServer.start(config)`` creates one named actor per shard (holding
that shard of every table) in the configured Ray namespace. The driver ends each synchronous step with
``end_step()`` (the barrier: every shard applies that step's pushes) and gets
a checkpoint every ``checkpoint_every`` steps; ``checkpoint()`` and
``restore()`` also work on request. Executors reach tables through
``ref(table)``, a small picklable reference, and never need this object.
"""

from __future__ import annotations

import logging
import os
from typing import Any

from fedps.errors import DataError, PeerError
from fedps.ps import checkpoint
from fedps.ps.client import TableClient, TableRef, forget_clients
from fedps.ps.config import PSConfig, TableSpec
from fedps.ps.shard import actor_name, start_shard

log = logging.getLogger(__name__)


def _layout(spec: TableSpec) -> dict[str, Any]:
    """What a checkpoint's rows must agree on to be loaded into ``spec`` (settings may change)."""
    return {
        "kind": spec.kind,
        "width": spec.width,
        "dim": str(spec.dim),
        "dtype": spec.dtype,
        "optimizer": spec.optimizer.name,
    }


class ParameterServer:
    """All tables of one PS, as seen from the driver."""

    def __init__(self, config: PSConfig, shards: list[Any], step: int = 0) -> None:
        self.config = config
        self.shards = shards
        self.step = step
        self._clients = {spec.name: TableClient(config, spec, shards) for spec in config.tables}

    @classmethod
    def start(cls, config: PSConfig) -> "ParameterServer":
        """Create the shard actors (Ray must be connected); each holds its part of every table."""
        import ray

        try:
            ray.get_actor(actor_name(config.name, 0), namespace=config.namespace)
        except ValueError:
            pass
        else:
            raise PeerError(f"ps {config.name!r} already runs in namespace {config.namespace!r}; stop it first")
        server = cls(config, [start_shard(config, i) for i in range(config.num_shards)])
        ray.get([h.describe.remote() for h in server.shards])  # wait until all are up
        forget_clients()
        log.info("ps %s started: %d tables on %d shards", config.name, len(config.tables), config.num_shards)
        return server

    def table(self, name: str) -> TableClient:
        """The client of table ``name`` for use on the driver."""
        if name not in self._clients:
            raise DataError(f"ps {self.config.name} has no table {name!r}")
        return self._clients[name]

    def ref(self, name: str) -> TableRef:
        """A picklable reference to table ``name`` for Spark executors."""
        import ray

        self.table(name)
        address = ray.get_runtime_context().gcs_address
        auth_mode = os.environ.get("RAY_AUTH_MODE", "")
        return TableRef(self.config.name, name, self.config.namespace, address, auth_mode)

    def end_step(self) -> int:
        """Barrier: apply the current step's pushes on every shard; checkpoint when due."""
        import ray

        ray.get([h.end_step.remote(self.step) for h in self.shards])
        self.step += 1
        every = self.config.checkpoint_every
        if every and self.step % every == 0:
            self.checkpoint()
        return self.step

    def sync_step(self) -> int:
        """Read the step of the shards (after workers ended steps with ``finish_step``)."""
        import ray

        steps = {info["step"] for info in ray.get([h.describe.remote() for h in self.shards])}
        if len(steps) != 1:
            raise PeerError(f"shards disagree on the step: {sorted(steps)}; wait for the slowest worker")
        self.step = steps.pop()
        return self.step

    def checkpoint(self) -> str:
        """Write a checkpoint of the current step; returns its folder URI."""
        import ray

        root = self.config.checkpoint_dir
        if not root:
            raise DataError("ps.checkpoint_dir is not set; nowhere to write a checkpoint")
        tmp = checkpoint.tmp_dir(self.step)
        checkpoint.create_private_dir(checkpoint.join(root, tmp))   # 0700 on the local disk, as its files are 0600
        files = {
            spec.name: [f"{spec.name}/shard-{i:05d}.parquet" for i in range(self.config.num_shards)]
            for spec in self.config.tables
        }
        for spec in self.config.tables:
            checkpoint.create_private_dir(checkpoint.join(root, tmp, spec.name))
        saved = ray.get(
            [
                handle.save.remote({name: checkpoint.join(root, tmp, paths[i]) for name, paths in files.items()})
                for i, handle in enumerate(self.shards)
            ]
        )
        tables = {
            spec.name: {
                "num_shards": self.config.num_shards,
                "layout": _layout(spec),
                "spec": repr(spec),
                "files": [
                    {"path": path, "rows": saved[i][spec.name]["rows"], "bytes": saved[i][spec.name]["bytes"]}
                    for i, path in enumerate(files[spec.name])
                ],
            }
            for spec in self.config.tables
        }
        uri = checkpoint.commit(root, tmp, self.step, tables)
        checkpoint.prune(root, self.config.keep_checkpoints)
        return uri

    def restore(self, step: int | None = None) -> int:
        """Load the checkpoint of ``step`` (default: the last complete one); returns its step."""
        import ray

        root = self.config.checkpoint_dir
        complete = checkpoint.complete_steps(root) if root else []
        if step is None and not complete:
            raise DataError(f"no complete checkpoint under {root!r}")
        step = complete[-1] if step is None else step
        manifest = checkpoint.read_manifest(root, step)
        if manifest is None:
            raise DataError(f"no complete checkpoint of step {step} under {root!r}; complete ones: {complete}")
        folder = checkpoint.join(root, checkpoint.step_dir(step))
        per_shard: list[dict[str, list[str]]] = [{} for _ in self.shards]
        for spec in self.config.tables:
            entry = manifest["tables"].get(spec.name)
            if entry is None or entry["layout"] != _layout(spec):
                raise DataError(f"checkpoint of step {step} does not hold table {spec.name} as configured now")
            paths = [checkpoint.join(folder, f["path"]) for f in entry["files"]]
            same = entry["num_shards"] == self.config.num_shards
            for i, wanted in enumerate(per_shard):
                wanted[spec.name] = [paths[i]] if same else paths
        ray.get([handle.load.remote(wanted, step) for handle, wanted in zip(self.shards, per_shard)])
        self.step = step
        log.info("ps %s restored from the checkpoint of step %d", self.config.name, step)
        return step

    def stop(self, timeout_s: float = 30.0) -> None:
        """Kill every shard actor of this server and wait until their names are free again.

        ``ray.kill`` returns before the actor is gone; a server started right
        after under the same name (a restart) would otherwise find it still
        registered.
        """
        import time

        import ray

        for handle in self.shards:
            ray.kill(handle)
        forget_clients()
        deadline = time.monotonic() + timeout_s
        for shard in range(len(self.shards)):
            while time.monotonic() < deadline:
                try:
                    ray.get_actor(actor_name(self.config.name, shard), namespace=self.config.namespace)
                except ValueError:
                    break
                time.sleep(0.05)
        log.info("ps %s stopped", self.config.name)
