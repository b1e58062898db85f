"""The failures a request can meet, each with the HTTP status it becomes and a message naming the problem.

Every front end (REST, KServe v2 REST, KServe v2 gRPC) maps these the same way; anything else is a
server fault (500, logged with its traceback).
"""

from __future__ import annotations


class ClientError(ValueError):
    """A problem with the caller's input: a 4xx with a JSON body naming the problem."""

    status = 400


class NotFound(ClientError):
    status = 404


class PayloadTooLarge(ClientError):
    status = 413


class UnsupportedMedia(ClientError):
    status = 415


class Unavailable(ClientError):
    """Not the caller's mistake, but the same shape (status + message): the model is loading or failed to
    load, or its queue is full. ``retry_after`` (seconds) becomes the Retry-After header."""

    status = 503

    def __init__(self, message: str, retry_after: int | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class Conflict(ClientError):
    """Another change to the served models is in progress (one at a time, across every worker)."""

    status = 409


class ChangeTimeout(ClientError):
    """A change that not every worker confirmed in time (they apply it when they come back)."""

    status = 504
