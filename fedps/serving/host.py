"""The host's service: its part of the model on the rows the guest names by row key.

Per request the host learns which of its row keys the guest scores, and when;
it sends back its partial score of each row (vertical LR), or the direction
every split of its table sends each row (SecureBoost) (docs/protocols.md, "Online serving").
"""

from __future__ import annotations

from typing import Any

import grpc
import numpy as np

from fedps.errors import ConfigError
from fedps.serving.keys import split_keys
from fedps.serving.masking import FRAC_BITS, Masker
from fedps.serving.metrics import Metrics
from fedps.serving.model import LinearModel, Models, store_mismatch
from fedps.serving.rpc import PART, Refusal, generic, handler, invalid, parse, pb
from fedps.serving.store import FeatureStore
from fedps.serving.tls import PinnedTLS
from fedps.serving.trees import TreeModel, pack_directions


class HostService:
    def __init__(self, me: str, guest: str, models: Models, store: FeatureStore, tls: PinnedTLS,
                 metrics: Metrics, unknown_score: float, max_rows: int, masker: Masker | None = None) -> None:
        self.me, self.guest, self.models, self.store, self.tls = me, guest, models, store, tls
        self.masker = masker
        self.metrics, self.unknown_score, self.max_rows = metrics, unknown_score, max_rows
        self._columns: dict[str, np.ndarray | None] = {}

    def check(self, model: LinearModel) -> None:
        """A model is served only if the store has every feature it needs."""
        if model.kind == "tree" and self.masker is not None:
            raise ConfigError(f"{model.version} is a SecureBoost model: its hosts send split directions, "
                              "which are not summed, so serving.mask_with does not apply; unset it")
        if (model.kind == "sparse") != bool(getattr(self.store, "sparse", False)):
            raise ConfigError(store_mismatch(model, self.store))
        if model.kind == "sparse":
            return
        if model.kind == "linear" and getattr(self.store, "missing", False):
            raise ConfigError(f"the store {getattr(self.store, 'path', self.store)} may hold missing values "
                              f"(built with --missing-ok), which linear model {model.version} cannot score: "
                              "rebuild it without --missing-ok")
        columns = model.columns(self.store.feature_names, f"the store {getattr(self.store, 'path', self.store)}")
        # None: the store's columns are the model's, in order (no per-request copy)
        self._columns[model.digest] = None if np.array_equal(columns, np.arange(len(self.store.feature_names))) \
            else columns

    def handlers(self) -> Any:
        return generic("fedps.serving.v1.Host", {"Part": handler(PART, self.part, self.metrics)})

    def part(self, data: bytes, context: Any) -> bytes:
        caller = self.tls.caller(context)
        if caller != self.guest:
            self.metrics.inc("refused_callers_total", caller=caller or "unknown")
            raise Refusal(grpc.StatusCode.PERMISSION_DENIED,
                          f"{caller or 'an unidentified caller'} may not ask {self.me} for scores: "
                          f"only the guest {self.guest} may")
        request = parse(pb.PartRequest, data, "PartRequest")
        try:
            keys = split_keys(request.keys)
        except ValueError as exc:
            raise invalid(str(exc)) from None
        if not keys or len(keys) > self.max_rows:
            raise invalid(f"a request must have 1 to {self.max_rows} rows (serving.max_rows), got {len(keys)}")
        if self.masker is not None:
            self._check_masked(request)
        model = self.models.get(request.model_version)
        if model is None:
            raise Refusal(grpc.StatusCode.FAILED_PRECONDITION,
                          f"{self.me} serves model {', '.join(self.models.versions)}, not "
                          f"{request.model_version!r}: the guest and its hosts must serve the same training job")
        if model.kind == "sparse":
            ids, values, counts, found = self.store.lookup_sparse(keys)
            scores = model.score_sparse(ids, values, counts)
        else:
            x, found = self.store.lookup(keys)
            columns = self._columns[model.digest]
            if columns is not None:
                x = x[:, columns]
            if model.kind == "tree":
                return self._tree(model, x, found, len(keys) - int(np.count_nonzero(found)))
            scores = model.score(x)
        unknown = len(keys) - int(np.count_nonzero(found))
        if unknown:
            scores[~found] = self.unknown_score
            self.metrics.inc("unknown_ids_total", unknown)
        self.metrics.inc("rows_total", len(keys))
        if self.masker is None:
            reply = pb.PartReply(model_version=model.version, rows=len(keys), linear=pb.LinearPart(scores=scores))
        else:
            values = self.masker.mask(scores, model.version, request.request_id)
            reply = pb.PartReply(model_version=model.version, rows=len(keys),
                                 masked=pb.MaskedPart(values=values, frac_bits=FRAC_BITS))
        return reply.SerializeToString()

    def _tree(self, model: TreeModel, x: np.ndarray, found: np.ndarray, unknown: int) -> bytes:
        """Every split's direction for every row; an unknown row goes where missing values go."""
        if unknown:
            x[~found] = np.nan
            self.metrics.inc("unknown_ids_total", unknown)
        self.metrics.inc("rows_total", len(x))
        part = pb.TreePart(nodes=model.rules.wire, directions=pack_directions(model.rules.right(x)))
        return pb.PartReply(model_version=model.version, rows=len(x), tree=part).SerializeToString()

    def _check_masked(self, request: Any) -> None:
        if tuple(request.hosts) != self.masker.hosts:
            self.metrics.inc("refused_host_sets_total")
            raise Refusal(grpc.StatusCode.PERMISSION_DENIED,
                          f"{self.me} masks its part in the sum of hosts {', '.join(self.masker.hosts)} "
                          f"(serving.mask_with); a request for {', '.join(request.hosts) or 'no hosts'} is refused")
        if len(request.request_id) < 16 or not self.masker.fresh(request.request_id):
            raise invalid(f"request id {request.request_id!r} is reused or shorter than 16 characters: "
                          "a masked part needs a fresh one")

