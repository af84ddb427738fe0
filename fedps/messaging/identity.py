"""Long-term party identities and the signed key exchange that keys a channel.

Each party has an Ed25519 identity key (a PEM file, mode 0600) and pins its
peers' public keys in its configuration, the way SSH pins known hosts. A
channel starts with each side publishing a *hello*: a fresh X25519 public key
signed, together with the job and both party names, by its identity. From the
two hellos each side derives one ChaCha20-Poly1305 key per direction with
HKDF-SHA256.
"""

from __future__ import annotations

import base64
import json
import os
import stat
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from fedps.errors import ConfigError, ProtocolError

PUBLIC_PREFIX = "ed25519:"
_HELLO_CONTEXT = b"fedps/hello/v1"


def generate_identity(path: str | os.PathLike[str]) -> str:
    """Write a new Ed25519 identity key to ``path`` (mode 0600); return its public form."""
    path = Path(path)
    if path.exists():
        raise ConfigError(f"identity key {path} already exists; refusing to overwrite it")
    path.parent.mkdir(parents=True, exist_ok=True)
    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as out:
        out.write(pem)
    return public_text(key.public_key())


def load_identity(path: str | os.PathLike[str]) -> Ed25519PrivateKey:
    """Read an identity key, refusing files that others can read (as SSH does)."""
    path = Path(path)
    try:
        mode = path.stat().st_mode
        data = path.read_bytes()
    except FileNotFoundError:
        raise ConfigError(
            f"identity key {path} does not exist; create one with `fedps keygen {path}`"
        ) from None
    if os.name == "posix" and mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise ConfigError(
            f"identity key {path} is accessible by other users (mode {stat.S_IMODE(mode):o}); "
            f"run `chmod 600 {path}`"
        )
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"identity key {path} is not a PEM private key: {exc}") from exc
    if not isinstance(key, Ed25519PrivateKey):
        raise ConfigError(f"identity key {path} is not an Ed25519 key")
    return key


def public_text(key: Ed25519PublicKey) -> str:
    raw = key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return PUBLIC_PREFIX + base64.b64encode(raw).decode()


def parse_public(text: str, owner: str) -> Ed25519PublicKey:
    """Parse a pinned ``ed25519:<base64>`` public key; ``owner`` names it in errors."""
    if not isinstance(text, str) or not text.startswith(PUBLIC_PREFIX):
        raise ConfigError(f"pinned key of peer {owner!r} must look like 'ed25519:<base64>'")
    try:
        raw = base64.b64decode(text[len(PUBLIC_PREFIX) :], validate=True)
        return Ed25519PublicKey.from_public_bytes(raw)
    except ValueError as exc:
        raise ConfigError(f"pinned key of peer {owner!r} is not a valid Ed25519 key") from exc


