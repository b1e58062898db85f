"""Open Inference Protocol (KServe v2) over REST: a codec over the data plane (service/dataplane.py), one
short method per route, served by the front door (service/front.py) under ``/v2`` through service/asgi.py.

Speaks what ``tritonclient.http`` sends and parses: plain JSON tensors (``data`` lists) and Triton's binary
tensor extension (a JSON header of ``Inference-Header-Content-Length`` bytes followed by the raw tensors;
inputs carry ``parameters.binary_data_size``, outputs are asked for with ``parameters.binary_data`` or the
request parameter ``binary_data_output``). Triton's extras: the kinds' front ends as models of their own
(``<model>.image`` takes encoded ``image`` rows, ``<model>.text`` a ``text_input`` prompt; service/kserve.py),
the classification extension (``parameters.classification`` on an output) and the
generate extension (``/generate``, ``/generate_stream`` as Server-Sent Events). Every client mistake is a
4xx with ``{"error": "..."}``.
"""

from __future__ import annotations

import asyncio
import json
import logging
import zlib
from collections.abc import AsyncGenerator, Callable

import numpy as np
import orjson

from service import kserve, management, metrics
from service.asgi import HttpRequest, HttpResponse, Router, error_response, json_response
from service.dataplane import DataPlane
from service.errors import ClientError, PayloadTooLarge
from service.kserve import Inputs, RequestTensor, V2Model
from service.settings import Settings

log = logging.getLogger("nnserve.kserve.http")

HEADER_LENGTH = "Inference-Header-Content-Length"
HEADER_LENGTH_KEY = HEADER_LENGTH.lower().encode()  # as ASGI gives header names


async def read_body(request: HttpRequest, max_bytes: int) -> bytes:
    """The request body, refused past ``max_bytes``; gzip/deflate bodies (tritonclient's
    ``request_compression_algorithm``) are inflated with the same bound."""
    body = await request.body(max_bytes)
    encoding = (request.header(b"content-encoding") or "identity").lower()
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


def split_body(raw_length: str | None, body: bytes, exact: bool = False) -> tuple[dict, bytes]:
    """JSON inference header and the binary tensor section that follows it (may be empty); ``raw_length``:
    the Inference-Header-Content-Length header (None: the whole body is JSON); ``exact``: see parse_json."""
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


def parse_inputs(target: V2Model, header: dict, binary: bytes, settings: Settings | None = None) -> Inputs:
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
    kserve.check_header(target, tensors, settings)
    inputs = Inputs(target.front)
    offset = 0
    for t, (item, params) in zip(tensors, sources, strict=True):
        size = params.get("binary_data_size")
        if size is not None:
            if isinstance(size, bool) or not isinstance(size, int) or size < 0 or offset + size > len(binary):
                raise ClientError(f"input {t.name!r}: binary_data_size {size!r} does not fit the "
                                  f"{len(binary) - offset} bytes left after the JSON header")
            inputs.add_raw(t, binary[offset:offset + size])
            offset += size
        elif "data" in item:
            inputs.add_values(t, item["data"])
        else:
            raise ClientError(f"input {t.name!r} has neither 'data' nor parameters.binary_data_size")
    if offset != len(binary):
        raise ClientError(f"{len(binary) - offset} bytes after the JSON header belong to no input "
                          f"(check binary_data_size and {HEADER_LENGTH})")
    return inputs


