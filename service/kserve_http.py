"""Open Inference Protocol (KServe v2) over REST, as a Starlette app the BentoML service mounts at ``/v2``.

Speaks what ``tritonclient.http`` sends and parses: plain JSON tensors (``data`` lists) and Triton's binary
tensor extension (a JSON header of ``Inference-Header-Content-Length`` bytes followed by the raw tensors;
inputs carry ``parameters.binary_data_size``, outputs are asked for with ``parameters.binary_data`` or the
request parameter ``binary_data_output``). Triton's extras: BYTES protocol inputs (encoded ``image`` rows,
a ``text_input`` prompt), the classification extension (``parameters.classification`` on an output) and the
generate extension (``/generate``, ``/generate_stream`` as Server-Sent Events). Every client mistake is a
4xx with ``{"error": "..."}``.
"""

from __future__ import annotations

import asyncio
import json
import logging
import zlib
from collections.abc import AsyncIterator, Callable
from typing import TYPE_CHECKING

import numpy as np
import orjson
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from service import kserve, management
from service.errors import ClientError, PayloadTooLarge
from service.kserve import RequestTensor
from service.settings import Settings
from service.uploads import read_limited

if TYPE_CHECKING:
    from service.repository import Repository

log = logging.getLogger("nnserve.kserve.http")

HEADER_LENGTH = "Inference-Header-Content-Length"


def error(exc: Exception, status: int) -> JSONResponse:
    retry_after = getattr(exc, "retry_after", None)
    return JSONResponse({"error": str(exc)}, status_code=status,
                        headers={"Retry-After": str(retry_after)} if retry_after else None)


async def read_body(request: Request, max_bytes: int) -> bytes:
    """The request body, refused past ``max_bytes``; gzip/deflate bodies (tritonclient's
    ``request_compression_algorithm``) are inflated with the same bound."""
    body = await read_limited(request, max_bytes)
    encoding = request.headers.get("content-encoding", "identity").lower()
    if encoding in ("gzip", "deflate"):
        # wbits: 16+ = gzip container, MAX_WBITS = zlib container (what Python's zlib.compress writes).
        inflater = zlib.decompressobj(16 + zlib.MAX_WBITS if encoding == "gzip" else zlib.MAX_WBITS)
        try:
            body = inflater.decompress(body, max_bytes + 1)
        except zlib.error as e:
            raise ClientError(f"request body is not valid {encoding} data ({e})") from e
        if len(body) > max_bytes:
            raise PayloadTooLarge(f"decompressed request body is over the {max_bytes}-byte limit")
        if not inflater.eof:  # else a cut-off body would be reported as bad JSON, not as what it is
            raise ClientError(f"request body is truncated {encoding} data (the compressed stream does not end)")
    elif encoding != "identity":
        raise ClientError(f"unsupported Content-Encoding {encoding!r}; use gzip, deflate or none")
    return body


def parse_json(data: bytes, exact: bool = False) -> object:
    """orjson: ~10x faster than the standard library on the number arrays of a v2 body (measured: 59 vs
    591 us for a 1x1x32x32 FP32 tensor). But orjson refuses some JSON the standard library reads (NaN,
    1e400, nesting past 1024 levels) and reads integers past 64 bits as floats, while the validation and
    its messages are written for the standard library's results. So what orjson refuses goes to the
    standard library, and so does, with ``exact``, a request being re-read to explain its error."""
    if not exact:
        try:
            return orjson.loads(data)
        except orjson.JSONDecodeError:
            pass
    return json.loads(data)


def split_body(request: Request, body: bytes, exact: bool = False) -> tuple[dict, bytes]:
    """JSON inference header and the binary tensor section that follows it (may be empty); ``exact``: see
    parse_json."""
    raw_length = request.headers.get(HEADER_LENGTH)
    if raw_length is None:
        header_bytes, binary = body, b""
    else:
        # isascii: str.isdigit() also accepts digits such as '²' that int() refuses.
        if not (raw_length.strip().isascii() and raw_length.strip().isdigit()) or int(raw_length) > len(body):
            raise ClientError(f"{HEADER_LENGTH} header is {raw_length[:50]!r}; expected the byte length of the JSON "
                              f"header, at most the body length {len(body)}")
        header_bytes, binary = body[:int(raw_length)], body[int(raw_length):]
    if not header_bytes:
        raise ClientError("empty request body; expected a JSON inference request with 'inputs'")
    try:
        header = parse_json(header_bytes, exact)
    # RecursionError: arrays nested deeper than the parser's stack; ValueError: also an integer of over
    # 4300 digits (Python's int parsing limit), not only JSONDecodeError.
    except RecursionError as e:
        raise ClientError("inference request header nests JSON arrays or objects too deeply to parse") from e
    except (UnicodeDecodeError, ValueError) as e:
        raise ClientError(f"inference request header is not valid JSON ({type(e).__name__}: {str(e)[:200]})") from e
    if not isinstance(header, dict):
        raise ClientError("inference request must be a JSON object with 'inputs'")
    if "id" in header and not isinstance(header["id"], str):  # echoed in the response: a NaN would be invalid JSON
        raise ClientError(f"request 'id' must be a string, got {type(header['id']).__name__}")
    return header, binary


