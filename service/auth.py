"""Who may call what: the bearer tokens of the management API and (optionally) of the inference API.

Three kinds of endpoint (``rest_scope`` / ``grpc_scope`` say which a request is):

- ``OPEN``: health and readiness (``/livez``, ``/readyz``, ``/v2/health/*``, ``/v2/models/NAME/ready``;
  gRPC ServerLive, ServerReady, ModelReady) and ``/metrics``: probes and Prometheus never need a token.
- ``MANAGEMENT``: Triton's model-repository extension (``/v2/repository/...``; gRPC RepositoryIndex,
  RepositoryModelLoad, RepositoryModelUnload). Needs the token of ``NNSERVE_MANAGEMENT_TOKEN_FILE``; with
  no such file configured the management API is off (403 saying how to turn it on), never open.
- ``INFERENCE``: everything else (inference, metadata, the OpenAPI page: deny by default). Open unless
  ``NNSERVE_INFERENCE_TOKEN_FILE`` is set; then its token or the management token (an admin may do
  everything) is needed.

REST sends ``Authorization: Bearer <token>``, gRPC the metadata ``authorization: Bearer <token>`` (what
``tritonclient`` sends with ``headers={"authorization": "Bearer ..."}``). No token: 401 / UNAUTHENTICATED;
a wrong one: 403 / PERMISSION_DENIED. Nothing about a sent token is echoed or logged. The front door
(service/front.py) checks REST requests before anything else, ``GrpcLock`` gRPC calls (service/kserve_grpc.py).

A token file missing at start is generated (``secrets.token_urlsafe(32)``, mode 0600, its folder 0700
when created), race-free across worker processes starting at once; only its path is logged. A file
others may read (group/other permission bits) stops the server, as ssh refuses such keys; one exception,
as PostgreSQL makes for its key file: a root-owned file may be group-readable (0440) when the server is not
root, which is how Kubernetes mounts a Secret for a non-root pod with ``fsGroup``.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import re
import secrets
import stat
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import grpc

from service.playground import is_playground
from service.settings import SettingsError

if TYPE_CHECKING:
    from service.settings import Settings

log = logging.getLogger("nnserve.auth")

OPEN, INFERENCE, MANAGEMENT = "open", "inference", "management"
OPEN_PATHS = frozenset({"/livez", "/readyz", "/metrics", "/v2/health/live", "/v2/health/ready"})
MODEL_READY = re.compile(r"/v2/models/[^/]+(/versions/[^/]+)?/ready")
GRPC_SERVICE = "/inference.GRPCInferenceService/"
GRPC_OPEN = frozenset(GRPC_SERVICE + m for m in ("ServerLive", "ServerReady", "ModelReady"))
GRPC_MANAGEMENT = frozenset(GRPC_SERVICE + m for m in ("RepositoryIndex", "RepositoryModelLoad",
                                                       "RepositoryModelUnload"))
TOKEN_RE = re.compile(rb"[\x21-\x7e]+")  # visible ASCII: what a header value can carry unchanged
MIN_TOKEN_CHARS = 16
MAKE_ONE = "python -c 'import secrets; print(secrets.token_urlsafe(32))'"
HOW_TO_TURN_ON = ("the management API is off: start the server with NNSERVE_MANAGEMENT_TOKEN_FILE=<path> (a token "
                  "is generated in that file at first start, owner-only; `make serve` sets it to "
                  ".nnserve/management-token) and send 'Authorization: Bearer <token>'")


class TokenFileError(SettingsError):
    """A token file the server cannot use: the server does not start."""


def rest_scope(path: str) -> str:
    """OPEN, MANAGEMENT or INFERENCE for an HTTP request path (ASGI's decoded ``scope["path"]``)."""
    # The playground's files hold no data: its page calls the API with the user's token (service/playground.py).
    if path in OPEN_PATHS or MODEL_READY.fullmatch(path) or is_playground(path):
        return OPEN
    if path == "/v2/repository" or path.startswith("/v2/repository/"):
        return MANAGEMENT
    return INFERENCE


def grpc_scope(method: str) -> str:
    """OPEN, MANAGEMENT or INFERENCE for a gRPC method's full name (``/package.Service/Method``)."""
    if method in GRPC_OPEN:
        return OPEN
    return MANAGEMENT if method in GRPC_MANAGEMENT else INFERENCE


def load_token(path: str, setting: str) -> bytes:
    """The token in the file at ``path`` (named by the variable ``setting`` in messages); generated there if
    the file does not exist. TokenFileError if the file is unusable (others may read it, empty, not a
    token)."""
    file = Path(path).expanduser()
    if not file.exists():
        _generate(file, setting)
    try:
        mode = file.stat()
        text = file.read_bytes().strip()
    except OSError as e:
        raise TokenFileError(f"{setting}: cannot read the token file {file}: {e.strerror or e}") from e
    # Group read is allowed only for a root-owned file read by a non-root server (a Secret with fsGroup).
    group_read_ok = mode.st_uid == 0 and os.geteuid() != 0
    if mode.st_mode & (0o037 if group_read_ok else 0o077):
        raise TokenFileError(f"{setting}: permissions {stat.S_IMODE(mode.st_mode):04o} of the token file {file} "
                             "are too open: others could read the token; make it readable by its owner only "
                             f"(chmod 600 {file})")
    if not text:
        raise TokenFileError(f"{setting}: the token file {file} is empty; write a token in it ({MAKE_ONE}), or "
                             "delete it to have one generated")
    if not TOKEN_RE.fullmatch(text) or len(text) < MIN_TOKEN_CHARS:
        raise TokenFileError(f"{setting}: the token in {file} must be one word of at least {MIN_TOKEN_CHARS} "
                             f"visible ASCII characters (no spaces); e.g. {MAKE_ONE}")
    return text


def _generate(file: Path, setting: str) -> None:
    """Write a new token to ``file`` unless another process does first. The token is written whole to a
    temporary file, then hard-linked into place: link() never replaces an existing file, so of several
    workers starting at once exactly one wins and the others read its complete file."""
    try:
        if not file.parent.exists():
            file.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=file.parent, prefix=f".{file.name}.")  # mkstemp: mode 0600
        try:
            with os.fdopen(fd, "w", encoding="ascii") as f:
                f.write(secrets.token_urlsafe(32) + "\n")
                f.flush()
                os.fsync(f.fileno())
            os.link(tmp, file)
            log.warning("%s: generated a token in %s (owner-only): send it as 'Authorization: Bearer <token>'",
                        setting, file)
        except FileExistsError:
            pass  # another process was first: its token is the one
        finally:
            os.unlink(tmp)
    except OSError as e:
        raise TokenFileError(f"{setting}: the token file {file} does not exist and cannot be created: "
                             f"{e.strerror or e}") from e


