"""Vertical logistic regression without a third party: one mini-batch, every role.

The guest holds labels ``y`` and features ``X_g``; hosts ``h1..hm`` hold
``X_hk``. Every party owns a Paillier key pair and encrypts only under its own
key. With ``u = X·w`` per party and the Taylor form of the logistic loss,
``d = 0.25·(u_g + Σ u_hk) + 0.5 − y`` is the gradient of the loss in ``u``.

A batch is a slice of every layout partition. Steps 1–3 run per partition
``p`` in the executor tasks (``*_partition``), task ``p`` of one party talking
to task ``p`` of another; each task leaves its partition's partial
``[[X_pᵀd]]`` in its own party's accumulator, where the partials are added
under encryption. Steps 4–5 run on the drivers (``*_step``) over the
whole-batch sums only (numbers match docs/protocols.md, "Vertical logistic
regression"):

1. (task p) hosts → guest, chained under h1's key: ``[[0.25·Σ u_hk]]_H1`` per
   row and ``[[Σ_i (Σ_k u_hk,i)²]]_H1`` (only for batches that compute the loss).
2. (task p) guest → hosts, chained under the guest's key:
   ``[[0.25·u_g + 0.5 − y]]_G``; each host adds ``0.25·u_hk``; the last host
   hands ``[[d]]_G`` to the others.
3. (task p) each party: its partial ``[[X_pᵀd]]`` (the guest's under h1's key,
   with its encrypted loss part), summed over partitions inside the party.
4. (driver) each party compresses, masks and re-randomises its whole-batch
   sum and sends it to the key's owner, who decrypts the masked integers and
   sends them back.
5. (driver) each party removes its own mask and pushes its gradient to its PS.

Label differential privacy (``noise`` in :func:`guest_step`): in step 4 the
guest adds Gaussian noise to the masked integers it decrypts for each host,
inside the mask (the host gets ``X_hᵀd + z`` and the guest never sees
``X_hᵀd``), and to its own gradient, so that every model update, and so
everything a host learns, is a function of noised releases
(fedps/engine/vertical/privacy.py).
"""

from __future__ import annotations

import hashlib
import math
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import numpy as np

from fedps.engine.crypto import (CipherVector, Decryptor, Encryptor, FixedPoint, PrivateKey, PublicKey,
                                 seal_for_owner, xt_d)
from fedps.engine.crypto.compress import add_mask
from fedps.engine.vertical.privacy import add_to_masked
from fedps.errors import ProtocolError
from fedps.messaging.codec import Blob
from fedps.messaging.tags import Message, Scope

# Messages between the tasks of one partition, with their direction.
PARTIAL_U = Message("partial_u", "host", "host|guest", Blob)        # 1: [[0.25 Σu_h]]_H1
PARTIAL_Q = Message("partial_q", "host", "host|guest", Blob)        # 1: [[Σ u_h²]]_H1
PARTIAL_D = Message("partial_d", "guest|host", "host", Blob)        # 2: [[d]]_G, being completed
FULL_D = Message("full_d", "host", "host", Blob)                    # 2: [[d]]_G from the last host
# Messages between the drivers, per batch.
GUEST_GRAD = Message("guest_grad", "guest", "host", Blob)           # 4: masked [[X_gᵀd]]_H1
GUEST_LOSS = Message("guest_loss", "guest", "host", Blob)           # 4: masked [[loss part]]_H1
HOST_GRAD = Message("host_grad", "host", "guest", Blob)             # 4: masked [[X_hᵀd]]_G
HOST_GRAD_PLAIN = Message("host_grad_plain", "guest", "host", dict)  # 4: masked ints, decrypted
GUEST_GRAD_PLAIN = Message("guest_grad_plain", "host", "guest", dict)  # 5: masked ints, decrypted

VECTOR = "paillier.vector/1"
X_FIXED = FixedPoint(frac_bits=16, int_bits=16)
#: Feature id of the guest's intercept in keyed gradients (feature ids are never negative).
INTERCEPT = -1


def blob(vector: CipherVector) -> Blob:
    return Blob(VECTOR, vector.to_bytes())


