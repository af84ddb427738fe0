"""The guest's public service: joint scores for a batch of rows.

One request: hash the ids into row keys, send the keys to every host at once
(one round trip per batch, each under a deadline), compute the guest's own
part meanwhile, then add the hosts' parts in host order, as the batch joint
prediction does (``hetero_lr/predict.py``).
"""

from __future__ import annotations

import logging
import os
from typing import Any, Callable, Mapping

import grpc
import numpy as np

from fedps.errors import ConfigError, DataError
from fedps.serving.keys import keys_of, split_keys
from fedps.serving.masking import FRAC_BITS, unmask
from fedps.serving.metrics import Metrics
from fedps.serving.model import LinearModel, Models, store_mismatch
from fedps.serving.rpc import PART, SCORE, Refusal, generic, handler, invalid, parse, pb
from fedps.serving.store import FeatureStore
from fedps.serving.trees import TreeModel, scores_of, unpack_directions

log = logging.getLogger(__name__)

#: A host that did not answer in time or could not be reached: the fallback applies.
_FALLBACK = (grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.UNAVAILABLE)
_MARGIN_S = 0.002  # left of the caller's deadline to answer it after the hosts


class GuestService:
    def __init__(self, me: str, models: Models | None, hosts: Mapping[str, Any], hash_id: Callable[[str], bytes],
                 store: FeatureStore | None, metrics: Metrics, *, host_timeout_s: float,
                 on_host_failure: str, max_rows: int) -> None:
        self.me, self.models, self.hash_id, self.store, self.metrics = me, models, hash_id, store, metrics
        self.calls = {name: channel.unary_unary(PART) for name, channel in sorted(hosts.items())}
        self.host_timeout_s, self.on_host_failure, self.max_rows = host_timeout_s, on_host_failure, max_rows
        self._columns: dict[str, np.ndarray] = {}

    def check(self, model: LinearModel) -> None:
        """A model is served only if the guest's store (if any) has every feature it needs, and a tree
        model only with every host it was trained with and no "partial" fallback."""
        if model.kind == "sparse" and self.store is None:
            raise ConfigError(f"model {model.version} is a sparse LR model: the guest reads its sparse rows "
                              "from its store (serving.store, built from its LibSVM or tag:value file)")
        if model.kind == "tree":
            if model.forest is None:
                raise ConfigError(f"model {model.version} has no trees: it is a host's part of a SecureBoost "
                                  "model, and this is the guest")
            if set(model.hosts) != set(self.calls):
                raise ConfigError(f"model {model.version} was trained with hosts {', '.join(model.hosts)}; "
                                  f"serving.hosts names {', '.join(self.calls) or 'none'}")
            if self.on_host_failure != "fail":
                raise ConfigError(f"model {model.version} is a SecureBoost model: its trees need every host's "
                                  "directions, so serving.on_host_failure must be \"fail\"")
        if self.store is not None:
            where = f"the guest's store {getattr(self.store, 'path', self.store)}"
            if (model.kind == "sparse") != bool(getattr(self.store, "sparse", False)):
                raise ConfigError(store_mismatch(model, self.store))
            if model.kind == "sparse":
                return
            if model.kind == "linear" and getattr(self.store, "missing", False):
                raise ConfigError(f"{where} may hold missing values (built with --missing-ok), which linear "
                                  f"model {model.version} cannot score: rebuild it without --missing-ok")
            self._columns[model.digest] = model.columns(self.store.feature_names, where)

    def handlers(self) -> Any:
        return generic("fedps.serving.v1.Guest", {"Score": handler(SCORE, self.score, self.metrics)})

    # ------------------------------------------------------------ one request
    def score(self, data: bytes, context: Any) -> bytes:
        request = parse(pb.ScoreRequest, data, "ScoreRequest")
        model = self.models.current   # this request's version, whatever a reload does meanwhile
        if request.model_version and request.model_version != model.version:
            raise Refusal(grpc.StatusCode.FAILED_PRECONDITION,
                          f"the guest serves model {model.version}, not {request.model_version!r}")
        keys = self._keys(request)
        pending = self._ask_hosts(model, keys, context)
        x = self._features(request, model, keys)
        if model.kind == "tree":
            reply = self._trees(model, x, pending, len(keys))
        else:
            reply = self._linear(model, x if model.kind == "sparse" else model.score(x), pending, len(keys))
        self.metrics.inc("rows_total", len(keys))
        return reply.SerializeToString()

    def _linear(self, model: LinearModel, u: np.ndarray, pending: dict[str, Any], rows: int) -> Any:
        replies = {host: self._reply(host, future, model, rows) for host, future in pending.items()}
        missing = [host for host, reply in replies.items() if reply is None]
        masked = [r.masked.values for r in replies.values() if r is not None and r.WhichOneof("part") == "masked"]
        if masked:
            if missing:
                raise Refusal(grpc.StatusCode.UNAVAILABLE,
                              f"host {', '.join(missing)} did not answer in time, and the hosts mask their "
                              "parts (serving.mask_with): their sum needs every host")
            if len(masked) != len(replies):
                raise Refusal(grpc.StatusCode.INTERNAL, "some hosts masked their parts and others did not: "
                                                        "give every host the same serving.mask_with")
            u = u + unmask(masked)
        else:
            for reply in replies.values():
                if reply is not None:
                    u = u + np.asarray(reply.linear.scores, dtype=np.float64)
        return pb.ScoreReply(scores=u, probabilities=_sigmoid(u), model_version=model.version,
                             missing_hosts=missing, classes=1, objective="linear")

    def _trees(self, model: TreeModel, x: np.ndarray, pending: dict[str, Any], rows: int) -> Any:
        bits = {}
        for host, future in pending.items():
            reply = self._reply(host, future, model, rows)
            if reply is None:   # check() refuses "partial" for a tree model; a host's bits cannot be guessed
                raise Refusal(grpc.StatusCode.UNAVAILABLE, f"host {host} did not answer in time")
            try:
                bits[host] = (np.asarray(reply.tree.nodes, dtype=np.uint64),
                              unpack_directions(reply.tree.directions, len(reply.tree.nodes), rows))
            except DataError as exc:
                raise Refusal(grpc.StatusCode.INTERNAL, f"host {host} sent unreadable directions: {exc}") from None
        try:
            margins = model.margins(x, bits)
        except DataError as exc:
            raise Refusal(grpc.StatusCode.INTERNAL, f"{exc}: the guest and its hosts must serve the parts "
                                                    "of one model") from None
        return pb.ScoreReply(model_version=model.version, objective=model.objective, **scores_of(model, margins))

    def _keys(self, request: Any) -> list[bytes]:
        if request.ids and request.keys:
            raise invalid("give ids or keys, not both")
        try:
            keys = keys_of(request.ids, self.hash_id) if request.ids else split_keys(request.keys)
        except ValueError as exc:
            raise invalid(str(exc)) from None
        if not keys or len(keys) > self.max_rows:
            raise invalid(f"a request must have 1 to {self.max_rows} rows (serving.max_rows), got {len(keys)}")
        return keys

    def _features(self, request: Any, model: LinearModel, keys: list[bytes]) -> np.ndarray:
        rows = len(keys)
        if model.kind == "sparse":   # the guest's own part, from its sparse rows
            if request.features:
                raise invalid(f"model {model.version} is sparse (features keyed by id): the guest reads its "
                              "features from its store; send ids or keys alone")
            ids, values, counts, found = self.store.lookup_sparse(keys)
            if not found.all():
                self.metrics.inc("unknown_ids_total", int((~found).sum()))
            return model.score_sparse(ids, values, counts)
        if not request.features:
            if self.store is None:
                raise invalid("the request has no features and the guest has no store (serving.store)")
            x, found = self.store.lookup(keys)
            x = x[:, self._columns[model.digest]]
            if not found.all():
                self.metrics.inc("unknown_ids_total", int((~found).sum()))
                if model.kind == "tree":
                    x[~found] = np.nan   # as the hosts do: every split sends it where missing values go
            return x
        names = tuple(request.feature_names) or model.features
        if len(request.features) != rows * len(names):
            raise invalid(f"{len(request.features)} feature values for {rows} rows of {len(names)} features "
                          f"({', '.join(names)})")
        x = np.asarray(request.features, dtype=np.float64).reshape(rows, len(names))
        if model.kind == "tree":   # NaN is a missing value, which each split sends its learned way
            if np.isinf(x).any():
                raise invalid("a feature value is infinite (a missing value is NaN)")
        elif not np.isfinite(x).all():
            raise invalid("a feature value is NaN or infinite")
        if names == model.features:
            return x
        extra = sorted(set(names) - set(model.features))
        if extra or len(set(names)) != len(names):
            raise invalid(f"the request names features {', '.join(extra) or '(a name twice)'} that model "
                          f"{model.version} does not have; it has {', '.join(model.features)}")
        try:
            return x[:, model.columns(names, "the request")]
        except ValueError as exc:
            raise invalid(str(exc)) from None

    def _ask_hosts(self, model: LinearModel, keys: list[bytes], context: Any) -> dict[str, Any]:
        timeout = self.host_timeout_s
        remaining = context.time_remaining()
        if remaining is not None:
            timeout = max(0.001, min(timeout, remaining - _MARGIN_S))
        request = pb.PartRequest(model_version=model.version, keys=b"".join(keys), request_id=os.urandom(16).hex(),
                                 hosts=list(self.calls)).SerializeToString()
        if len(self.calls) == 1:   # one host: a blocking call, on this thread (no hand-off)
            ((host, call),) = self.calls.items()
            return {host: _Done(call, request, timeout)}
        return {host: call.future(request, timeout=timeout) for host, call in self.calls.items()}

    def _reply(self, host: str, future: Any, model: LinearModel, rows: int) -> Any:
        """The host's checked PartReply, or None when it is left out (on_host_failure = "partial")."""
        try:
            data = future.result()
        except grpc.RpcError as exc:
            code = exc.code()
            if code not in _FALLBACK:
                raise Refusal(code if code != grpc.StatusCode.INVALID_ARGUMENT else grpc.StatusCode.INTERNAL,
                              f"host {host} refused the request: {exc.details()}") from None
            self.metrics.inc("host_failures_total", host=host, reason=code.name, action=self.on_host_failure)
            if self.on_host_failure == "fail":
                raise Refusal(grpc.StatusCode.UNAVAILABLE,
                              f"host {host} did not answer in time ({code.name}: {exc.details()}); "
                              "serving.on_host_failure = \"fail\"") from None
            log.warning("scoring without host %s: %s", host, code.name)
            return None
        reply = pb.PartReply.FromString(data)
        kind = reply.WhichOneof("part")
        values = reply.linear.scores if kind == "linear" else reply.masked.values if kind == "masked" else ()
        count = rows if kind == "tree" else len(values)
        if reply.model_version != model.version or reply.rows != rows or count != rows or \
                (kind == "tree") != (model.kind == "tree") or \
                (kind == "masked" and reply.masked.frac_bits != FRAC_BITS):
            raise Refusal(grpc.StatusCode.INTERNAL,
                          f"host {host} answered model {reply.model_version!r} with {reply.rows} rows "
                          f"({kind}); expected {model.version} with {rows} scores")
        return reply

def _sigmoid(u: np.ndarray) -> np.ndarray:
    """``fedps.engine.vertical.scores.sigmoid`` (the batch prediction's), without np.clip's Python overhead."""
    return 1.0 / (1.0 + np.exp(-np.maximum(np.minimum(u, 500.0), -500.0)))


class _Done:
    """A blocking call made when its result is asked for, with the interface of a future."""

    def __init__(self, call: Any, request: bytes, timeout: float) -> None:
        self.call, self.request, self.timeout = call, request, timeout

    def result(self) -> bytes:
        return self.call(self.request, timeout=self.timeout)