class HelloRefused(ProtocolError):
    """A hello that does not come from the pinned peer for this channel; ``reason`` names why."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason


@dataclass(frozen=True)
class Hello:
    """One side's half of the key exchange, as published on its outgoing topic.

    ``identity`` is the signer's public key in printable form. It is not
    signed and proves nothing; it only lets a receiver name the key of a
    refused hello.
    """

    job: str
    sender: str
    receiver: str
    ephemeral: bytes
    signature: bytes
    identity: str = ""

    @property
    def signed(self) -> tuple[str, str, str, bytes, bytes]:
        """What the signature covers, with the signature: two hellos are the same hello when these are."""
        return (self.job, self.sender, self.receiver, self.ephemeral, self.signature)

    def to_bytes(self) -> bytes:
        fields = {
            "job": self.job,
            "sender": self.sender,
            "receiver": self.receiver,
            "ephemeral": self.ephemeral.hex(),
            "signature": self.signature.hex(),
        }
        if self.identity:
            fields["identity"] = self.identity
        return json.dumps(fields, separators=(",", ":")).encode()

    @classmethod
    def from_bytes(cls, data: bytes) -> Hello:
        try:
            fields = json.loads(data)
            return cls(
                str(fields["job"]),
                str(fields["sender"]),
                str(fields["receiver"]),
                bytes.fromhex(fields["ephemeral"]),
                bytes.fromhex(fields["signature"]),
                str(fields.get("identity", ""))[:200],
            )
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise HelloRefused("malformed-hello", f"malformed hello message: {exc}") from exc


def _signed_part(job: str, sender: str, receiver: str, ephemeral: bytes) -> bytes:
    fields = [job.encode(), sender.encode(), receiver.encode(), ephemeral]
    return _HELLO_CONTEXT + b"".join(len(f).to_bytes(2, "big") + f for f in fields)


def make_hello(identity: Ed25519PrivateKey, job: str, me: str, peer: str) -> tuple[Hello, X25519PrivateKey]:
    """A signed hello for the channel ``me -> peer`` and the ephemeral key behind it."""
    ephemeral = X25519PrivateKey.generate()
    public = ephemeral.public_key().public_bytes(
        serialization.Encoding.Raw, serialization.PublicFormat.Raw
    )
    signature = identity.sign(_signed_part(job, me, peer, public))
    return Hello(job, me, peer, public, signature, public_text(identity.public_key())), ephemeral


def verify_hello(hello: Hello, pinned: Ed25519PublicKey, job: str, me: str, peer: str) -> None:
    """Check that ``hello`` comes from ``peer``'s pinned identity, for this job and for us.

    Raises :class:`HelloRefused`: ``foreign-hello`` (another job or party),
    ``unpinned-hello`` (validly signed, but by a key that is not pinned) or
    ``forged-hello`` (signed by no key it names).
    """
    if (hello.job, hello.sender, hello.receiver) != (job, peer, me):
        raise HelloRefused(
            "foreign-hello",
            f"foreign hello: it is for job {hello.job!r}, {hello.sender} -> {hello.receiver}, "
            f"expected job {job!r}, {peer} -> {me}",
        )
    signed = _signed_part(job, peer, me, hello.ephemeral)
    if _verifies(pinned, hello.signature, signed):
        return
    claimed = _parse_claimed(hello.identity)
    if claimed is not None and hello.identity != public_text(pinned) and _verifies(claimed, hello.signature, signed):
        raise HelloRefused(
            "unpinned-hello",
            f"a hello for job {job!r} claiming to be {peer!r}, signed by an unpinned key "
            f"{hello.identity}, was refused ({peer}'s pinned key is {public_text(pinned)})",
        )
    raise HelloRefused(
        "forged-hello",
        f"a hello for job {job!r} claiming to be {peer!r} is not signed by {peer}'s pinned identity "
        "key (nor by the key it names), and was refused",
    )


def _verifies(key: Ed25519PublicKey, signature: bytes, data: bytes) -> bool:
    try:
        key.verify(signature, data)
    except (InvalidSignature, ValueError):
        return False
    return True


def _parse_claimed(text: str) -> Ed25519PublicKey | None:
    try:
        return parse_public(text, "hello") if text else None
    except ConfigError:
        return None


def derive_keys(
    mine: X25519PrivateKey, my_hello: Hello, their_hello: Hello
) -> tuple[bytes, bytes]:
    """Return ``(send_key, recv_key)`` for the channel described by the two hellos."""
    shared = mine.exchange(X25519PublicKey.from_public_bytes(their_hello.ephemeral))
    transcript = _transcript(my_hello, their_hello)

    def direction(sender: str, receiver: str) -> bytes:
        info = b"fedps/channel/v1|" + f"{my_hello.job}|{sender}->{receiver}".encode()
        return HKDF(algorithm=hashes.SHA256(), length=32, salt=transcript, info=info).derive(shared)

    return direction(my_hello.sender, my_hello.receiver), direction(their_hello.sender, their_hello.receiver)


def _transcript(a: Hello, b: Hello) -> bytes:
    first, second = sorted([a, b], key=lambda h: h.sender)
    digest = hashes.Hash(hashes.SHA256())
    for hello in (first, second):
        digest.update(hello.ephemeral + hello.signature)
    return digest.finalize()