def vector(value: Blob | bytes, key: PublicKey) -> CipherVector:
    if isinstance(value, bytes):
        return CipherVector.from_bytes(value, key)
    if not isinstance(value, Blob) or value.kind != VECTOR:
        raise ProtocolError(f"expected a ciphertext vector, got {type(value).__name__}")
    return CipherVector.from_bytes(value.data, key)


def ints_message(values: list[int]) -> dict:
    return {"ints": [str(v) for v in values]}


def ints_from(message: dict) -> list[int]:
    try:
        return [int(v) for v in message["ints"]]
    except (KeyError, TypeError, ValueError) as exc:
        raise ProtocolError(f"malformed decrypted-integers message: {exc}") from None


@dataclass
class Roles:
    """Who is who: ``hosts[0]`` owns the key of the guest's gradient and loss."""

    me: str
    guest: str
    hosts: list[str]

    @property
    def is_guest(self) -> bool:
        return self.me == self.guest


@dataclass
class Crypto:
    """One party's keys and maths: its own key pair, every party's public key."""

    private_key: PrivateKey
    public_keys: dict[str, PublicKey]
    me: str
    frac_bits: int = 24
    timings: dict[str, float] = field(default_factory=dict)
    _encryptors: dict[str, Encryptor] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.fixed = FixedPoint(frac_bits=self.frac_bits, int_bits=16)
        self.decryptor = Decryptor(self.private_key)

    @contextmanager
    def timed(self, what: str) -> Iterator[None]:
        started = time.perf_counter()
        try:
            yield
        finally:
            self.timings[what] = self.timings.get(what, 0.0) + time.perf_counter() - started

    def encryptor(self, owner: str) -> Encryptor:
        """Encryptor under ``owner``'s key (with CRT tables when we are the owner)."""
        if owner not in self._encryptors:
            own = owner == self.me
            self._encryptors[owner] = Encryptor(self.public_keys[owner],
                                                private_key=self.private_key if own else None)
        return self._encryptors[owner]

    def encrypt(self, values: np.ndarray, fixed: FixedPoint | None = None) -> CipherVector:
        with self.timed("encrypt"):
            return self.encryptor(self.me).encrypt(values, fixed or self.fixed)

    def times_x(self, x: Any, d: CipherVector) -> CipherVector:
        with self.timed("x_times_d"):
            return xt_d(x, d, X_FIXED)

    def seal(self, owner: str, result: CipherVector, randbits: Callable[[int], int]):
        with self.timed("seal"):
            return seal_for_owner(result, self.encryptor(owner), randbits=randbits)

    def decrypt_exact(self, masked: CipherVector) -> list[int]:
        with self.timed("decrypt"):
            return self.decryptor.decrypt_exact(masked)


class Port:
    """The messages of one partition (or of the drivers) to and from each peer, in one scope."""

    def __init__(self, transports: dict[str, Any], scope: Scope, partition: int | None = None,
                 timings: dict[str, float] | None = None) -> None:
        self.transports, self.scope, self.partition = transports, scope, partition
        self.timings = timings if timings is not None else {}

    def _tag(self, message: Message):
        # The partition is part of the sealed tag: a frame moved to another partition is never taken.
        name = message.name if self.partition is None else f"{message.name}_p{self.partition}"
        return self.scope.tag(name)

    def send(self, peer: str, message: Message, value: Any) -> None:
        self.transports[peer].send(self._tag(message), message.check(value))

    def recv(self, peer: str, message: Message) -> Any:
        started = time.perf_counter()
        try:
            return message.check(self.transports[peer].recv(self._tag(message)))
        finally:
            self.timings["wait"] = self.timings.get("wait", 0.0) + time.perf_counter() - started


def mask_rng(secret: bytes, scope: Scope, purpose: str) -> Callable[[int], int]:
    """Deterministic mask randomness for one batch: a replayed batch masks alike.

    A party resumed from a checkpoint replays batches whose answers are
    already in the topic; the same mask makes those answers fit. The secret
    never leaves the party.
    """
    counter = [0]

    def randbits(bits: int) -> int:
        out, have = 0, 0
        while have < bits:
            material = f"{scope.iteration}/{scope.batch}/{purpose}/{counter[0]}".encode()
            counter[0] += 1
            out = (out << 256) | int.from_bytes(hashlib.sha256(secret + material).digest(), "big")
            have += 256
        return out >> (have - bits)

    return randbits