def parameters_of(obj: dict, where: str) -> dict:
    params = obj.get("parameters") or {}
    if not isinstance(params, dict):
        raise ClientError(f"{where}: 'parameters' must be a JSON object")
    for key in ("shared_memory_region", "shared_memory_byte_size", "shared_memory_offset"):
        if key in params:
            raise ClientError(f"{where}: shared memory is not supported by this server; send the data inline")
    return params


def parse_inputs(runtime, header: dict, binary: bytes, settings: Settings | None = None) -> list[RequestTensor]:
    """Check the described inputs against the model and the request limits of ``settings``, then decode
    their data (JSON or binary section)."""
    items = header.get("inputs")
    if not isinstance(items, list) or not items:
        raise ClientError("inference request needs a non-empty 'inputs' list")
    tensors, sources = [], []
    for i, item in enumerate(items):
        if not isinstance(item, dict) or not isinstance(item.get("name"), str):
            raise ClientError(f"inputs[{i}] must be an object with 'name', 'datatype', 'shape' and data")
        name = item["name"]
        tensors.append(RequestTensor(name, item.get("datatype"), item.get("shape")))
        sources.append((item, parameters_of(item, f"input {name!r}")))
    kserve.check_header(runtime, tensors, settings)
    offset = 0
    for t, (item, params) in zip(tensors, sources, strict=True):
        size = params.get("binary_data_size")
        if size is not None:
            if isinstance(size, bool) or not isinstance(size, int) or size < 0 or offset + size > len(binary):
                raise ClientError(f"input {t.name!r}: binary_data_size {size!r} does not fit the "
                                  f"{len(binary) - offset} bytes left after the JSON header")
            if t.role:
                t.rows = kserve.split_bytes(t, binary[offset:offset + size])
            else:
                t.array = kserve.array_from_bytes(t, binary[offset:offset + size])
            offset += size
        elif "data" in item:
            if t.role:
                t.rows = kserve.bytes_from_values(t, item["data"])
            else:
                t.array = kserve.array_from_values(t, item["data"])
        else:
            raise ClientError(f"input {t.name!r} has neither 'data' nor parameters.binary_data_size")
    if offset != len(binary):
        raise ClientError(f"{len(binary) - offset} bytes after the JSON header belong to no input "
                          f"(check binary_data_size and {HEADER_LENGTH})")
    return tensors


def parse_outputs(runtime, header: dict, tensors: list[RequestTensor]
                  ) -> tuple[list[str], dict[str, bool], dict[str, int]]:
    """Output names to return and, per name, whether to send it binary and how many classes it answers
    (Triton's classification extension; 0 = the raw tensor)."""
    params = parameters_of(header, "request")
    default_binary = params.get("binary_data_output", False)
    if not isinstance(default_binary, bool):
        raise ClientError("request parameter 'binary_data_output' must be true or false")
    items = header.get("outputs") or []
    if not isinstance(items, list):
        raise ClientError("'outputs' must be a list of {'name': ...} objects")
    requested, binary, classes = [], {}, {}
    for i, item in enumerate(items):
        if not isinstance(item, dict) or not isinstance(item.get("name"), str):
            raise ClientError(f"outputs[{i}] must be an object with a 'name'")
        out_params = parameters_of(item, f"output {item['name']!r}")
        flag = out_params.get("binary_data", default_binary)
        if not isinstance(flag, bool):
            raise ClientError(f"output {item['name']!r}: parameters.binary_data must be true or false")
        requested.append(item["name"])
        binary[item["name"]] = flag
        classes[item["name"]] = out_params.get("classification", 0)
    names = kserve.select_outputs(runtime, requested, tensors)
    classes = {name: kserve.check_classification(runtime, name, count) for name, count in classes.items() if count}
    return names, {name: binary.get(name, default_binary) for name in names}, classes


def sampling_parameters(header: dict) -> dict:
    """A request's parameters other than the protocol's own (binary_data_output): a prompt's sampling options."""
    return {k: v for k, v in parameters_of(header, "request").items() if k != "binary_data_output"}


