"""Vertical logistic regression without a third party: one mini-batch, every role.

The guest holds labels ``y`` and features ``X_g``; hosts ``h1..hm`` hold
``X_hk``. Every party owns a Paillier key pair and encrypts only under its own
key. With ``u = X·w`` per party and the Taylor form of the logistic loss,
``d = 0.25·(u_g + Σ u_hk) + 0.5 − y`` is the gradient of the loss in ``u``.
One batch (numbers match docs/protocols.md, "Vertical logistic regression"):

1. hosts → guest, chained under h1's key: ``[[0.25·Σ u_hk]]_H1`` per row and
   ``[[Σ_i (Σ_k u_hk,i)²]]_H1`` (only for batches that compute the loss).
2. guest → hosts, chained under the guest's key: ``[[0.25·u_g + 0.5 − y]]_G``;
   each host adds ``0.25·u_hk``; the last host hands ``[[d]]_G`` to the others.
3. guest: ``[[d]]_H1`` = step 1 + its plaintext part; ``[[X_gᵀd]]_H1`` and the
   encrypted batch loss, compressed, masked, re-randomised → h1.
4. each host: ``[[X_hkᵀd]]_G``, compressed, masked, re-randomised → guest,
   who decrypts the masked integers and sends them back.
5. h1 decrypts the guest's masked gradient and loss and sends them back; each
   party removes its own mask and pushes its gradient to its own PS.
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
                                 seal_for_owner)
from fedps.engine.crypto.compress import add_mask
from fedps.errors import ProtocolError
from fedps.messaging.codec import Blob
from fedps.messaging.tags import Message, Scope

# Messages of one batch, with their direction.
PARTIAL_U = Message("partial_u", "host", "host|guest", Blob)        # 1: [[0.25 Σu_h]]_H1
PARTIAL_Q = Message("partial_q", "host", "host|guest", Blob)        # 1: [[Σ u_h²]]_H1
PARTIAL_D = Message("partial_d", "guest|host", "host", Blob)        # 2: [[d]]_G, being completed
FULL_D = Message("full_d", "host", "host", Blob)                    # 2: [[d]]_G from the last host
GUEST_GRAD = Message("guest_grad", "guest", "host", Blob)           # 3: masked [[X_gᵀd]]_H1
GUEST_LOSS = Message("guest_loss", "guest", "host", Blob)           # 3: masked [[loss part]]_H1
HOST_GRAD = Message("host_grad", "host", "guest", Blob)             # 4: masked [[X_hᵀd]]_G
HOST_GRAD_PLAIN = Message("host_grad_plain", "guest", "host", dict)  # 4: masked ints, decrypted
GUEST_GRAD_PLAIN = Message("guest_grad_plain", "host", "guest", dict)  # 5: masked ints, decrypted

VECTOR = "paillier.vector/1"
X_FIXED = FixedPoint(frac_bits=16, int_bits=16)


def blob(vector: CipherVector) -> Blob:
    return Blob(VECTOR, vector.to_bytes())


def vector(value: Blob, key: PublicKey) -> CipherVector:
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
class Party:
    """One party's view of the job: who is who, its keys, its channels and its maths."""

    name: str
    guest: str
    hosts: list[str]                       # chain order; hosts[0] owns the loss/gradient key
    channels: dict[str, Any]               # peer -> Channel
    private_key: PrivateKey
    public_keys: dict[str, PublicKey]      # every party's, own included
    frac_bits: int = 24
    xt_d: Callable[[Any, CipherVector], CipherVector] | None = None
    _encryptors: dict[str, Encryptor] = field(default_factory=dict)
    #: Seconds spent per kind of work (encrypt, x_times_d, decrypt, wait), for the report.
    timings: dict[str, float] = field(default_factory=dict)

    @contextmanager
    def timed(self, what: str) -> Iterator[None]:
        started = time.perf_counter()
        try:
            yield
        finally:
            self.timings[what] = self.timings.get(what, 0.0) + time.perf_counter() - started

    def __post_init__(self) -> None:
        self.fixed = FixedPoint(frac_bits=self.frac_bits, int_bits=16)
        self.decryptor = Decryptor(self.private_key)

    def encryptor(self, owner: str) -> Encryptor:
        """Encryptor under ``owner``'s key (with CRT tables when we are the owner)."""
        if owner not in self._encryptors:
            own = owner == self.name
            self._encryptors[owner] = Encryptor(self.public_keys[owner],
                                                private_key=self.private_key if own else None)
        return self._encryptors[owner]

    def times_x(self, x: Any, d: CipherVector) -> CipherVector:
        from fedps.engine.crypto import xt_d

        with self.timed("x_times_d"):
            return self.xt_d(x, d) if self.xt_d is not None else xt_d(x, d, X_FIXED)

    def encrypt(self, values: np.ndarray, fixed: FixedPoint | None = None) -> CipherVector:
        """Encrypt under our own key (CRT tables)."""
        with self.timed("encrypt"):
            return self.encryptor(self.name).encrypt(values, fixed or self.fixed)

    def seal(self, owner: str, result: CipherVector, randbits: Callable[[int], int]):
        """Compress, mask and re-randomise a result for ``owner`` to decrypt."""
        with self.timed("seal"):
            return seal_for_owner(result, self.encryptor(owner), randbits=randbits)

    def decrypt_exact(self, vector: CipherVector) -> list[int]:
        with self.timed("decrypt"):
            return self.decryptor.decrypt_exact(vector)

    def send(self, peer: str, scope: Scope, message: Message, value: Any) -> None:
        self.channels[peer].send(scope.tag(message.name), message.check(value))

    def recv(self, peer: str, scope: Scope, message: Message) -> Any:
        with self.timed("wait"):
            return message.check(self.channels[peer].recv(scope.tag(message.name)))

    def decrypt_for(self, peer: str, scope: Scope, incoming: Message, outgoing: Message) -> None:
        """Decrypt a peer's masked vector under our key and send the masked integers back."""
        masked = vector(self.recv(peer, scope, incoming), self.public_keys[self.name])
        if not masked.masked:
            raise ProtocolError(f"{peer} sent an unmasked {incoming.name}; refusing to decrypt it")
        self.send(peer, scope, outgoing, ints_message(self.decrypt_exact(masked)))


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