@dataclass(frozen=True)
class Denied:
    """Why a request may not pass: the HTTP status (401 no usable token, 403 wrong token or API off), the
    gRPC code and the message (which never contains what the client sent)."""
    status: int
    message: str

    @property
    def grpc_code(self) -> grpc.StatusCode:
        return grpc.StatusCode.UNAUTHENTICATED if self.status == 401 else grpc.StatusCode.PERMISSION_DENIED


class Lock:
    """The tokens of this server and the check of a request's credentials against them."""

    def __init__(self, management: bytes | None = None, inference: bytes | None = None) -> None:
        # Compared as SHA-256 digests: constant time whatever the sent length (compare_digest alone
        # returns early on a length mismatch).
        self._management = [_digest(management)] if management else []
        self._inference = ([_digest(inference)] if inference else []) + self._management
        self.inference_locked = inference is not None

    @classmethod
    def from_settings(cls, settings: Settings) -> Lock:
        """The tokens of the files the settings name (generated if missing); TokenFileError if unusable."""
        management = inference = None
        if settings.management_token_file:
            management = load_token(settings.management_token_file, "NNSERVE_MANAGEMENT_TOKEN_FILE")
            log.info("management API on: token in %s", Path(settings.management_token_file).expanduser())
        else:
            log.info("management API off (NNSERVE_MANAGEMENT_TOKEN_FILE is not set)")
        if settings.inference_token_file:
            inference = load_token(settings.inference_token_file, "NNSERVE_INFERENCE_TOKEN_FILE")
            log.info("inference API locked: token in %s (the management token works too)",
                     Path(settings.inference_token_file).expanduser())
        return cls(management, inference)

    def free(self, scope: str) -> bool:
        """Whether endpoints of ``scope`` need no token on this server."""
        return scope == OPEN or (scope == INFERENCE and not self.inference_locked)

    def check(self, scope: str, authorization: list[bytes]) -> Denied | None:
        """None if a request to an endpoint of ``scope`` with these Authorization header values (or gRPC
        ``authorization`` metadata values) may pass, else why not."""
        if self.free(scope):
            return None
        accepted = self._management if scope == MANAGEMENT else self._inference
        what = "the management API" if scope == MANAGEMENT else "this endpoint"
        if not accepted:
            return Denied(403, HOW_TO_TURN_ON)
        if not authorization:
            return Denied(401, f"{what} needs a token: send 'Authorization: Bearer <token>'")
        if len(authorization) > 1:
            return Denied(401, "send one Authorization header, not several")
        scheme, _, token = authorization[0].strip().partition(b" ")
        token = token.strip()
        if scheme.lower() != b"bearer" or not token:
            return Denied(401, f"{what} needs 'Authorization: Bearer <token>'; the Authorization header sent "
                               "is not of that form")
        sent = _digest(token)
        if not any(hmac.compare_digest(sent, digest) for digest in accepted):
            return Denied(403, f"the token is not valid for {what}")
        return None

    def check_rest(self, path: str, headers: list[tuple[bytes, bytes]]) -> Denied | None:
        """``check`` for an ASGI request: its path and its (lower-case) header list."""
        scope = rest_scope(path)
        if self.free(scope):  # the hot path without an inference token: no header scan
            return None
        return self.check(scope, [value for name, value in headers if name == b"authorization"])

    def check_grpc(self, method: str, metadata: tuple | None) -> Denied | None:
        """``check`` for a gRPC call: its full method name and its invocation metadata."""
        return self.check(grpc_scope(method), [value.encode("utf-8", "replace") if isinstance(value, str) else value
                                               for key, value in metadata or () if key == "authorization"])


def _digest(token: bytes) -> bytes:
    return hashlib.sha256(token).digest()


class GrpcLock(grpc.aio.ServerInterceptor):
    """The lock on every gRPC call, before its handler runs (and before its request is parsed)."""

    def __init__(self, lock: Lock) -> None:
        self.lock = lock

    async def intercept_service(self, continuation, handler_call_details: grpc.HandlerCallDetails):
        denied = self.lock.check_grpc(handler_call_details.method, handler_call_details.invocation_metadata)
        handler = await continuation(handler_call_details)
        if denied is None or handler is None:  # None: no such method, UNIMPLEMENTED as without the lock
            return handler

        async def deny(request, context: grpc.aio.ServicerContext) -> None:
            await context.abort(denied.grpc_code, denied.message)

        kind = f"{'stream' if handler.request_streaming else 'unary'}_" \
               f"{'stream' if handler.response_streaming else 'unary'}"
        # No request_deserializer: the request stays unparsed bytes.
        return getattr(grpc, f"{kind}_rpc_method_handler")(deny, response_serializer=handler.response_serializer)
