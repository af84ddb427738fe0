"""The vertical-job skeleton: what every vertical algorithm does the same way.

``VerticalJob.open`` takes a party from its configuration to the first
step of training, in this order (docs/operations.md, "Executor stages"; docs/protocols.md, "Where each step runs"):

1. the layout of its rows (``fedps.engine.layout``), built once and reused;
2. its setup record (Paillier key pair and mask secret), persisted before
   anything is announced, so a party killed at any instant restarts with
   the same keys;
3. either the last step checkpoint (PS rows, channel and link positions,
   peers' keys, the algorithm's state), or, with none, a replay of setup
   from the start of its topics;
4. the layout check with every peer (counts and digests per partition:
   nothing else is compared before it), then one setup message per peer
   (public key, shared settings, the algorithm's announcement), checked;
5. its parameter server, its accumulator actor and the per-partition links.

The algorithm then runs its epochs with :meth:`stage` (per-row work on the
executors), :meth:`total` (a step's results, summed inside the party) and
:meth:`save` (a step checkpoint), and writes its report.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from fedps.engine.crypto import PublicKey
from fedps.engine.vertical.accumulator import start_accumulator
from fedps.engine.vertical.checkpoint import JobRecords
from fedps.engine.vertical.stage import FAIL_ONCE_ENV, Stage, StageSpec, TaskEnv, slots
from fedps.errors import ConfigError
from fedps.messaging.state import Position
from fedps.messaging.tags import Message, Scope, Tag
from fedps.ps.config import PSConfig, TableSpec
from fedps.ps.server import ParameterServer

if TYPE_CHECKING:
    from fedps.engine.layout import Layout

log = logging.getLogger(__name__)

HELLO = Message("vertical_setup", "any", "any", dict)   # public key, shared settings, announcement


@dataclass(frozen=True)
class JobSpec:
    """What an algorithm tells the skeleton about itself."""

    algorithm: str
    key_bits: int
    shared: dict[str, Any]                 # settings every party must have alike
    announce: dict[str, Any] = field(default_factory=dict)   # this party's facts for its peers
    tables: tuple[TableSpec, ...] = ()
    ps_shards: int = 1
    ps_wait_s: float = 3600.0
    max_tasks: int = 0                     # 0: as many tasks as Spark has slots (at most N)
    namespace: str = "fedps"


class VerticalJob:
    """One party of a vertical job, set up (or restored) and ready for its epochs."""

    def __init__(self, *, job: str, me: str, guest: str, hosts: list[str], channels: dict[str, Any],
                 spark: Any, layout: Layout, records: JobRecords, spec: JobSpec) -> None:
        self.job, self.me, self.guest, self.hosts = job, me, guest, hosts
        self.channels, self.spark, self.layout, self.records, self.spec = channels, spark, layout, records, spec
        self.private_key: Any = None
        self.public_keys: dict[str, PublicKey] = {}
        self.secret = b""
        self.peers: dict[str, dict[str, Any]] = {}      # each peer's announcement
        self.restored: dict[str, Any] | None = None     # the step record resumed from
        self.ps: ParameterServer | None = None
        self.stage_spec: StageSpec | None = None
        self._accumulator: Any = None

    @property
    def is_guest(self) -> bool:
        return self.me == self.guest

    @property
    def partitions(self) -> int:
        return self.layout.partitions

    @property
    def step(self) -> int:
        return self.restored["step"] if self.restored else 0

    # ------------------------------------------------------------------ setup
    @classmethod
    def open(cls, **kwargs: Any) -> VerticalJob:
        job = cls(**kwargs)
        job._setup()
        return job

    def _setup(self) -> None:
        self.private_key, self.secret, restarted = self.records.setup(self.spec.key_bits)
        if self.private_key is not None:
            self.public_keys[self.me] = self.private_key.public_key
        self.restored = self.records.load_latest()
        scope = Scope(self.job, "setup")
        if self.restored is not None:
            for peer, position in self.restored["positions"].items():
                self.channels[peer].rewind(position)
            self.public_keys.update(self.restored["public_keys"])
            self.peers = self.restored["state"].get("_peers", {})
            log.info("%s resumed from the checkpoint of step %d", self.me, self.step)
        else:
            if restarted:   # killed during setup: replay it from the start of the topics
                for channel in self.channels.values():
                    channel.rewind(Position(channel.in_topic))
            self._exchange(scope)
        self._start_services()

    def _exchange(self, scope: Scope) -> None:
        from fedps.engine.layout import check_layout

        for peer, channel in sorted(self.channels.items()):
            check_layout(channel, scope, self.layout, peer, self.me)
        n = str(self.private_key.public_key.n) if self.private_key is not None else ""
        mine = {"n": n, "algorithm": self.spec.algorithm,
                "shared": self.spec.shared, **self.spec.announce}
        for channel in self.channels.values():
            channel.send(scope.tag(HELLO.name), mine)
        for peer, channel in sorted(self.channels.items()):
            theirs = HELLO.check(channel.recv(scope.tag(HELLO.name)))
            _agree(self.me, peer, mine, theirs)
            if theirs.get("n"):
                self.public_keys[peer] = PublicKey(int(theirs["n"]))
            self.peers[peer] = {k: v for k, v in theirs.items() if k not in ("n", "shared", "algorithm")}

    def _start_services(self) -> None:
        import ray

        from fedps.messaging.partitioned import ensure_topics, link_spec

        namespace = self.spec.namespace
        if self.spec.tables:
            config = PSConfig(name=f"{self.job}-{self.me}", tables=self.spec.tables,
                              num_shards=self.spec.ps_shards, namespace=namespace,
                              checkpoint_dir=self.records.ps_dir, wait_timeout_s=self.spec.ps_wait_s)
            self.ps = ParameterServer.start(config)
        self._accumulator, ref = start_accumulator(f"fedps-acc:{self.job}:{self.me}", namespace)
        if self.restored is not None:
            if self.ps is not None:
                self.ps.restore(self.step)
            ray.get(self._accumulator.restore_positions.remote(self.step, self.restored["links"]))
        links = {}
        for peer, channel in self.channels.items():
            links[peer] = link_spec(channel, self.partitions)
            ensure_topics(links[peer])
        env = {FAIL_ONCE_ENV: os.environ[FAIL_ONCE_ENV]} if FAIL_ONCE_ENV in os.environ else {}
        tasks = min(self.partitions, self.spec.max_tasks or slots(self.spark))
        self.stage_spec = StageSpec(self.layout, links, ref, tasks, env)
        log.info("%s: %d partitions on %d tasks", self.me, self.partitions, tasks)

    # ------------------------------------------------------------------ running
    def stage(self, work: Callable[[TaskEnv], Any], name: str) -> Stage:
        """Start ``work`` on every task of a barrier stage (in the background)."""
        import ray

        ray.get(self._accumulator.clear_failure.remote())
        return Stage(self.spark, self.stage_spec, work, name).start()

    def total(self, step: int, name: str, n: int = 0, timeout_s: float = 3600.0) -> Any:
        """The sum over every partition of ``name`` at ``step`` (ciphertexts added in the actor)."""
        import ray

        return ray.get(self._accumulator.total.remote(step, name, self.partitions, n, timeout_s))

    def publish(self, step: int, name: str, value: Any) -> None:
        """Hand a decision of the driver to this party's tasks (they ``fetch`` it from the accumulator)."""
        import ray

        ray.get(self._accumulator.publish.remote(step, name, value))

    def drop(self, predicate: Callable[[Tag], bool]) -> None:
        for channel in self.channels.values():
            channel.drop(predicate)

    def save(self, step: int, state: dict[str, Any]) -> None:
        """A step checkpoint: PS rows, positions of channels and links, the algorithm's state."""
        import ray

        for channel in self.channels.values():
            channel.flush()
        if self.ps is not None:   # an algorithm without PS tables (SecureBoost) keeps its state in ``state``
            self.ps.checkpoint()
        links = ray.get(self._accumulator.positions.remote(step))
        positions = {peer: channel.position() for peer, channel in self.channels.items()}
        self.records.save(step, {**state, "_peers": self.peers}, self.public_keys, positions, links)

    def stop(self) -> None:
        import ray

        if self.ps is not None:
            self.ps.stop()
        if self._accumulator is not None:
            try:
                ray.kill(self._accumulator)
            except Exception:  # noqa: BLE001 - already gone
                pass


def _agree(me: str, peer: str, mine: dict, theirs: dict) -> None:
    if theirs.get("algorithm") != mine["algorithm"]:
        raise ConfigError(f"{peer} runs job.algorithm {theirs.get('algorithm')!r} and {me} runs "
                          f"{mine['algorithm']!r}; both parties must run the same job")
    for key, value in mine["shared"].items():
        other = theirs.get("shared", {}).get(key)
        if other != value:
            raise ConfigError(f"job.params.{key} differs: {me} has {value!r}, {peer} has {other!r}; "
                              "both parties must agree")


def resolve(path: str, config_source: str) -> str:
    """A relative path from the configuration is relative to its file; URIs pass unchanged."""
    if "://" in path or os.path.isabs(path) or config_source == "<memory>":
        return path
    return str(Path(config_source).parent / path)

