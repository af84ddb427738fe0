"""The training loop of every role: setup, mini-batches, evaluation, checkpoints.

The per-batch maths is in :mod:`protocol`; this module decides which rows form
a batch (the same seeded permutation on every side), when the loss and the
validation metrics are computed, when to stop, and what a checkpoint holds.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import math
import os
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

from fedps.algorithms.hetero_lr import protocol
from fedps.algorithms.hetero_lr.checkpoints import JobCheckpoint
from fedps.algorithms.hetero_lr.metrics import classification_metrics
from fedps.algorithms.hetero_lr.model import PartyModel
from fedps.algorithms.hetero_lr.params import LRParams, TrainState
from fedps.engine.crypto import PublicKey, generate_keypair
from fedps.errors import ConfigError, DataError
from fedps.messaging.tags import Message, Scope

log = logging.getLogger(__name__)

HELLO = Message("lr_setup", "any", "any", dict)          # public key, shape, shared settings
STOP = Message("stop", "guest", "host", dict)            # after each epoch: converged or not
VALID_U = Message("valid_u", "host", "guest", np.ndarray)    # host scores of validation rows


@dataclass
class PartyData:
    """One party's aligned training rows (same order on every side)."""

    x: Any                             # (rows, features): ndarray, or scipy CSR for sparse data
    row_keys: np.ndarray               # hashed ids in row order, for the validation split
    y: np.ndarray | None = None        # guest only
    feature_names: list[str] = field(default_factory=list)
    feature_keys: np.ndarray | None = None   # sparse only: the int64 feature id of each column
    ids: np.ndarray | None = None            # the original ids in row order, where known

    def __post_init__(self) -> None:
        if len(self.x.shape) != 2 or self.x.shape[0] != len(self.row_keys):
            raise DataError(f"features of shape {self.x.shape} do not match {len(self.row_keys)} ids")
        values = self.x.data if self.sparse else self.x
        if not np.all(np.isfinite(values)):
            raise DataError("features hold NaN or infinite values; clean or impute them first")
        if self.sparse and (self.feature_keys is None or len(self.feature_keys) != self.x.shape[1]):
            raise DataError("sparse features need one feature id per column")
        if self.y is not None and not set(np.unique(self.y)) <= {0.0, 1.0}:
            raise DataError("labels must be 0 or 1")

    @property
    def sparse(self) -> bool:
        return hasattr(self.x, "tocsr")

    def columns(self, rows: np.ndarray) -> tuple[Any, np.ndarray | None]:
        """The batch's feature matrix, and for sparse data the feature ids of its columns.

        A sparse batch keeps only the columns it touches, so a model of 10^7
        hashed features costs per batch what the batch holds.
        """
        x = self.x[rows]
        if not self.sparse:
            return x, None
        touched = np.unique(x.indices)
        return x[:, touched], self.feature_keys[touched]

    def digest(self) -> str:
        return hashlib.sha256(np.ascontiguousarray(self.row_keys).tobytes()).hexdigest()


def sparse_hstack(x: Any, dense: np.ndarray) -> Any:
    from scipy import sparse

    return sparse.hstack([x, sparse.csr_matrix(dense)], format="csr")