@dataclass
class Partial:
    """What one partition contributes to a batch: its keyed partial gradient and statistics."""

    keys: np.ndarray                     # feature ids of the gradient's entries (INTERCEPT included)
    gradient: CipherVector
    rows: int
    loss: CipherVector | None = None     # guest: the encrypted part of the batch loss
    plain_loss: float = 0.0              # guest: the plaintext part of the batch loss


# --------------------------------------------------------------------------- tasks: steps 1-3
def guest_partition(port: Port, crypto: Crypto, roles: Roles, x: Any, keys: np.ndarray, y: np.ndarray,
                    u_g: np.ndarray, noise: np.ndarray | None, with_loss: bool) -> Partial:
    """The guest's side of one partition of a batch; ``x`` includes the intercept column if any."""
    h1, last = roles.hosts[0], roles.hosts[-1]
    key_h1 = crypto.public_keys[h1]
    # 2. [[0.25·u_g + 0.5 − y (+ noise)]]_G to the first host (sent first: the guest
    #    encrypts while the hosts do step 1)
    part = 0.25 * u_g + 0.5 - y
    if noise is not None:
        part = part + noise
    port.send(h1, PARTIAL_D, blob(crypto.encrypt(part)))
    # 1. [[0.25·u_h]]_H1 (and [[Σu_h²]]_H1) from the end of the host chain
    s = vector(port.recv(last, PARTIAL_U), key_h1)
    q = vector(port.recv(last, PARTIAL_Q), key_h1) if with_loss else None
    # 3. [[X_gᵀd]]_H1 (and the loss part) for this partition
    d = s.add_plain(part)
    partial = Partial(keys, crypto.times_x(x, d), len(y))
    if with_loss:
        cross = crypto.times_x((4.0 * (0.5 - y + 0.25 * u_g)).reshape(-1, 1), s)   # Σ_i a_i·[[s_i]]
        partial.loss = cross + q.mul_plain(0.125, FixedPoint(frac_bits=3, int_bits=1))
        partial.plain_loss = len(y) * math.log(2) + float(np.sum((0.5 - y) * u_g) + 0.125 * np.sum(u_g ** 2))
    return partial


def host_partition(port: Port, crypto: Crypto, roles: Roles, x: Any, keys: np.ndarray, u_h: np.ndarray,
                   with_loss: bool) -> Partial:
    """A host's side of one partition of a batch."""
    hosts, me, guest = roles.hosts, roles.me, roles.guest
    index = hosts.index(me)
    key_h1, key_g = crypto.public_keys[hosts[0]], crypto.public_keys[guest]
    after = hosts[index + 1] if index + 1 < len(hosts) else guest
    square_bits = 33 + len(u_h).bit_length()    # Σ u² over the rows, |u| < 2^16
    # 1. extend the chain under h1's key: [[0.25·Σu]] per row, [[Σ(Σu)²]]
    if index == 0:
        s = crypto.encrypt(0.25 * u_h)
        q = crypto.encrypt(np.array([np.sum(u_h ** 2)]), FixedPoint(2 * crypto.frac_bits, square_bits)) \
            if with_loss else None
    else:
        before = hosts[index - 1]
        prev_s = vector(port.recv(before, PARTIAL_U), key_h1)
        s = prev_s.add_plain(0.25 * u_h)
        q = None
        if with_loss:
            prev_q = vector(port.recv(before, PARTIAL_Q), key_h1)
            cross = crypto.times_x((8.0 * u_h).reshape(-1, 1), prev_s)   # Σ_i 2·u_k,i·Σ_{j<k} u_j,i
            q = (prev_q + cross).add_plain(np.array([np.sum(u_h ** 2)]), int_bits=square_bits)
    port.send(after, PARTIAL_U, blob(s))
    if with_loss:
        port.send(after, PARTIAL_Q, blob(q))
    # 2. add 0.25·u_h to [[0.25·u_g + 0.5 − y + ...]]_G; the last host completes [[d]]_G
    source = guest if index == 0 else hosts[index - 1]
    d = vector(port.recv(source, PARTIAL_D), key_g).add_plain(0.25 * u_h)
    if index + 1 < len(hosts):
        port.send(hosts[index + 1], PARTIAL_D, blob(d))
        d = vector(port.recv(hosts[-1], FULL_D), key_g)
    else:
        for other in hosts[:-1]:
            port.send(other, FULL_D, blob(d))
    # 3. [[X_hᵀd]]_G for this partition
    return Partial(keys, crypto.times_x(x, d), len(u_h))


