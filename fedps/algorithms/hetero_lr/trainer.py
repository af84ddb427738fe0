"""The epochs of vertical LR on the executor runtime: tasks do the rows, drivers the sums.

Per epoch, every party runs one barrier stage (``train_epoch`` in each task)
and, beside it on the driver, the loop of batch steps (``Trainer.step``):
the task side pulls the step's weights from its own PS, computes ``u``,
runs steps 1–3 of :mod:`protocol` with the peer tasks of its partitions and
leaves its partials in the party's accumulator; the driver takes the
whole-batch sums, runs steps 4–5 with the peer drivers, pushes the gradient
and ends the step, which lets the tasks go on to the next batch. After the
epoch, the guest decides whether to stop, and an evaluation stage scores
the validation rows (the hosts' scores on those rows go to the guest: the
documented leakage of evaluation).

Before the first epoch (:func:`prepare`) each party resolves the automatic
settings: the batch size (it grows with the rows), its own row transform
(standardisation with statistics its tasks compute over its own training
rows, and the label-DP row clip), and on the guest the label-DP noise.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
from pathlib import Path
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

from fedps.algorithms.hetero_lr import model, protocol
from fedps.algorithms.hetero_lr.params import LRParams, TrainState
from fedps.algorithms.hetero_lr.setup import accountant, clip_norm, noise_multiplier, resolved
from fedps.algorithms.hetero_lr.protocol import INTERCEPT, Crypto, Partial, Port, Roles
from fedps.engine.vertical.accumulator import KEYED_CIPHER, PLAIN
from fedps.engine.vertical.job import VerticalJob
from fedps.engine.vertical.plan import auto_batch_size, batch_count, partition_batches, validation_rows
from fedps.engine.vertical.privacy import Accountant
from fedps.engine.vertical.scores import ScoreSummary
from fedps.engine.vertical.stage import TaskEnv
from fedps.engine.vertical.standardize import Moments, RowTransform, merge, moments
from fedps.errors import ConfigError, PeerError
from fedps.messaging.tags import Message, Scope, Tag

log = logging.getLogger(__name__)

#: How often the driver runs a failed stage again (its tasks resume at the PS's step).
STAGE_RETRIES = 2

STOP = Message("stop", "guest", "host", dict)                # after each epoch: converged or not
VALID_U = Message("valid_u", "host", "guest", np.ndarray)    # host scores of validation rows (per partition)


@dataclass(frozen=True)
class Plan:
    """What a task needs for one stage (picklable: shipped to the executors)."""

    job: str
    roles: Roles
    params: LRParams
    public: dict[str, int]             # every party's Paillier n
    own: tuple[int, int]               # this party's p, q: its own executors encrypt with CRT
    noise_seed: int                    # guest: seeds the noise on d (0 when there is none)
    w: Any                             # TableRef of the weights
    bias: Any | None                   # TableRef of the intercept (guest)
    features: int
    sparse: bool
    epoch: int = 0
    batches: int = 1
    transform: RowTransform | None = None   # this party's standardisation and row clip (dense)
    noise_std: float = 0.0                   # guest, label DP: std. dev. of the noise on each gradient

    @property
    def first_step(self) -> int:
        return self.epoch * self.batches


# --------------------------------------------------------------------------- executor side
_CRYPTO: dict[tuple, Crypto] = {}


def _crypto(plan: Plan) -> Crypto:
    """This worker's keys and fixed-base tables, built once per Python worker."""
    from phe import paillier

    key = (plan.roles.me, plan.own, tuple(sorted(plan.public.items())), plan.params.frac_bits)
    if key not in _CRYPTO:
        p, q = plan.own
        public = {name: paillier.PaillierPublicKey(n) for name, n in plan.public.items()}
        private = paillier.PaillierPrivateKey(public[plan.roles.me], p, q)
        _CRYPTO[key] = Crypto(private, public, plan.roles.me, plan.params.frac_bits)
    crypto = _CRYPTO[key]
    crypto.timings = {}
    return crypto