def validation_rows(row_keys: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """Boolean mask of validation rows, from a seeded hash of each row's id (same on every side)."""
    if fraction == 0:
        return np.zeros(len(row_keys), dtype=bool)
    salt = np.uint64(seed * 0x9E3779B97F4A7C15 % 2**64)
    h = (row_keys.astype(np.uint64) ^ salt) * np.uint64(0xBF58476D1CE4E5B9)
    h ^= h >> np.uint64(31)
    h *= np.uint64(0x94D049BB133111EB)
    h ^= h >> np.uint64(29)
    return (h >> np.uint64(11)).astype(np.float64) / 2.0**53 < fraction


def batches(rows: np.ndarray, params: LRParams, epoch: int) -> list[np.ndarray]:
    """The epoch's batches: a seeded permutation cut in ``batch_size`` pieces (a short tail joins the last)."""
    order = rows[np.random.default_rng([params.seed, epoch]).permutation(len(rows))]
    count = max(1, len(order) // params.batch_size)
    return np.array_split(order, count)


@dataclass
class Session:
    """Everything one party needs across the job."""

    party: protocol.Party
    data: PartyData
    params: LRParams
    model: PartyModel
    checkpoint: JobCheckpoint
    secret: bytes
    state: TrainState = field(default_factory=TrainState)
    last_validation: tuple[np.ndarray, np.ndarray] | None = None

    @functools.cached_property
    def validation(self) -> np.ndarray:
        """Which of this party's rows are held out (the same rows at every party)."""
        return validation_rows(self.data.row_keys, self.params.validation_fraction, self.params.seed)


def setup(name: str, guest: str, hosts: list[str], channels: dict, data: PartyData, params: LRParams,
          job: str, checkpoint: JobCheckpoint, make_model: Callable[[int, bool, bool], PartyModel],
          xt_d: Callable | None = None) -> Session:
    """Exchange keys and shapes, check agreement, or restore everything from a checkpoint."""
    restored = checkpoint.load_latest()
    intercept = name == guest and params.fit_intercept
    features = data.x.shape[1]
    new_model = lambda: make_model(features, intercept, data.sparse)  # noqa: E731
    if restored is not None:
        keys, public, secret, state, positions = restored
        for peer, position in positions.items():
            channels[peer].rewind(position)
        party = protocol.Party(name, guest, hosts, channels, keys, public, params.frac_bits, xt_d)
        model = new_model()
        model.restore(state.step)
        log.info("%s resumed from the checkpoint of step %d (epoch %d, batch %d)",
                 name, state.step, state.epoch, state.batch)
        return Session(party, data, params, model, checkpoint, secret, state)
    public_key, private_key = generate_keypair(params.key_bits)
    scope = Scope(job, "setup")
    hello = {"n": str(public_key.n), "features": 0 if data.sparse else features, "sparse": data.sparse,
             "rows": int(data.x.shape[0]),
             "digest": data.digest(), "shared": params.shared()}
    for peer, channel in channels.items():
        channel.send(scope.tag(HELLO.name), hello)
    public: dict[str, PublicKey] = {name: public_key}
    counts = {name: hello["features"]}
    sparse = data.sparse
    for peer, channel in sorted(channels.items()):
        theirs = HELLO.check(channel.recv(scope.tag(HELLO.name)))
        _agree(name, peer, hello, theirs)
        public[peer] = PublicKey(int(theirs["n"]))
        counts[peer] = int(theirs["features"])
        sparse = sparse or bool(theirs.get("sparse"))
    _check_batch(params, counts, data.x.shape[0])
    if sparse and params.d_noise == 0:
        raise ConfigError("a party has sparse features: a feature seen in one row of a batch reveals that "
                          "row's d to it, so set job.params.d_noise (for example 0.01) to blur it")
    party = protocol.Party(name, guest, hosts, channels, private_key, public, params.frac_bits, xt_d)
    session = Session(party, data, params, new_model(), checkpoint, os.urandom(32))
    if params.checkpoint_every:
        save_checkpoint(session)
    return session


def _agree(me: str, peer: str, mine: dict, theirs: dict) -> None:
    if theirs.get("rows") != mine["rows"]:
        fewer = peer if theirs.get("rows", 0) < mine["rows"] else me
        raise DataError(f"{peer} has {theirs.get('rows')} aligned rows and {me} has {mine['rows']}: "
                        f"{fewer} has fewer rows after PSI; both must train on the same intersection")
    if theirs.get("digest") != mine["digest"]:
        raise DataError(f"{peer}'s rows are not the same ids in the same order as {me}'s; "
                        "train on the output of one PSI run")
    for key, value in mine["shared"].items():
        if theirs.get("shared", {}).get(key) != value:
            raise ConfigError(f"job.params.{key} differs: {me} has {value!r}, {peer} has "
                              f"{theirs.get('shared', {}).get(key)!r}; both parties must agree")


def _check_batch(params: LRParams, counts: dict[str, int], rows: int) -> None:
    widest = max(counts.values())
    needed = math.ceil(params.min_batch_ratio * widest)
    if params.batch_size < needed:
        raise ConfigError(f"job.params.batch_size = {params.batch_size} is below the privacy floor of "
                          f"{needed} rows (min_batch_ratio {params.min_batch_ratio} x {widest} features): "
                          "a smaller batch lets a party solve its gradient for the other side's data")
    if rows * (1 - params.validation_fraction) < needed:
        raise DataError(f"only {rows} aligned rows: too few for one batch of {needed}")


def save_checkpoint(session: Session) -> None:
    for channel in session.party.channels.values():
        channel.flush()
    step = session.model.checkpoint()
    positions = {peer: channel.position() for peer, channel in session.party.channels.items()}
    session.checkpoint.save(step, session.party.private_key, session.party.public_keys, session.secret,
                            session.state, positions)


def train(session: Session, on_batch: Callable[[TrainState], None] | None = None) -> TrainState:
    """Run (or resume) the epochs; returns the final state (losses and metrics on the guest)."""
    s, params, party = session, session.params, session.party
    is_guest = party.name == party.guest
    rows = np.flatnonzero(~s.validation)
    job = next(iter(party.channels.values())).job
    while s.state.epoch < params.epochs and not s.state.done:
        epoch = s.state.epoch
        plan = batches(rows, params, epoch)
        for b in range(s.state.batch, len(plan)):
            scope = Scope(job, "train").at(iteration=epoch, batch=b)
            _drop_older(party, epoch, b)
            started = time.perf_counter()
            _one_batch(s, scope, plan[b], is_guest)
            s.state.batch, s.state.step = b + 1, s.state.step + 1
            log.debug("%s epoch %d batch %d in %.2fs", party.name, epoch, b, time.perf_counter() - started)
            if params.checkpoint_every and s.state.step % params.checkpoint_every == 0:
                save_checkpoint(s)
            if on_batch is not None:
                on_batch(s.state)
        _end_epoch(s, job, epoch, is_guest)
    return s.state


def _drop_older(party: protocol.Party, epoch: int, batch: int) -> None:
    """Messages of batches already done (re-sent by a resumed peer) are dropped unread."""
    def older(tag: Any) -> bool:
        return (tag.phase == "setup"
                or (tag.phase == "train" and (tag.iteration, tag.batch) < (epoch, batch))
                or (tag.phase == "epoch" and tag.iteration < epoch))

    for channel in party.channels.values():
        channel.drop(older)


def _one_batch(s: Session, scope: Scope, rows: np.ndarray, is_guest: bool) -> None:
    x, keys = s.data.columns(rows)
    u = s.model.scores(x, keys)
    with_loss = s.params.loss_every > 0 and scope.batch % s.params.loss_every == 0
    if is_guest:
        noise = None
        if s.params.d_noise:
            seed = int.from_bytes(hashlib.sha256(s.secret + b"noise").digest()[:8], "big")
            noise = np.random.default_rng([seed, scope.iteration, scope.batch]).normal(0, s.params.d_noise, len(rows))
        if s.model.intercept:
            ones = np.ones((len(rows), 1))
            features = sparse_hstack(x, ones) if s.data.sparse else np.hstack([x, ones])
        else:
            features = x
        gradient, loss = protocol.guest_batch(s.party, scope, features, s.data.y[rows], u, noise,
                                              with_loss, s.secret)
        if loss is not None:
            s.state.batch_losses.append(loss)
    else:
        gradient = protocol.host_batch(s.party, scope, x, u, with_loss, s.secret)
    s.model.step(gradient / len(rows), keys)


def _end_epoch(s: Session, job: str, epoch: int, is_guest: bool) -> None:
    party, params = s.party, s.params
    scope = Scope(job, "epoch").at(iteration=epoch)
    last = epoch + 1 >= params.epochs
    evaluate = last or (params.evaluate_every and (epoch + 1) % params.evaluate_every == 0)
    if is_guest:
        if s.state.batch_losses:
            s.state.losses.append(float(np.mean(s.state.batch_losses)))
        s.state.batch_losses = []
        converged = len(s.state.losses) > 1 and abs(s.state.losses[-1] - s.state.losses[-2]) < params.tolerance
        for host in party.hosts:
            party.send(host, scope, STOP, {"stop": bool(converged)})
        if evaluate or converged:
            s.state.metrics.append({"epoch": epoch + 1, **evaluate_guest(s, scope)})
        s.state.done = bool(converged)
        log.info("epoch %d: loss %s", epoch + 1, f"{s.state.losses[-1]:.5f}" if s.state.losses else "n/a")
    else:
        stop = bool(party.recv(party.guest, scope, STOP)["stop"])
        if evaluate or stop:
            evaluate_host(s, scope)
        s.state.done = stop
    s.state.epoch, s.state.batch = epoch + 1, 0


def evaluate_host(s: Session, scope: Scope) -> None:
    """Send this host's scores on the validation rows to the guest (documented leakage)."""
    valid = s.validation
    x, keys = s.data.columns(np.flatnonzero(valid))
    s.party.send(s.party.guest, scope, VALID_U, s.model.scores(x, keys))


def evaluate_guest(s: Session, scope: Scope) -> dict[str, float]:
    """Validation metrics from the guest's scores plus every host's."""
    valid = s.validation
    if not valid.any():
        return {}
    x, keys = s.data.columns(np.flatnonzero(valid))
    u = s.model.scores(x, keys)
    for host in s.party.hosts:
        u = u + np.asarray(s.party.recv(host, scope, VALID_U), dtype=np.float64)
    s.last_validation = (s.data.y[valid], u)
    return classification_metrics(s.data.y[valid], u)