# --------------------------------------------------------------------------- guest
def guest_batch(party: Party, scope: Scope, x: np.ndarray, y: np.ndarray, u_g: np.ndarray,
                noise: np.ndarray | None, with_loss: bool, secret: bytes) -> tuple[np.ndarray, float | None]:
    """The guest's side of one batch; returns its gradient (sum over rows) and the batch loss."""
    h1, last = party.hosts[0], party.hosts[-1]
    key_h1 = party.public_keys[h1]
    # 2. [[0.25·u_g + 0.5 − y (+ noise)]]_G to the first host (sent first: the guest
    #    encrypts while the hosts do step 1)
    part = 0.25 * u_g + 0.5 - y
    if noise is not None:
        part = part + noise
    party.send(h1, scope, PARTIAL_D, blob(party.encrypt(part)))
    # 1. [[0.25·u_h]]_H1 (and [[Σu_h²]]_H1) from the end of the host chain
    s = vector(party.recv(last, scope, PARTIAL_U), key_h1)
    q = vector(party.recv(last, scope, PARTIAL_Q), key_h1) if with_loss else None
    # 3. [[X_gᵀd]]_H1 (and the loss) compressed, masked, re-randomised → h1
    d = s.add_plain(part)
    grad, grad_mask = party.seal(h1, party.times_x(x, d), mask_rng(secret, scope, "grad"))
    party.send(h1, scope, GUEST_GRAD, blob(grad))
    loss_mask = None
    if with_loss:
        cross = party.times_x((4.0 * (0.5 - y + 0.25 * u_g)).reshape(-1, 1), s)   # Σ_i a_i·[[s_i]]
        loss_enc, loss_mask = add_mask(cross + q.mul_plain(0.125, FixedPoint(frac_bits=3, int_bits=1)),
                                       party.encryptor(h1), randbits=mask_rng(secret, scope, "loss"))
        party.send(h1, scope, GUEST_LOSS, blob(loss_enc))
    # 4. decrypt each host's masked gradient for it
    for host in party.hosts:
        party.decrypt_for(host, scope, HOST_GRAD, HOST_GRAD_PLAIN)
    # 5. our gradient (and loss part) back from h1, unmasked
    answer = ints_from(party.recv(h1, scope, GUEST_GRAD_PLAIN))
    gradient = grad_mask.remove(answer[: len(grad.ciphertexts)])
    loss = None
    if with_loss:
        encrypted_part = float(loss_mask.remove(answer[len(grad.ciphertexts):])[0])
        plain_part = len(y) * math.log(2) + float(np.sum((0.5 - y) * u_g) + 0.125 * np.sum(u_g ** 2))
        loss = (plain_part + encrypted_part) / len(y)
    return gradient, loss