class _OnPartition:
    """A link seen as the transport of one partition (what :class:`Port` talks to)."""

    def __init__(self, link: Any, p: int) -> None:
        self.link, self.p = link, p

    def send(self, tag: Tag, value: Any) -> None:
        self.link.send(self.p, tag, value)

    def recv(self, tag: Tag) -> Any:
        return self.link.recv(self.p, tag)


def _ps_step(ref: Any) -> int:
    import ray

    client = ref.client()
    return int(ray.get(client.shards[0].describe.remote())["step"])


def _columns(rows: Any, idx: np.ndarray, plan: Plan) -> tuple[Any, np.ndarray]:
    """The batch's rows of this partition and the feature ids of their columns."""
    x = rows.x[idx]
    if not plan.sparse:
        if plan.transform is not None:
            x = plan.transform.apply(x)
        return x, np.arange(plan.features, dtype=np.int64)
    touched = np.unique(x.indices)
    return x[:, touched], rows.feature_keys[touched]


def _scores(plan: Plan, x: Any, keys: np.ndarray, step: int, dense_w: np.ndarray | None) -> np.ndarray:
    if dense_w is not None:
        w = dense_w
    else:
        w = plan.w.client().pull(keys, step=step)[:, 0] if len(keys) else np.zeros(0)
    u = np.asarray(x @ w).ravel()
    if plan.bias is not None:
        u = u + float(plan.bias.client().pull(model.ZERO, step=step)[0, 0])
    return u


def _with_intercept(x: Any, keys: np.ndarray, sparse: bool) -> tuple[Any, np.ndarray]:
    ones = np.ones((x.shape[0], 1))
    if sparse:
        from scipy import sparse as sp

        matrix = sp.hstack([x, sp.csr_matrix(ones)], format="csr")
    else:
        matrix = np.hstack([x, ones])
    return matrix, np.r_[keys, INTERCEPT]


def _older_than(epoch: int, batch: int) -> Callable[[Tag], bool]:
    def older(tag: Tag) -> bool:
        return (tag.phase == "setup"
                or (tag.phase == "train" and (tag.iteration, tag.batch) < (epoch, batch))
                or (tag.phase in ("epoch", "eval") and tag.iteration < epoch))
    return older


def train_epoch(env: TaskEnv, plan: Plan) -> dict[str, float]:
    """One task's batches of an epoch (resuming at the PS's step after a retry or a restart)."""
    crypto, roles, params = _crypto(plan), plan.roles, plan.params
    first = max(0, _ps_step(plan.w) - plan.first_step)
    if first >= plan.batches:
        return {}
    env.seek(plan.first_step + first)
    for link in env.links.values():
        link.drop(_older_than(plan.epoch, first))
    slices = {}
    for p in env.partitions:
        rows = env.rows(p)
        slices[p] = (rows, partition_batches(rows.row_keys, seed=params.seed, epoch=plan.epoch, partition=p,
                                             batches=plan.batches, validation_fraction=params.validation_fraction))
    for b in range(first, plan.batches):
        step = plan.first_step + b
        scope = Scope(plan.job, "train").at(iteration=plan.epoch, batch=b)
        with_loss = params.loss_every > 0 and b % params.loss_every == 0
        dense_w = None
        if not plan.sparse:
            with crypto.timed("pull"):
                dense_w = plan.w.client().pull(np.arange(plan.features, dtype=np.int64), step=step)[:, 0]
        for p in env.partitions:
            rows, plan_p = slices[p]
            idx = plan_p[b]
            partial = None
            if len(idx):
                transports = {peer: _OnPartition(link, p) for peer, link in env.links.items()}
                port = Port(transports, scope, p, crypto.timings)
                x, keys = _columns(rows, idx, plan)
                u = _scores(plan, x, keys, step, dense_w[keys] if dense_w is not None else None)
                if roles.is_guest:
                    noise = None
                    if params.d_noise:
                        rng = np.random.default_rng([plan.noise_seed, plan.epoch, b, p])
                        noise = rng.normal(0, params.d_noise, len(idx))
                    if plan.bias is not None:
                        x, keys = _with_intercept(x, keys, plan.sparse)
                    partial = protocol.guest_partition(port, crypto, roles, x, keys, rows.y[idx], u, noise, with_loss)
                else:
                    partial = protocol.host_partition(port, crypto, roles, x, keys, u, with_loss)
            env.record(step + 1, p)   # everything of step `step` on p is consumed
            _put(env, step, p, partial, with_loss=roles.is_guest and with_loss)
    return {"seconds": dict(crypto.timings), "refused": _refused(env)}


