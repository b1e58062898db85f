"""The one error model: the failures a request can meet, each with the HTTP status and the gRPC code it
becomes and a message naming the problem.

Every front end (REST, KServe v2 REST, KServe v2 gRPC) turns an exception into an answer through
``failure_of``, and nowhere else: a ``ClientError`` (or subclass) answers its own status and code with its
message; anything else is a server fault (500 / INTERNAL, logged with its traceback).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

log = logging.getLogger("nnserve.errors")


class ClientError(ValueError):
    """A problem with the caller's input: a 4xx with a JSON body naming the problem."""

    status = 400
    grpc_code = "INVALID_ARGUMENT"  # a grpc.StatusCode name (this module does not import grpc)


class NotFound(ClientError):
    status = 404
    grpc_code = "NOT_FOUND"


class MethodNotAllowed(ClientError):
    status = 405
    grpc_code = "UNIMPLEMENTED"


class PayloadTooLarge(ClientError):
    status = 413
    grpc_code = "RESOURCE_EXHAUSTED"


class UnsupportedMedia(ClientError):
    status = 415


class Unavailable(ClientError):
    """Not the caller's mistake, but the same shape (status + message): the model is loading or failed to
    load, its queue is full, or the worker is at its admission limit. ``retry_after`` (seconds) becomes the
    Retry-After header."""

    status = 503
    grpc_code = "UNAVAILABLE"

    def __init__(self, message: str, retry_after: int | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class Conflict(ClientError):
    """Another change to the served models is in progress (one at a time, across every worker)."""

    status = 409
    grpc_code = "ABORTED"


class ChangeTimeout(ClientError):
    """A change that not every worker confirmed in time (they apply it when they come back)."""

    status = 504
    grpc_code = "DEADLINE_EXCEEDED"


@dataclass(frozen=True)
class Failure:
    """What a failed request answers, whatever its protocol."""

    status: int  # HTTP
    grpc_code: str  # grpc.StatusCode name
    message: str
    retry_after: int | None = None

    def body(self) -> dict:
        return {"error": self.message}


def failure_of(error: BaseException, where: str = "request") -> Failure:
    """The answer to ``error``. A client mistake (or an expected refusal) logs one DEBUG line; anything else
    is a server fault, logged with its traceback under ``where`` (the endpoint or RPC)."""
    if isinstance(error, ClientError):
        log.debug("%s: %d %s", where, error.status, error)
        return Failure(error.status, error.grpc_code, str(error), getattr(error, "retry_after", None))
    log.error("%s failed", where, exc_info=error)
    return Failure(500, "INTERNAL", f"internal error: {type(error).__name__}: {error}")