# --------------------------------------------------------------------------- drivers: steps 4-5
#: Label-DP noise of one batch: ``noise(party, length)``, a vector for that party's gradient.
Noise = Callable[[str, int], np.ndarray]


def _decrypt_for(port: Port, crypto: Crypto, peer: str, noise: Noise | None = None) -> None:
    """Decrypt a host's masked gradient under our key (adding noise inside the mask) and send it back."""
    masked = vector(port.recv(peer, HOST_GRAD), crypto.public_keys[crypto.me])
    if not masked.masked:
        raise ProtocolError(f"{peer} sent an unmasked {HOST_GRAD.name}; refusing to decrypt it")
    ints = crypto.decrypt_exact(masked)
    if noise is not None:
        layout = masked.layout
        slots, width = (layout.slots, layout.slot_bits) if layout is not None else (1, 0)
        ints = add_to_masked(ints, noise(peer, masked.length), slots, width, masked.frac_bits)
    port.send(peer, HOST_GRAD_PLAIN, ints_message(ints))


def guest_step(port: Port, crypto: Crypto, roles: Roles, gradient: CipherVector, loss: CipherVector | None,
               secret: bytes, noise: Noise | None = None) -> tuple[np.ndarray, float | None]:
    """The guest driver's side of a batch; returns its gradient (sum over rows) and the encrypted loss part.

    With ``noise``, every host's gradient and the guest's own carry label-DP noise.
    """
    h1 = roles.hosts[0]
    scope = port.scope
    sealed, grad_mask = crypto.seal(h1, gradient, mask_rng(secret, scope, "grad"))
    port.send(h1, GUEST_GRAD, blob(sealed))
    loss_mask = None
    if loss is not None:
        masked_loss, loss_mask = add_mask(loss, crypto.encryptor(h1), randbits=mask_rng(secret, scope, "loss"))
        port.send(h1, GUEST_LOSS, blob(masked_loss))
    # 4. decrypt each host's masked gradient for it
    for host in roles.hosts:
        _decrypt_for(port, crypto, host, noise)
    # 5. our gradient (and loss part) back from h1, unmasked
    answer = ints_from(port.recv(h1, GUEST_GRAD_PLAIN))
    result = grad_mask.remove(answer[: len(sealed.ciphertexts)])
    if noise is not None:
        result = result + noise(roles.guest, len(result))
    encrypted_loss = None
    if loss_mask is not None:
        encrypted_loss = float(loss_mask.remove(answer[len(sealed.ciphertexts):])[0])
    return result, encrypted_loss


def host_step(port: Port, crypto: Crypto, roles: Roles, gradient: CipherVector, with_loss: bool,
              secret: bytes) -> np.ndarray:
    """A host driver's side of a batch; returns its gradient (sum over rows)."""
    me, guest = roles.me, roles.guest
    sealed, grad_mask = crypto.seal(guest, gradient, mask_rng(secret, port.scope, "grad"))
    port.send(guest, HOST_GRAD, blob(sealed))
    if me == roles.hosts[0]:   # h1 decrypts the guest's masked gradient (and loss part) for it
        parts = [vector(port.recv(guest, GUEST_GRAD), crypto.public_keys[me])]
        if with_loss:
            parts.append(vector(port.recv(guest, GUEST_LOSS), crypto.public_keys[me]))
        if not all(part.masked for part in parts):
            raise ProtocolError("the guest sent an unmasked vector to decrypt; refusing to decrypt it")
        ints = [v for part in parts for v in crypto.decrypt_exact(part)]
        port.send(guest, GUEST_GRAD_PLAIN, ints_message(ints))
    return grad_mask.remove(ints_from(port.recv(guest, HOST_GRAD_PLAIN)))