def _refused(env: TaskEnv) -> dict[str, dict[str, int]]:
    """Records this task's links refused (hostile or broken), per peer and reason, for metrics.json."""
    return {peer: dict(link.refused) for peer, link in env.links.items() if link.refused}


def _put(env: TaskEnv, step: int, p: int, partial: Partial | None, with_loss: bool) -> None:
    """Hand partition ``p``'s partials of ``step`` to the accumulator (None: an empty slice)."""
    acc = env.accumulator
    if partial is None:
        names = [("grad", KEYED_CIPHER), ("stats", PLAIN)] + ([("loss", KEYED_CIPHER)] if with_loss else [])
        for name, kind in names:
            acc.put(step, name, p, kind, None)
        return
    acc.put(step, "grad", p, KEYED_CIPHER, (partial.keys, partial.gradient.to_bytes()))
    if with_loss:
        acc.put(step, "loss", p, KEYED_CIPHER, (model.ZERO, partial.loss.to_bytes()))
    acc.put(step, "stats", p, PLAIN, {"rows": partial.rows, "plain_loss": partial.plain_loss})


def setup_rows(env: TaskEnv, plan: Plan, standardize: bool, export: str) -> tuple[Moments | None, int]:
    """Before training, per task: column sums of the training rows (the party's standardisation
    statistics) and, with ``export``, the validation rows' keys written there (one CSV per partition)."""
    import os

    parts, written = [], 0
    for p in env.partitions:
        rows = env.rows(p)
        valid = validation_rows(rows.row_keys, plan.params.validation_fraction, plan.params.seed)
        if standardize:
            parts.append(moments(rows.x[~valid], plan.features))
        if export:
            os.makedirs(export, exist_ok=True)
            np.savetxt(os.path.join(export, f"part-{p:05d}.csv"), rows.row_keys[valid], fmt="%d", header="row_key",
                       comments="")
            written += int(valid.sum())
    return (merge(parts, plan.features) if standardize else None), written


def evaluate_epoch(env: TaskEnv, plan: Plan) -> ScoreSummary | None:
    """Score the validation rows: hosts send theirs to the guest, who summarises them."""
    roles, params = plan.roles, plan.params
    step = plan.first_step + plan.batches
    env.seek(step)
    for link in env.links.values():
        # this epoch's training and older are done; a peer already in the next epoch keeps its messages
        link.drop(lambda tag: (tag.phase == "train" and tag.iteration <= plan.epoch)
                  or (tag.phase == "eval" and tag.iteration < plan.epoch))
    scope = Scope(plan.job, "eval").at(iteration=plan.epoch)
    summary = ScoreSummary() if roles.is_guest else None
    dense_w = None if plan.sparse else plan.w.client().pull(np.arange(plan.features, dtype=np.int64),
                                                            step=step)[:, 0]
    for p in env.partitions:
        rows = env.rows(p)
        idx = np.flatnonzero(validation_rows(rows.row_keys, params.validation_fraction, params.seed))
        if len(idx):
            transports = {peer: _OnPartition(link, p) for peer, link in env.links.items()}
            port = Port(transports, scope, p)
            x, keys = _columns(rows, idx, plan)
            u = _scores(plan, x, keys, step, dense_w[keys] if dense_w is not None else None)
            if roles.is_guest:
                for host in roles.hosts:
                    u = u + np.asarray(port.recv(host, VALID_U), dtype=np.float64)
                summary.add(rows.y[idx], u)
            else:
                port.send(roles.guest, VALID_U, u)
        env.record(step, p)
    for link in env.links.values():
        link.flush()
    return summary


