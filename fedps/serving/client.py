"""A small client of the guest's public API (for applications in Python, tests and the bench)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from fedps.serving.rpc import SCORE, pb


@dataclass(frozen=True)
class Scores:
    scores: np.ndarray
    probabilities: np.ndarray
    model_version: str
    missing_hosts: tuple[str, ...]
    classes: int = 1          # values per row (a multi-class SecureBoost model's classes)
    objective: str = ""       # "linear", or the SecureBoost model's objective

    def per_row(self, values: np.ndarray | None = None) -> np.ndarray:
        """``scores`` (or ``values``) as rows x classes."""
        values = self.scores if values is None else values
        return values.reshape(-1, max(self.classes, 1))


def score_request(ids: Sequence[str] = (), features: Any = None, feature_names: Sequence[str] = (),
                  keys: bytes = b"", model_version: str = "") -> bytes:
    """The serialized ScoreRequest of ``ids`` (or ``keys``) with a (rows, features) array."""
    values = () if features is None else np.asarray(features, dtype=np.float64).ravel()
    return pb.ScoreRequest(ids=list(ids), keys=keys, features=values, feature_names=list(feature_names),
                           model_version=model_version).SerializeToString()


class GuestClient:
    def __init__(self, address: str, channel: Any = None) -> None:
        import grpc

        self.channel = channel or grpc.insecure_channel(address)
        self._score = self.channel.unary_unary(SCORE)

    def score_bytes(self, request: bytes, timeout: float = 5.0) -> Scores:
        reply = pb.ScoreReply.FromString(self._score(request, timeout=timeout))
        return Scores(np.asarray(reply.scores), np.asarray(reply.probabilities), reply.model_version,
                      tuple(reply.missing_hosts), max(reply.classes, 1), reply.objective)

    def score(self, ids: Sequence[str] = (), features: Any = None, timeout: float = 5.0, **kw: Any) -> Scores:
        return self.score_bytes(score_request(ids, features, **kw), timeout=timeout)

    def close(self) -> None:
        self.channel.close()