def infer_response(runtime, header: dict, outputs: dict[str, np.ndarray], binary: dict[str, bool]) -> Response:
    """JSON response, or JSON header + raw bytes when any output goes binary (Triton's layout)."""
    described, raw = [], []
    for name, array in outputs.items():
        entry = {"name": name, "datatype": kserve.kserve_datatype(array.dtype), "shape": list(array.shape)}
        if binary[name]:
            data = kserve.serialize_bytes(array) if array.dtype == object else np.ascontiguousarray(array).tobytes()
            entry["parameters"] = {"binary_data_size": len(data)}
            raw.append(data)
        else:
            if array.dtype.kind == "f" and not np.isfinite(array).all():
                # JSON has no NaN or Infinity; a strict client could not parse the reply. Finite inputs can still
                # overflow inside a model (e.g. values near the float32 maximum).
                raise ClientError(f"output {name!r} of model {runtime.name!r} has NaN or infinite values, which JSON "
                                  "cannot carry: send smaller inputs, or ask for it with parameters.binary_data=true")
            entry["data"] = ([v.decode(errors="replace") for v in array.ravel()] if array.dtype == object
                             else array.ravel().tolist())
        described.append(entry)
    body = {"model_name": runtime.name, "model_version": runtime.version, "outputs": described}
    if "id" in header:
        body["id"] = header["id"]
    json_bytes = json.dumps(body, separators=(",", ":")).encode()
    if not raw:
        return Response(json_bytes, media_type="application/json")
    return Response(b"".join([json_bytes, *raw]), media_type="application/octet-stream",
                    headers={HEADER_LENGTH: str(len(json_bytes))})


def generate_body(body: bytes) -> dict:
    """The generate extension's request: ``text_input`` and sampling options, in ``parameters`` or at the top
    level (Triton maps top-level keys to model inputs; TensorRT-LLM clients send ``max_tokens`` there), and
    an optional ``id``. Returns ``{"text_input", "parameters", "id"?}``."""
    try:
        parsed = json.loads(body) if body else None
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise ClientError(f"generate request is not valid JSON ({type(e).__name__}: {str(e)[:200]})") from e
    if not isinstance(parsed, dict):
        raise ClientError("generate request must be a JSON object with 'text_input'")
    if "text_input" not in parsed:
        raise ClientError("generate request needs 'text_input' (the prompt)")
    if not isinstance(parsed["text_input"], str):
        raise ClientError(f"text_input must be a string, got {type(parsed['text_input']).__name__}")
    if "id" in parsed and not isinstance(parsed["id"], str):
        raise ClientError(f"request 'id' must be a string, got {type(parsed['id']).__name__}")
    parameters = parsed.get("parameters") or {}
    if not isinstance(parameters, dict):
        raise ClientError("generate request: 'parameters' must be a JSON object")
    top_level = {k: v for k, v in parsed.items() if k not in ("text_input", "parameters", "id")}
    both = sorted(set(top_level) & set(parameters))
    if both:
        raise ClientError(f"{both} given both at the top level and in 'parameters': give each once")
    out = {"text_input": parsed["text_input"], "parameters": {**top_level, **parameters}}
    return out | ({"id": parsed["id"]} if "id" in parsed else {})


def generate_reply(runtime, body: dict, text: str | list[str]) -> dict:
    reply = {"model_name": runtime.name, "model_version": runtime.version, "text_output": text}
    return reply | ({"id": body["id"]} if "id" in body else {})


async def sse_events(runtime, body: dict, first: tuple[int, str, str | None],
                     parts: AsyncIterator[tuple[int, str, str | None]], n: int) -> AsyncIterator[str]:
    """One ``data:`` event per chunk (Triton's generate_stream), each sample's last with ``finish_reason``;
    with ``n`` > 1 each event says its sample in ``sequence_index`` (TensorRT-LLM's Triton name). A failure
    mid-stream is a last ``data: {"error": ...}`` event. Closing the response closes ``parts`` and so frees
    every batch slot at once."""
    try:
        index, text, reason = first
        left = n
        while True:
            event = (generate_reply(runtime, body, text) | ({"sequence_index": index} if n > 1 else {})
                     | ({"finish_reason": reason} if reason else {}))
            yield f"data: {json.dumps(event)}\n\n"
            left -= reason is not None
            if not left:
                return
            index, text, reason = await anext(parts)
    except Exception as e:  # the answer has started: the error goes into the stream, as Triton does
        if not isinstance(e, kserve.EXPECTED_FAILURES):
            log.error("generate_stream failed", exc_info=e)
        yield f"data: {json.dumps({'error': str(e)})}\n\n"
    finally:
        await parts.aclose()