# --------------------------------------------------------------------------- driver side
@dataclass
class Trainer:
    """One party's epochs: the driver's batch steps beside each epoch's executor stage."""

    job: VerticalJob
    params: LRParams
    roles: Roles
    plan: Plan
    crypto: Crypto
    state: TrainState = field(default_factory=TrainState)
    summary: ScoreSummary | None = None
    task_seconds: dict[str, float] = field(default_factory=dict)
    refused: dict[str, dict[str, int]] = field(default_factory=dict)   # by the tasks' links
    accountant: Accountant | None = None     # label DP: what every party can account alike

    def __post_init__(self) -> None:
        if self.accountant is None:
            self.accountant = accountant(self.params)

    @property
    def batches(self) -> int:
        return batch_count(self.job.layout.rows, self.params.batch_size, self.params.validation_fraction)

    def run(self, on_batch: Callable[[TrainState], None] | None = None) -> TrainState:
        s, params = self.state, self.params
        while s.epoch < params.epochs and not s.done:
            epoch = s.epoch
            plan = dataclasses.replace(self.plan, epoch=epoch, batches=self.batches)
            self.job.drop(_older_than(epoch, s.batch))
            if s.batch < plan.batches:
                stage = self.job.stage(functools.partial(train_epoch, plan=plan), f"train-epoch-{epoch}")
                retries = STAGE_RETRIES
                b = s.batch
                while b < plan.batches:
                    try:
                        self.step(plan, b)
                    except PeerError:
                        if stage.settle(10.0):   # still running: the error is not the stage's
                            raise
                        if stage.retriable and retries > 0:
                            log.warning("%s: the %s stage failed (%s); running it again from step %d",
                                        self.roles.me, stage.name, stage.error.__class__.__name__, s.step)
                            retries -= 1
                            stage = stage.restart()
                            continue
                        stage.join()   # the stage's own error says more
                        raise
                    s.batch, s.step = b + 1, s.step + 1
                    b += 1
                    if params.checkpoint_every and s.step % params.checkpoint_every == 0:
                        self.save()
                    if on_batch is not None:
                        on_batch(s)
                self._add_timings(stage.join())
            self.end_epoch(plan)
        return s

    def save(self) -> None:
        self.job.save(self.state.step, dataclasses.asdict(self.state))

    def _add_timings(self, results: list[dict[str, Any]]) -> None:
        for result in results:
            for name, seconds in (result or {}).get("seconds", {}).items():
                self.task_seconds[name] = self.task_seconds.get(name, 0.0) + seconds
            for peer, reasons in (result or {}).get("refused", {}).items():
                mine = self.refused.setdefault(peer, {})
                for reason, count in reasons.items():
                    mine[reason] = mine.get(reason, 0) + count

    def step(self, plan: Plan, b: int) -> None:
        """Steps 4–5 of one batch on the driver, over the whole-batch sums."""
        job, roles, crypto = self.job, self.roles, self.crypto
        step = plan.first_step + b
        scope = Scope(plan.job, "train").at(iteration=plan.epoch, batch=b)
        port = Port(job.channels, scope, None, crypto.timings)
        owner = roles.hosts[0] if roles.is_guest else roles.guest
        key = crypto.public_keys[owner]
        stats = job.total(step, "stats")
        keys, grad = job.total(step, "grad", n=int(key.n))
        gradient = protocol.vector(grad, key)
        with_loss = self.params.loss_every > 0 and b % self.params.loss_every == 0
        if roles.is_guest:
            loss_total = job.total(step, "loss", n=int(key.n)) if with_loss else None
            loss = protocol.vector(loss_total[1], key) if loss_total is not None else None
            result, encrypted = protocol.guest_step(port, crypto, roles, gradient, loss, job.secret,
                                                    self._noise(plan, b))
            if encrypted is not None:
                self.state.batch_losses.append((stats["plain_loss"] + encrypted) / stats["rows"])
        else:
            result = protocol.host_step(port, crypto, roles, gradient, with_loss, job.secret)
        with crypto.timed("ps"):
            model.push(job.ps, np.asarray(keys, dtype=np.int64), result / stats["rows"])

    def _noise(self, plan: Plan, b: int) -> protocol.Noise | None:
        """The label-DP noise of batch ``b`` (seeded by the guest's secret: a replayed batch noises alike)."""
        if not self.plan.noise_std:
            return None
        names = [self.roles.guest, *self.roles.hosts]
        std = self.plan.noise_std

        def noise(party: str, length: int) -> np.ndarray:
            rng = np.random.default_rng([plan.noise_seed, 1, plan.epoch, b, names.index(party)])
            return rng.normal(0.0, std, length)

        return noise

    def _converged(self) -> bool:
        """Whether the change stayed under the tolerance ``patience`` epochs in a row (guest).

        Without label DP the change is the epoch loss's; with it, the relative change of the
        guest's weights, which are a function of noised releases only (the loss is not).
        """
        s, params = self.state, self.params
        if params.label_dp:
            w, b = model.weights(self.job.ps, self.plan.features, self.plan.bias is not None) \
                if not self.plan.sparse else (np.zeros(0), 0.0)
            now = np.r_[w, b]
            last = np.asarray(s.last_weights)
            change = (float(np.linalg.norm(now - last) / max(np.linalg.norm(now), 1e-12))
                      if last.shape == now.shape else math.inf)
            s.last_weights = now.tolist()
        else:
            change = abs(s.losses[-1] - s.losses[-2]) if len(s.losses) > 1 else math.inf
        s.calm = s.calm + 1 if change < params.tolerance else 0
        return params.patience > 0 and s.calm >= params.patience

    def _over_budget(self, epoch: int) -> bool:
        """Account the epoch just done; True when the next one would pass the budget and the job stops."""
        if self.accountant is None:
            return False
        params = self.params
        self.state.epsilon = self.accountant.epsilon(epoch + 1)
        if epoch + 1 >= params.epochs or self.accountant.epsilon(epoch + 2) <= params.dp_epsilon * (1 + 1e-9):
            return False
        if params.dp_on_budget == "stop":
            log.warning("%s: label-DP budget: another epoch would spend epsilon %.3f > dp_epsilon %g at "
                        "delta %g; stopping after epoch %d", self.roles.me, self.accountant.epsilon(epoch + 2),
                        params.dp_epsilon, params.dp_delta, epoch + 1)
            return True
        log.warning("%s: label-DP budget passed: epsilon %.3f > dp_epsilon %g after epoch %d "
                    "(dp_on_budget = warn: training on)", self.roles.me, self.accountant.epsilon(epoch + 2),
                    params.dp_epsilon, epoch + 2)
        return False

    def end_epoch(self, plan: Plan) -> None:
        s, params, roles = self.state, self.params, self.roles
        epoch = plan.epoch
        port = Port(self.job.channels, Scope(plan.job, "epoch").at(iteration=epoch), None, self.crypto.timings)
        last = epoch + 1 >= params.epochs
        evaluate = last or (params.evaluate_every and (epoch + 1) % params.evaluate_every == 0)
        over_budget = self._over_budget(epoch)
        if roles.is_guest:
            if s.batch_losses:
                s.losses.append(float(np.mean(s.batch_losses)))
            s.batch_losses = []
            converged = self._converged()
            stop = bool(converged or over_budget)
            for host in roles.hosts:
                port.send(host, STOP, {"stop": stop})
            if stop:
                s.stopped = "converged" if converged else "privacy budget"
        else:
            stop = bool(port.recv(roles.guest, STOP)["stop"])
        if (evaluate or stop) and params.validation_fraction > 0:
            stage = self.job.stage(functools.partial(evaluate_epoch, plan=plan), f"evaluate-epoch-{epoch}")
            results = stage.join()
            if roles.is_guest:
                summary = ScoreSummary()
                for part in results:
                    summary.merge(part)
                self.summary = summary
                s.metrics.append({"epoch": epoch + 1, **summary.metrics()})
        if roles.is_guest:
            log.info("epoch %d: loss %s", epoch + 1, f"{s.losses[-1]:.5f}" if s.losses else "n/a")
        s.done = stop
        s.epoch, s.batch = epoch + 1, 0