# --------------------------------------------------------------------------- host
def host_batch(party: Party, scope: Scope, x: np.ndarray, u_h: np.ndarray, with_loss: bool,
               secret: bytes) -> np.ndarray:
    """A host's side of one batch; returns its gradient (sum over rows)."""
    hosts, me, guest = party.hosts, party.name, party.guest
    index = hosts.index(me)
    h1 = hosts[0]
    key_h1, key_g = party.public_keys[h1], party.public_keys[guest]
    after = hosts[index + 1] if index + 1 < len(hosts) else guest
    square_bits = 33 + len(u_h).bit_length()    # Σ u² over the batch, |u| < 2^16
    # 1. extend the chain under h1's key: [[0.25·Σu]] per row, [[Σ(Σu)²]]
    if index == 0:
        s = party.encrypt(0.25 * u_h)
        q = party.encrypt(np.array([np.sum(u_h ** 2)]), FixedPoint(2 * party.frac_bits, square_bits)) \
            if with_loss else None
    else:
        before = hosts[index - 1]
        prev_s = vector(party.recv(before, scope, PARTIAL_U), key_h1)
        s = prev_s.add_plain(0.25 * u_h)
        q = None
        if with_loss:
            prev_q = vector(party.recv(before, scope, PARTIAL_Q), key_h1)
            cross = party.times_x((8.0 * u_h).reshape(-1, 1), prev_s)   # Σ_i 2·u_k,i·Σ_{j<k} u_j,i
            q = (prev_q + cross).add_plain(np.array([np.sum(u_h ** 2)]), int_bits=square_bits)
    party.send(after, scope, PARTIAL_U, blob(s))
    if with_loss:
        party.send(after, scope, PARTIAL_Q, blob(q))
    # 2. add 0.25·u_h to [[0.25·u_g + 0.5 − y + ...]]_G; the last host completes [[d]]_G
    source = guest if index == 0 else hosts[index - 1]
    d = vector(party.recv(source, scope, PARTIAL_D), key_g).add_plain(0.25 * u_h)
    if index + 1 < len(hosts):
        party.send(hosts[index + 1], scope, PARTIAL_D, blob(d))
        d = vector(party.recv(hosts[-1], scope, FULL_D), key_g)
    else:
        for other in hosts[:-1]:
            party.send(other, scope, FULL_D, blob(d))
    # 4. [[X_hᵀd]]_G compressed, masked, re-randomised → guest, who decrypts it for us
    grad, grad_mask = party.seal(guest, party.times_x(x, d), mask_rng(secret, scope, "grad"))
    party.send(guest, scope, HOST_GRAD, blob(grad))
    # 5. h1 decrypts the guest's masked gradient (and loss part) for it
    if index == 0:
        parts = [vector(party.recv(guest, scope, GUEST_GRAD), party.public_keys[me])]
        if with_loss:
            parts.append(vector(party.recv(guest, scope, GUEST_LOSS), party.public_keys[me]))
        if not all(part.masked for part in parts):
            raise ProtocolError("the guest sent an unmasked vector to decrypt; refusing to decrypt it")
        ints = [v for part in parts for v in party.decrypt_exact(part)]
        party.send(guest, scope, GUEST_GRAD_PLAIN, ints_message(ints))
    return grad_mask.remove(ints_from(party.recv(guest, scope, HOST_GRAD_PLAIN)))