# --------------------------------------------------------------------------- the plaintext reference
@dataclass
class PlainRun:
    """A whole training in plaintext: the model and, per batch, what a host learned."""

    weights: dict[str, np.ndarray]
    bias: float
    transforms: dict[str, Any]
    batch_size: int
    noise_multiplier: float
    epsilon: float
    host_views: list[tuple[int, np.ndarray, np.ndarray, np.ndarray]] = field(default_factory=list)

    def scores(self, xs: dict[str, np.ndarray]) -> np.ndarray:
        """Joint log-odds of rows (each party's transform applied to its own columns)."""
        return sum(self.transforms[n].apply(x) @ self.weights[n] for n, x in xs.items()) + self.bias


def plaintext_training(xs: dict[str, np.ndarray], y: np.ndarray, train: np.ndarray, params: Any, seed: int = 0,
                       watch: str | None = None) -> PlainRun:
    """The maths of a job with these settings, in numpy (no crypto, no runtime): for tests, benches, audits.

    ``xs`` maps party names to dense features (the guest first); ``train``
    marks the training rows. It follows the runtime's rules: automatic batch
    size and LR schedule, each party's own standardisation and row clip, the
    guest's label-DP noise on every gradient (summed over the batch), the
    optimizer of the parameter server. With ``watch`` = a host's name it
    records, per batch, what that host knows afterwards: ``(epoch, rows,
    its u_h, its noised gradient)``.
    """
    import dataclasses as dc

    from fedps.algorithms.hetero_lr import setup as tr
    from fedps.algorithms.hetero_lr.model import tables
    from fedps.engine.vertical.plan import auto_batch_size, batch_count
    from fedps.engine.vertical.privacy import Accountant
    from fedps.engine.vertical.standardize import RowTransform, moments
    from fedps.ps.optimizers import Rows, apply_update, state_layout

    rows = len(y)
    params = tr.resolved(params, rows)
    floor = math.ceil(params.min_batch_ratio * max(x.shape[1] for x in xs.values()))
    if params.batch_size == 0:
        params = dc.replace(params, batch_size=auto_batch_size(rows, params.validation_fraction, floor))
    transforms = {}
    for name, x in xs.items():
        clip = tr.clip_norm(params, x.shape[1])
        transforms[name] = (RowTransform.from_moments(moments(x[train], x.shape[1]), clip) if params.standardize
                            else RowTransform.identity(x.shape[1], clip))
    zs = {name: transforms[name].apply(x) for name, x in xs.items()}
    sigma = tr.noise_multiplier(params)
    square = sum(tr.clip_norm(params, x.shape[1]) ** 2 for x in xs.values()) + float(params.fit_intercept)
    std = sigma * math.sqrt(square)
    names = list(xs)
    specs = {name: tables(params, zs[name].shape[1], False, False)[0] for name in names}
    bias_spec = tables(params, 1, True, False)[1]

    def fresh(width: int, spec: Any) -> Any:
        layout = state_layout(spec.optimizer, 1)
        return Rows(np.zeros((width, 1)), {k: np.full((width, w), v) for k, (w, v) in layout.items()})

    ws = {name: fresh(zs[name].shape[1], specs[name]) for name in names}
    b = fresh(1, bias_spec)
    rng = np.random.default_rng(seed)
    noise_rng = np.random.default_rng([seed, 1])
    index = np.flatnonzero(train)
    batches = batch_count(rows, params.batch_size, params.validation_fraction)
    step, views = 0, []
    for epoch in range(params.epochs):
        for batch in np.array_split(index[rng.permutation(len(index))], batches):
            us = {name: zs[name][batch] @ ws[name].weights[:, 0] for name in names}
            d = 0.25 * (sum(us.values()) + b.weights[0, 0]) + 0.5 - y[batch]
            for name in names:
                g = zs[name][batch].T @ d
                if std:
                    g = g + noise_rng.normal(0.0, std, len(g))
                if name == watch:
                    views.append((epoch, batch, us[name], g))
                apply_update(specs[name].optimizer, ws[name], (g / len(batch)).reshape(-1, 1), step)
            if params.fit_intercept:
                gb = d.sum() + (noise_rng.normal(0.0, std) if std else 0.0)
                apply_update(bias_spec.optimizer, b, np.array([[gb / len(batch)]]), step)
            step += 1
    epsilon = Accountant(sigma, params.dp_delta).epsilon(params.epochs) if sigma else 0.0
    return PlainRun({n: ws[n].weights[:, 0].copy() for n in names}, float(b.weights[0, 0]), transforms,
                    params.batch_size, sigma, epsilon, views)