# --------------------------------------------------------------------------- setup of the automatic settings
def prepare(job: VerticalJob, params: LRParams, plan: Plan) -> tuple[LRParams, Plan]:
    """Resolve the automatic settings once the peers are known; returns the settings and the plan."""
    params = resolved(params, job.layout.rows)
    counts = {job.me: plan.features, **{peer: int(info.get("features", 0)) for peer, info in job.peers.items()}}
    floor = math.ceil(params.min_batch_ratio * max(counts.values()))
    train = int(job.layout.rows * (1 - params.validation_fraction))
    if params.batch_size == 0:
        params = dataclasses.replace(params, batch_size=auto_batch_size(job.layout.rows, params.validation_fraction,
                                                                        floor))
        if params.batch_size > train:
            raise ConfigError(f"only {train} training rows: too few for the privacy floor of {floor} rows per batch "
                              f"(min_batch_ratio {params.min_batch_ratio} x {max(counts.values())} features)")
        log.info("%s: batch size %d (automatic: %d training rows)", job.me, params.batch_size, train)
    sparse = job.layout.sparse or any(info.get("sparse") for info in job.peers.values())
    if params.label_dp and sparse:
        raise ConfigError("label differential privacy with sparse features is not yet supported: set "
                          "job.params.label_dp = false (and d_noise) for sparse data")
    transform, standardize = None, params.standardize and not plan.sparse
    export = (str(Path(job.records.folder).parent / "validation_rows")
              if params.export_validation and params.validation_fraction > 0 else "")
    if standardize or export:   # one stage on every party at the same point, before training
        results = job.stage(functools.partial(setup_rows, plan=dataclasses.replace(plan, params=params),
                                              standardize=standardize, export=export), "setup-rows").join()
        if export:
            log.info("%s: the keys of %d validation rows are in %s", job.me, sum(r[1] for r in results), export)
        if standardize:
            transform = RowTransform.from_moments(merge([r[0] for r in results], plan.features),
                                                  clip_norm(params, plan.features))
    if transform is None and not plan.sparse and clip_norm(params, plan.features):
        transform = RowTransform.identity(plan.features, clip_norm(params, plan.features))
    sigma = noise_multiplier(params)
    noise_std = 0.0
    if sigma and job.is_guest:
        square = sum(clip_norm(params, f) ** 2 for f in counts.values()) + (1.0 if plan.bias is not None else 0.0)
        noise_std = sigma * math.sqrt(square)
        log.info("%s: label DP on: noise multiplier %.3f (epsilon %g at delta %g over %d epochs), noise std. "
                 "dev. %.3f per gradient entry", job.me, sigma, params.dp_epsilon, params.dp_delta,
                 params.epochs, noise_std)
    if not params.label_dp:
        log.warning("%s: label differential privacy is OFF (job.params.label_dp = false): hosts' gradients carry "
                    "no noise, and a host can infer labels from them (docs/protocols.md)", job.me)
    return params, dataclasses.replace(plan, params=params, transform=transform, noise_std=noise_std)