def parse_outputs(target: V2Model, header: dict) -> tuple[list[str], dict[str, bool], dict[str, int]]:
    """Output names to return and, per name, whether to send it binary and how many classes it answers
    (Triton's classification extension; 0 = the raw tensor)."""
    params = parameters_of(header, "request")
    default_binary = params.get("binary_data_output", False)
    if not isinstance(default_binary, bool):
        raise ClientError("request parameter 'binary_data_output' must be true or false")
    items = header.get("outputs") or []
    if not isinstance(items, list):
        raise ClientError("'outputs' must be a list of {'name': ...} objects")
    requested: list[str] = []
    binary: dict[str, bool] = {}
    asked: dict[str, object] = {}
    for i, item in enumerate(items):
        if not isinstance(item, dict) or not isinstance(item.get("name"), str):
            raise ClientError(f"outputs[{i}] must be an object with a 'name'")
        out_params = parameters_of(item, f"output {item['name']!r}")
        flag = out_params.get("binary_data", default_binary)
        if not isinstance(flag, bool):
            raise ClientError(f"output {item['name']!r}: parameters.binary_data must be true or false")
        requested.append(item["name"])
        binary[item["name"]] = flag
        asked[item["name"]] = out_params.get("classification", 0)
    names = kserve.select_outputs(target, requested)
    classes = {name: kserve.check_classification(target, name, count) for name, count in asked.items() if count}
    return names, {name: binary.get(name, default_binary) for name in names}, classes


def sampling_parameters(header: dict) -> dict:
    """A request's parameters other than the protocol's own (binary_data_output): a prompt's sampling options."""
    return {k: v for k, v in parameters_of(header, "request").items() if k != "binary_data_output"}


def infer_response(target: V2Model, header: dict, outputs: dict[str, np.ndarray], binary: dict[str, bool]
                   ) -> HttpResponse:
    """JSON response, or JSON header + raw bytes when any output goes binary (Triton's layout)."""
    described, raw = [], []
    for name, array in outputs.items():
        entry: dict[str, object] = {"name": name, "datatype": kserve.kserve_datatype(array.dtype),
                                    "shape": list(array.shape)}
        if binary[name]:
            data = kserve.serialize_bytes(array) if array.dtype == object else np.ascontiguousarray(array).tobytes()
            entry["parameters"] = {"binary_data_size": len(data)}
            raw.append(data)
        else:
            if array.dtype.kind == "f" and not np.isfinite(array).all():
                # JSON has no NaN or Infinity; a strict client could not parse the reply. Finite inputs can still
                # overflow inside a model (e.g. values near the float32 maximum).
                raise ClientError(f"output {name!r} of model {target.name!r} has NaN or infinite values, which JSON "
                                  "cannot carry: send smaller inputs, or ask for it with parameters.binary_data=true")
            entry["data"] = ([v.decode(errors="replace") for v in array.ravel()] if array.dtype == object
                             else array.ravel().tolist())
        described.append(entry)
    body = {"model_name": target.name, "model_version": target.version, "outputs": described}
    if "id" in header:
        body["id"] = header["id"]
    json_bytes = orjson.dumps(body)
    if not raw:
        return HttpResponse(json_bytes)
    return HttpResponse(b"".join([json_bytes, *raw]), content_type=b"application/octet-stream",
                        headers=[(HEADER_LENGTH_KEY, str(len(json_bytes)).encode())])


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


def generate_reply(target: V2Model, body: dict, text: str | list[str]) -> dict:
    reply = {"model_name": target.name, "model_version": target.version, "text_output": text}
    return reply | ({"id": body["id"]} if "id" in body else {})


async def sse_events(target: V2Model, body: dict, first: tuple[int, str, str | None],
                     parts: AsyncGenerator[tuple[int, str, str | None], None], n: int
                     ) -> AsyncGenerator[str, None]:
    """One ``data:`` event per chunk (Triton's generate_stream), each sample's last with ``finish_reason``;
    with ``n`` > 1 each event says its sample in ``sequence_index`` (TensorRT-LLM's Triton name). A failure
    mid-stream is a last ``data: {"error": ...}`` event. Closing the response closes ``parts`` and so frees
    every batch slot at once."""
    try:
        index, text, reason = first
        left = n
        while True:
            event = (generate_reply(target, body, text) | ({"sequence_index": index} if n > 1 else {})
                     | ({"finish_reason": reason} if reason else {}))
            yield f"data: {json.dumps(event)}\n\n"
            left -= reason is not None
            if not left:
                return
            index, text, reason = await anext(parts)
    except Exception as e:  # the answer has started: the error goes into the stream, as Triton does
        if not isinstance(e, ClientError):
            log.error("generate_stream failed", exc_info=e)
        yield f"data: {json.dumps({'error': str(e)})}\n\n"
    finally:
        await parts.aclose()


