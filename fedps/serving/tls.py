"""Mutual TLS between serving processes, bound to the parties' pinned identities.

gRPC's TLS (BoringSSL) does not sign handshakes with Ed25519, so each serving
process makes a fresh ECDSA P-256 key at start and a certificate for it that
its **Ed25519 identity key signs** (subject ``CN=<party>``, issuer
``CN=fedps identity <party>``). A peer trusts a certificate only if it chains
to a trust anchor that it builds itself from the *pinned* public key in
``[peers]`` (a self-issued certificate holding that key; a trust anchor's own
signature is never checked, so it needs no private key). So a caller whose
certificate no pinned identity signed fails the handshake; the name in the
certificate must match the issuer's party, and the host checks the caller
is the guest (:func:`caller`). The server name a client expects is derived
from the peer's party name (:func:`server_name`), so a guest cannot be made to
talk to one pinned host while it means another.
"""

from __future__ import annotations

import datetime
import hashlib
import threading
from typing import Any, Mapping

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.x509.oid import NameOID

from fedps.errors import ConfigError

_ISSUER = "fedps identity "
_VALID = datetime.timedelta(days=365)


def _name(text: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, text)])


def server_name(party: str) -> str:
    """The DNS name in a party's certificate (what a client checks it is talking to)."""
    return f"{hashlib.sha256(party.encode()).hexdigest()[:32]}.party.fedps"


def trust_anchor(pinned: Ed25519PublicKey, party: str) -> bytes:
    """A PEM trust anchor holding ``party``'s pinned identity key."""
    throwaway = Ed25519PrivateKey.generate()   # an anchor's signature is not verified
    start = datetime.datetime(2000, 1, 1, tzinfo=datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(_name(_ISSUER + party)).issuer_name(_name(_ISSUER + party))
            .public_key(pinned).serial_number(1).not_valid_before(start)
            .not_valid_after(datetime.datetime(9999, 12, 31, tzinfo=datetime.timezone.utc))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(False, False, False, False, False, True, False, False, False),
                           critical=True)
            .sign(throwaway, None))
    return cert.public_bytes(serialization.Encoding.PEM)


def leaf(identity: Ed25519PrivateKey, party: str) -> tuple[bytes, bytes]:
    """``(key PEM, certificate PEM)``: a fresh TLS key, certified by ``party``'s identity key."""
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(_name(party)).issuer_name(_name(_ISSUER + party))
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + _VALID)
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(server_name(party))]), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .sign(identity, None))
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption())
    return pem, cert.public_bytes(serialization.Encoding.PEM)


class PinnedTLS:
    """One party's TLS material: its certified key and its peers' trust anchors."""

    def __init__(self, me: str, identity: Ed25519PrivateKey, pinned: Mapping[str, Ed25519PublicKey]) -> None:
        self.me, self.pinned = me, dict(pinned)
        self.key, self.cert = leaf(identity, me)
        self._seen: dict[bytes, str | None] = {}
        self._lock = threading.Lock()

    def server_credentials(self, callers: list[str]) -> Any:
        import grpc

        unknown = [c for c in callers if c not in self.pinned]
        if unknown:
            raise ConfigError(f"no pinned key in [peers] for {', '.join(unknown)}")
        roots = b"".join(trust_anchor(self.pinned[c], c) for c in callers)
        return grpc.ssl_server_credentials([(self.key, self.cert)], root_certificates=roots,
                                           require_client_auth=True)

    def channel(self, peer: str, address: str, options: list[tuple[str, Any]] | None = None) -> Any:
        """A secure channel to ``peer``'s service at ``address``: only its pinned identity is accepted."""
        import grpc

        if peer not in self.pinned:
            raise ConfigError(f"no pinned key in [peers] for {peer}")
        creds = grpc.ssl_channel_credentials(trust_anchor(self.pinned[peer], peer), self.key, self.cert)
        return grpc.secure_channel(address, creds, options=[("grpc.ssl_target_name_override", server_name(peer)),
                                                            *(options or [])])

    def caller(self, context: Any) -> str | None:
        """The pinned party whose identity certified the caller's certificate, or None."""
        pems = context.auth_context().get("x509_pem_cert") or []
        if not pems:
            return None
        pem = pems[0]
        with self._lock:
            if pem in self._seen:
                return self._seen[pem]
        who = self._verify(pem)
        with self._lock:
            if len(self._seen) > 1024:
                self._seen.clear()
            self._seen[pem] = who
        return who

    def _verify(self, pem: bytes) -> str | None:
        try:
            cert = x509.load_pem_x509_certificate(pem)
            subject = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value
            issuer = cert.issuer.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value
        except (ValueError, IndexError):
            return None
        if issuer != _ISSUER + subject or subject not in self.pinned:
            return None
        try:
            self.pinned[subject].verify(cert.signature, cert.tbs_certificate_bytes)
        except InvalidSignature:
            return None
        return str(subject)