def create_app(get_repository: Callable[[], Repository], prefix: str = "",
               max_request_bytes: int = 64 << 20) -> Starlette:
    """KServe v2 REST routes under ``prefix``.

    The service mounts this at ``/v2`` (prefix ""). A Starlette Mount at ``/v2`` never sees the bare path
    ``/v2`` (server metadata): Starlette answers it with a 307 to ``/v2/``, which tritonclient does not
    follow. Mounting at ``/`` with ``prefix="/v2"`` serves ``GET /v2`` directly; BentoML's own routes
    still win because mounted apps are tried last and only claim paths they have a route for.
    """
    async def server_metadata(request: Request) -> Response:
        return JSONResponse(kserve.server_metadata())

    async def live(request: Request) -> Response:
        return JSONResponse({"live": True})

    async def ready(request: Request) -> Response:
        repo = get_repository()
        is_ready = repo.snapshot().ready  # one snapshot: every model of one generation
        return JSONResponse({"ready": is_ready}, status_code=200 if is_ready else 503)

    async def model_metadata(request: Request) -> Response:
        p = request.path_params
        runtime = kserve.get_model(get_repository(), p["name"], p.get("version", ""))
        return JSONResponse(kserve.model_metadata(runtime, get_repository().served_versions(runtime.name)))

    async def model_ready(request: Request) -> Response:
        p = request.path_params
        runtime = kserve.get_model(get_repository(), p["name"], p.get("version", ""))
        is_ready = get_repository().is_ready(runtime.name)
        return JSONResponse({"name": runtime.name, "ready": is_ready}, status_code=200 if is_ready else 503)

    async def model_infer(request: Request) -> Response:
        p = request.path_params
        repo = get_repository()
        runtime = kserve.get_model(repo, p["name"], p.get("version", ""))
        body = await read_body(request, max_request_bytes)
        header, binary = split_body(request, body)
        try:
            tensors = parse_inputs(runtime, header, binary, repo.settings)
        except ClientError:  # say what is wrong as the standard library reads it (parse_json)
            header, binary = split_body(request, body, exact=True)
            tensors = parse_inputs(runtime, header, binary, repo.settings)
        names, binary_outputs, classes = parse_outputs(runtime, header, tensors)
        prompt = bool(tensors) and tensors[0].role == "prompt"
        outputs = await kserve.infer(repo, runtime, tensors, names, classes,
                                     sampling_parameters(header) if prompt else None)
        return infer_response(runtime, header, outputs, binary_outputs)

    async def generate(request: Request) -> Response:
        """Triton's generate extension: ``{"text_input": ..., "parameters": {...}}`` -> one JSON answer. With
        ``n`` > 1, ``text_output`` and ``finish_reason`` are lists, one element per sample (Triton answers a
        multi-element output as a JSON array)."""
        repo, runtime, body = await generate_request(request)
        texts, reasons = await kserve.generate_text(repo, runtime, body["text_input"], body["parameters"])
        if len(texts) == 1:
            return JSONResponse(generate_reply(runtime, body, texts[0]) | {"finish_reason": reasons[0]})
        return JSONResponse(generate_reply(runtime, body, texts) | {"finish_reason": reasons})

    async def generate_stream(request: Request) -> Response:
        """The same as Server-Sent Events: a ``data:`` JSON object per chunk; the last one carries
        ``finish_reason``. Errors before the first chunk are a JSON error answer; later, a ``data:`` error."""
        repo, runtime, body = await generate_request(request)
        _, generations = kserve.start_generation(repo, runtime, body["text_input"], body["parameters"], stream=True)
        parts = kserve.chunks(runtime, generations)
        try:
            first = await anext(parts)  # a request that cannot start gets its error as a status code
        except BaseException:
            await parts.aclose()
            raise
        return StreamingResponse(sse_events(runtime, body, first, parts, len(generations)),
                                 media_type="text/event-stream")

    async def generate_request(request: Request) -> tuple[Repository, object, dict]:
        p = request.path_params
        repo = get_repository()
        runtime = kserve.get_model(repo, p["name"], p.get("version", ""))
        if not runtime.kind_module.generates:
            raise ClientError(f"model {runtime.name!r} is a {runtime.kind} model; the generate extension takes "
                              "text models")
        body = await read_body(request, max_request_bytes)
        return repo, runtime, generate_body(body)

    # -- management: Triton's model-repository extension (+ our traffic split), configuration, statistics ----

    async def management_body(request: Request) -> dict:
        body = await read_body(request, 1 << 20)
        try:
            parsed = json.loads(body) if body.strip() else {}
        except (UnicodeDecodeError, ValueError, RecursionError) as e:
            raise ClientError(f"the body must be a JSON object ({type(e).__name__}: {str(e)[:200]})") from e
        if not isinstance(parsed, dict):
            raise ClientError("the body must be a JSON object")
        return parsed

    def parameters(body: dict) -> dict:
        params = body.get("parameters") or {}
        if not isinstance(params, dict):
            raise ClientError("'parameters' must be a JSON object")
        return params

    async def repository_index(request: Request) -> Response:
        ready = (await management_body(request)).get("ready", False)
        if not isinstance(ready, bool):
            raise ClientError("'ready' must be true or false")
        return JSONResponse(await asyncio.to_thread(management.index, get_repository(), ready))

    async def repository_load(request: Request) -> Response:
        params = parameters(await management_body(request))
        return JSONResponse(await asyncio.to_thread(management.load, get_repository(),
                                                    request.path_params["name"], params))

    async def repository_unload(request: Request) -> Response:
        params = parameters(await management_body(request))
        return JSONResponse(await asyncio.to_thread(management.unload, get_repository(),
                                                    request.path_params["name"], params))

    async def repository_traffic(request: Request) -> Response:
        body = await management_body(request)
        return JSONResponse(await asyncio.to_thread(management.set_traffic, get_repository(),
                                                    request.path_params["name"], body))

    async def model_config(request: Request) -> Response:
        p = request.path_params
        return JSONResponse(management.model_config(get_repository(), p["name"], p.get("version", "")))

    async def model_stats(request: Request) -> Response:
        p = request.path_params
        return JSONResponse(await asyncio.to_thread(management.model_statistics, get_repository(),
                                                    p.get("name", ""), p.get("version", "")))

    async def expected_failure(request: Request, exc: Exception) -> Response:
        status = kserve.http_status(exc)
        if status >= 500 and status != 503:
            log.error("KServe v2 %s %s failed: %s", request.method, request.url.path, exc)
        return error(exc, status)

    async def http_error(request: Request, exc: HTTPException) -> Response:
        if exc.status_code == 404:
            return error(ClientError(f"no KServe v2 route {request.method} {request.url.path}"), 404)
        return error(ClientError(exc.detail), exc.status_code)

    async def server_error(request: Request, exc: Exception) -> Response:
        log.exception("KServe v2 %s %s failed", request.method, request.url.path)
        return error(RuntimeError(f"internal error: {type(exc).__name__}: {exc}"), 500)

    model = prefix + "/models/{name}"
    versioned = model + "/versions/{version}"
    repo_model = prefix + "/repository/models/{name}"
    routes = [Route(prefix or "/", server_metadata, methods=["GET"]),
              Route(prefix + "/health/live", live, methods=["GET"]),
              Route(prefix + "/health/ready", ready, methods=["GET"]),
              Route(prefix + "/repository/index", repository_index, methods=["POST"]),
              Route(repo_model + "/load", repository_load, methods=["POST"]),
              Route(repo_model + "/unload", repository_unload, methods=["POST"]),
              Route(repo_model + "/traffic", repository_traffic, methods=["POST"]),
              Route(prefix + "/models/stats", model_stats, methods=["GET"])]
    for base in (model, versioned):
        routes += [Route(base, model_metadata, methods=["GET"]),
                   Route(base + "/config", model_config, methods=["GET"]),
                   Route(base + "/stats", model_stats, methods=["GET"]),
                   Route(base + "/ready", model_ready, methods=["GET"]),
                   Route(base + "/infer", model_infer, methods=["POST"]),
                   Route(base + "/generate", generate, methods=["POST"]),
                   Route(base + "/generate_stream", generate_stream, methods=["POST"])]
    async def no_route(request: Request) -> Response:
        # Any other path under the prefix (e.g. a model name holding '/') gets a JSON error as every /v2 route
        # does, not the plain-text 404 of the app behind: 405 when a route has this path for another method.
        if any(route.path_regex.match(request.url.path) for route in routes[:-1]):
            return error(ClientError(f"{request.method} is not allowed on {request.url.path}"), 405)
        return error(ClientError(f"no KServe v2 route {request.method} {request.url.path}"), 404)

    routes.append(Route(prefix + "/{path:path}", no_route,
                        methods=["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"]))
    # Exception (a server fault) goes last: Starlette answers it and then re-raises it so it gets logged.
    handlers = {cls: expected_failure for cls in kserve.EXPECTED_FAILURES}
    return Starlette(routes=routes, exception_handlers={**handlers, HTTPException: http_error, Exception: server_error})