def path_model(plane: DataPlane, request: HttpRequest) -> V2Model:
    """The model (or front end) the path names, held until the request is over."""
    return kserve.resolve(plane, request.params["name"], request.params.get("version", ""))


async def management_body(request: HttpRequest) -> dict:
    body = await read_body(request, 1 << 20)
    try:
        parsed = json.loads(body) if body.strip() else {}
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise ClientError(f"the body must be a JSON object ({type(e).__name__}: {str(e)[:200]})") from e
    if not isinstance(parsed, dict):
        raise ClientError("the body must be a JSON object")
    return parsed


def load_parameters(body: dict) -> dict:
    params = body.get("parameters") or {}
    if not isinstance(params, dict):
        raise ClientError("'parameters' must be a JSON object")
    return params


class KServeHttp:
    """KServe v2 REST routes under ``/v2`` over ``plane()`` (the worker's data plane)."""

    def __init__(self, plane: Callable[[], DataPlane], max_request_bytes: int = 64 << 20) -> None:
        self.plane, self.max_request_bytes = plane, max_request_bytes

    def router(self, prefix: str = "/v2") -> Router:
        router = Router("KServe v2")
        router.add(prefix, "GET", self.server_metadata)
        router.add(prefix + "/health/live", "GET", self.live)
        router.add(prefix + "/health/ready", "GET", self.ready)
        router.add(prefix + "/repository/index", "POST", self.repository_index)
        for action in ("load", "unload", "traffic"):
            router.add(prefix + "/repository/models/{name}/" + action, "POST", getattr(self, f"repository_{action}"))
        router.add(prefix + "/models/stats", "GET", self.model_stats)
        for base in (prefix + "/models/{name}", prefix + "/models/{name}/versions/{version}"):
            router.add(base + "/infer", "POST", self.model_infer)  # first: the hot path matches at once
            router.add(base, "GET", self.model_metadata)
            for suffix, method, handler in (("/config", "GET", self.model_config), ("/stats", "GET", self.model_stats),
                                            ("/ready", "GET", self.model_ready), ("/generate", "POST", self.generate),
                                            ("/generate_stream", "POST", self.generate_stream)):
                router.add(base + suffix, method, handler)
        return router

    async def server_metadata(self, request: HttpRequest) -> HttpResponse:
        return json_response(kserve.server_metadata())

    async def live(self, request: HttpRequest) -> HttpResponse:
        return json_response({"live": True})

    async def ready(self, request: HttpRequest) -> HttpResponse:
        """The data plane's readiness (the same answer as /readyz and gRPC ServerReady)."""
        readiness = self.plane().readiness()
        return json_response(readiness.body(), 200 if readiness.ready else 503)

    async def model_metadata(self, request: HttpRequest) -> HttpResponse:
        target = path_model(self.plane(), request)
        return json_response(kserve.model_metadata(target, self.plane().served_versions(target.runtime.name)))

    async def model_ready(self, request: HttpRequest) -> HttpResponse:
        """200 for a served model (version); unknown: 404, loading or failed: 503 with the reason."""
        target = path_model(self.plane(), request)
        return json_response({"name": target.name, "ready": True})

    async def model_infer(self, request: HttpRequest) -> HttpResponse:
        plane, record = self.plane(), metrics.RequestMetrics("v2")
        try:
            target = path_model(plane, request)
            record.begin(target)  # a front end's requests count under its own name
            body = await read_body(request, self.max_request_bytes)
            header, inputs = self.parse(target, request, body)
            names, binary_outputs, classes = parse_outputs(target, header)
            prompt = target.front is not None and target.front.role == "prompt"
            outputs = await kserve.infer(plane, target, inputs, names, record, classes,
                                         sampling_parameters(header) if prompt else None)
            response = infer_response(target, header, outputs, binary_outputs)
        except Exception as e:
            response = error_response(e, "KServe v2 infer")
        record.finish(response.status)
        return response

    def parse(self, target: V2Model, request: HttpRequest, body: bytes) -> tuple[dict, Inputs]:
        raw_length = request.header(HEADER_LENGTH_KEY)
        settings = self.plane().settings
        header, binary = split_body(raw_length, body)
        try:
            return header, parse_inputs(target, header, binary, settings)
        except ClientError:  # say what is wrong as the standard library reads it (parse_json)
            header, binary = split_body(raw_length, body, exact=True)
            return header, parse_inputs(target, header, binary, settings)

    async def generate(self, request: HttpRequest) -> HttpResponse:
        """Triton's generate extension: ``{"text_input": ..., "parameters": {...}}`` -> one JSON answer. With
        ``n`` > 1, ``text_output`` and ``finish_reason`` are lists, one element per sample (Triton answers a
        multi-element output as a JSON array)."""
        target, body = await self.generate_request(request)
        texts, reasons = await kserve.generate_text(self.plane(), target.runtime, body["text_input"],
                                                    body["parameters"])
        if len(texts) == 1:
            return json_response(generate_reply(target, body, texts[0]) | {"finish_reason": reasons[0]})
        return json_response(generate_reply(target, body, texts) | {"finish_reason": reasons})

    async def generate_stream(self, request: HttpRequest) -> HttpResponse:
        """The same as Server-Sent Events: a ``data:`` JSON object per chunk; the last one carries
        ``finish_reason``. Errors before the first chunk are a JSON error answer; later, a ``data:`` error."""
        target, body = await self.generate_request(request)
        _, generations = kserve.start_generation(self.plane(), target.runtime, body["text_input"],
                                                 body["parameters"], stream=True)
        parts = kserve.chunks(target.runtime, generations)
        try:
            first = await anext(parts)  # a request that cannot start gets its error as a status code
        except BaseException:
            await parts.aclose()
            raise
        return HttpResponse(sse_events(target, body, first, parts, len(generations)),
                            content_type=b"text/event-stream")

    async def generate_request(self, request: HttpRequest) -> tuple[V2Model, dict]:
        """The text model the path names: its text front end (``char_lstm.text``, whose input ``text_input``
        is) or, as before front ends had names, the model itself (``char_lstm``)."""
        target = path_model(self.plane(), request)
        runtime = target.runtime
        if not runtime.kind_module.generates or target.front is not None and target.front.role != "prompt":
            raise ClientError(f"model {target.name!r} is a {runtime.kind} model; the generate extension takes "
                              "text models")
        return target, generate_body(await read_body(request, self.max_request_bytes))

    # -- management: Triton's model-repository extension (+ our traffic split), configuration, statistics ----

    async def repository_index(self, request: HttpRequest) -> HttpResponse:
        ready = (await management_body(request)).get("ready", False)
        if not isinstance(ready, bool):
            raise ClientError("'ready' must be true or false")
        return json_response(await asyncio.to_thread(management.index, self.plane().repository, ready))

    async def repository_load(self, request: HttpRequest) -> HttpResponse:
        params = load_parameters(await management_body(request))
        return json_response(await asyncio.to_thread(management.load, self.plane().repository,
                                                     request.params["name"], params))

    async def repository_unload(self, request: HttpRequest) -> HttpResponse:
        params = load_parameters(await management_body(request))
        return json_response(await asyncio.to_thread(management.unload, self.plane().repository,
                                                     request.params["name"], params))

    async def repository_traffic(self, request: HttpRequest) -> HttpResponse:
        body = await management_body(request)
        return json_response(await asyncio.to_thread(management.set_traffic, self.plane().repository,
                                                     request.params["name"], body))

    async def model_config(self, request: HttpRequest) -> HttpResponse:
        p = request.params
        return json_response(management.model_config(self.plane().repository, p["name"], p.get("version", "")))

    async def model_stats(self, request: HttpRequest) -> HttpResponse:
        p = request.params
        return json_response(await asyncio.to_thread(management.model_statistics, self.plane().repository,
                                                     p.get("name", ""), p.get("version", "")))
