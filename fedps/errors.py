"""The project's exception tree: one base, one level of kinds.

Every layer (``engine``, ``ps``, ``messaging``, ``algorithms``) raises these so
that a caller can catch ``FedpsError`` once. They are plain exceptions with
only picklable state, so they survive Ray actor and Spark task boundaries.
Messages say what went wrong and, where it helps, what to do about it.
"""

from __future__ import annotations


class FedpsError(Exception):
    """Base of every error fedps raises on purpose."""


class ConfigError(FedpsError, ValueError):
    """A configuration key is unknown, missing or has a bad value."""


class DataError(FedpsError, ValueError):
    """Input data is malformed, mismatched or missing."""


class ProtocolError(FedpsError):
    """A peer broke a protocol rule, or a message was tampered with or foreign."""


class PeerError(FedpsError):
    """A peer did not answer in time, or went away."""


class CryptoError(FedpsError, ValueError):
    """A cryptographic operation was refused: wrong key, overflow, bad encoding."""
