"""What both services share: method names, refusals, and the handler wrapper that
turns them into gRPC status codes and metrics."""

from __future__ import annotations

import logging
import time
from typing import Any, Callable

import grpc

from fedps.serving import fedps_serving_v1_pb2 as pb
from fedps.serving.metrics import Metrics

log = logging.getLogger(__name__)

SCORE = "/fedps.serving.v1.Guest/Score"
PART = "/fedps.serving.v1.Host/Part"


class Refusal(Exception):
    """A request answered with a gRPC status other than OK, and a message that names the problem."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code


def invalid(message: str) -> Refusal:
    return Refusal(grpc.StatusCode.INVALID_ARGUMENT, message)


def parse(message_type: Any, data: bytes, what: str) -> Any:
    try:
        return message_type.FromString(data)
    except Exception as exc:  # noqa: BLE001 - protobuf's DecodeError and friends
        raise invalid(f"malformed {what}: {exc}") from None


def handler(method: str, serve: Callable[[bytes, Any], bytes], metrics: Metrics) -> Any:
    """A unary gRPC handler over raw bytes: refusals become statuses, everything is counted."""

    def run(request: bytes, context: Any) -> bytes:
        started = time.perf_counter()
        code = grpc.StatusCode.OK
        try:
            return serve(request, context)
        except Refusal as refusal:
            code, message = refusal.code, str(refusal)
        except Exception as exc:  # noqa: BLE001 - one bad request must not take the service down
            log.exception("%s failed", method)
            code, message = grpc.StatusCode.INTERNAL, f"internal error: {type(exc).__name__}: {exc}"
        finally:
            name = method.rsplit("/", 1)[-1]
            metrics.inc("requests_total", method=name, code=code.name)
            metrics.observe("request_seconds", time.perf_counter() - started, method=name)
        context.abort(code, message)   # raises

    return grpc.unary_unary_rpc_method_handler(run)


def generic(service: str, methods: dict[str, Any]) -> Any:
    return grpc.method_handlers_generic_handler(service, methods)


__all__ = ["pb", "Refusal", "invalid", "parse", "handler", "generic", "SCORE", "PART"]
