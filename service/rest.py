"""The REST endpoints: ``/classify``, ``/features``, ``/generate``, ``GET /models`` and the merged OpenAPI
``/docs.json``, as one Starlette app that the BentoML service mounts.

These routes are plain Starlette rather than ``@bentoml.api``: measured on 2 cores, BentoML's API
machinery (its file input, pydantic validation, per-request bookkeeping) cost 2x the throughput of the
same work in a mounted route (measured when the routes moved; not a docs/bench.md figure). The request
format is unchanged
(``curl -F image=@digit.png localhost:3000/classify``); BentoML's Python client cannot call these
routes: use any HTTP client (docs/service.md).

Each request: body read once within its limit, parsed once, image decoded once (in the event loop when
small, else in a thread), then the model's dynamic batcher. Every client mistake is a 4xx JSON
``{"error": ...}`` naming it; a full queue is 503 with Retry-After.
"""

from __future__ import annotations

import asyncio
import io
import json
import logging
from collections.abc import AsyncIterator, Callable

import numpy as np
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from models.kinds.image import class_probabilities
from service import images, metrics, openapi
from service.errors import ClientError
from service.generation import Generation, GenerationRequest, read_choices
from service.repository import Repository
from service.runtime import ModelRuntime
from service.uploads import (
    bool_field,
    check_fields,
    choice_field,
    int_field,
    parse_multipart,
    read_limited,
    text_field,
)

log = logging.getLogger("nnserve.rest")

INLINE_DECODE_BYTES = 32 << 10  # smaller uploads decode in the event loop: a thread hop costs more
MULTIPART_OVERHEAD = 64 << 10  # form framing and the other fields, on top of the upload limit
MAX_JSON_BYTES = 64 << 10  # a /generate body: a 2000-character prompt and a few numbers


def error_response(request: metrics.RequestMetrics | None, error: Exception) -> JSONResponse:
    """The JSON error for a failed request, counted by outcome. Client mistakes log one DEBUG line; a
    server fault logs its traceback."""
    if isinstance(error, ClientError):
        status, message = error.status, str(error)
        log.debug("%s: %d %s", request.endpoint if request else "-", status, message)
    else:
        status, message = 500, f"internal error: {type(error).__name__}: {error}"
        log.error("%s failed", request.endpoint if request else "-", exc_info=error)
    if request is not None:
        request.finish(status)
    retry_after = getattr(error, "retry_after", None)
    return JSONResponse({"error": message}, status_code=status,
                        headers={"Retry-After": str(retry_after)} if retry_after else None)


def create_app(get_repository: Callable[[], Repository], base_spec: Callable[[], dict]) -> Starlette:
    """The REST routes. ``base_spec()`` is BentoML's own OpenAPI document, which /docs.json extends."""

    async def read_image_form(request: Request, allowed: tuple[str, ...]) -> dict:
        settings = get_repository().settings
        body = await read_limited(request, settings.max_upload_bytes + MULTIPART_OVERHEAD, "upload")
        parts = parse_multipart(body, request.headers.get("content-type", ""))
        check_fields(parts, allowed)
        if "image" not in parts:
            raise ClientError("missing form field 'image': the image file (curl -F image=@digit.png ...)")
        return parts

    def chosen_model(parts: dict, endpoint: str) -> ModelRuntime:
        """The form's ``model``, else the endpoint's default: the first configured model of a fitting kind."""
        repository = get_repository()
        name = text_field(parts, "model", "") if "model" in parts else repository.default_model(endpoint)
        return repository.model_for(name, endpoint, text_field(parts, "version", ""))

    async def image_input(data: bytes, model, request: metrics.RequestMetrics) -> np.ndarray:
        """Upload bytes -> model input [1, C, H, W] (decoded once; large uploads in a worker thread)."""
        settings = get_repository().settings
        spec = model.metadata["preprocessing"]
        with request.timed("preprocess"):
            if len(data) <= INLINE_DECODE_BYTES:
                x = images.preprocess_upload(data, spec, settings.max_upload_bytes, settings.max_image_pixels)
            else:
                x = await asyncio.to_thread(images.preprocess_upload, data, spec, settings.max_upload_bytes,
                                            settings.max_image_pixels)
        return x[None]

    async def run_image(model, x: np.ndarray, request: metrics.RequestMetrics) -> tuple[dict, int]:
        outputs, stats = await get_repository().run(model, {model.roles["image"]: x})
        request.observe("batch_wait", stats.queue_s)
        request.observe("inference", stats.inference_s)
        return outputs, stats.batch_size

    async def classify(request: Request) -> Response:
        record = metrics.RequestMetrics("classify")
        try:
            parts = await read_image_form(request, ("image", "model", "version", "top_k"))
            model = chosen_model(parts, "/classify")
            if "scores" not in model.roles:
                raise ClientError(f"model {model.name!r} has no class scores (its card has no labels); use /features")
            record.begin(model)
            top_k = int_field(parts, "top_k", 5, minimum=1)
            outputs, batch_size = await run_image(model, await image_input(parts["image"].data, model, record),
                                                  record)
        except Exception as e:
            return error_response(record, e)
        probabilities = class_probabilities(model.metadata["scores"], outputs[model.roles["scores"]][0])
        labels = model.metadata["labels"]
        best = np.argsort(-probabilities, kind="stable")[:top_k]
        record.finish(200)
        return JSONResponse({"model": model.tag, "batch_size": batch_size, "timings_ms": record.timings_ms(),
                             "predictions": [{"label": labels[i], "probability": float(probabilities[i])}
                                             for i in best]})

    async def features(request: Request) -> Response:
        record = metrics.RequestMetrics("features")
        try:
            parts = await read_image_form(request, ("image", "model", "version", "normalize", "format"))
            model = chosen_model(parts, "/features")
            record.begin(model)
            normalize = bool_field(parts, "normalize", False)
            fmt = choice_field(parts, "format", ("json", "npy"))
            outputs, batch_size = await run_image(model, await image_input(parts["image"].data, model, record),
                                                  record)
        except Exception as e:
            return error_response(record, e)
        vector = outputs[model.roles["features"]][0].astype(np.float32)
        if normalize:
            vector = vector / max(float(np.linalg.norm(vector)), 1e-12)
        record.finish(200)
        if fmt == "npy":
            buffer = io.BytesIO()
            np.save(buffer, vector)
            return Response(buffer.getvalue(), media_type="application/x-npy",
                            headers={"X-Model": model.tag, "X-Feature-Dim": str(vector.size)})
        return JSONResponse({"model": model.tag, "dim": int(vector.size), "features": vector.tolist(),
                             "batch_size": batch_size, "timings_ms": record.timings_ms()})

    async def generate(request: Request) -> Response:
        record = metrics.RequestMetrics("generate")
        stream_metrics = None
        try:
            body = await read_limited(request, MAX_JSON_BYTES)
            try:
                parsed = json.loads(body)
            # ValueError: also an integer of over 4300 digits (Python's int parsing limit), not only JSONDecodeError
            except (UnicodeDecodeError, ValueError, RecursionError) as e:
                raise ClientError(f"the body must be a JSON object ({type(e).__name__}: {str(e)[:200]})") from e
            job = GenerationRequest.from_dict(parsed)
            for name in ("model", "version"):
                if not isinstance(getattr(job, name), str):
                    raise ClientError(f"{name} must be a string, got {type(getattr(job, name)).__name__}")
            sse = "text/event-stream" in request.headers.get("accept", "")
            if job.stream is True and isinstance(job.n, int) and job.n > 1 and not sse:
                raise ClientError(f"n is {job.n} with stream: true, which needs Accept: text/event-stream: a chunked "
                                  "text/plain stream cannot say which sample a chunk belongs to")
            repository = get_repository()
            if "model" not in parsed:  # GenerationRequest's own default is a name that may not be served
                job.model = repository.default_model("/generate")
            model = repository.model_for(job.model, "/generate", job.version)
            record.begin(model)
            # Streams get a chunk per NNSERVE_STREAM_FLUSH_MS at most; a JSON answer is woken once, at the end.
            generations = repository.generator(model).submit_choices(
                job, repository.settings.stream_flush_ms / 1e3 if job.stream else None)
            stream_metrics = metrics.StreamMetrics(model).start()
            chunks = generations[0] if job.n == 1 else read_choices(generations)
            # Wait for the first characters before answering: a request that cannot start gets its error.
            try:
                first = await anext(chunks)
            except StopAsyncIteration:  # one sample whose first characters are a stop string: an empty text
                first = ""
        except Exception as e:
            if stream_metrics is not None:
                stream_metrics.stop()
                await chunks.aclose()
            return error_response(record, e)
        headers = {"X-Model": model.tag, "X-Seed": str(job.seed)}
        final = {"model": model.tag, "seed": job.seed}
        if job.n > 1:
            return await generate_choices(job, first, chunks, record, stream_metrics, headers, final)
        stream_metrics.chars(len(first))
        if job.stream:
            body = stream_body(first, chunks, record, stream_metrics, sse, final)
            return StreamingResponse(body, headers=headers,
                                     media_type="text/event-stream" if sse else "text/plain; charset=utf-8")
        parts = [first]
        try:
            async for chunk in chunks:
                parts.append(chunk)
                stream_metrics.chars(len(chunk))
        except Exception as e:
            return error_response(record, e)
        finally:
            stream_metrics.stop()
        record.finish(200)
        text, reason = "".join(parts), chunks.finish_reason
        return JSONResponse({"model": model.tag, "text": text, "seed": job.seed, "finish_reason": reason,
                             "choices": [{"index": 0, "text": text, "finish_reason": reason}],
                             "timings_ms": record.timings_ms()})

    async def generate_choices(job: GenerationRequest, first: tuple[int, str, str | None],
                               chunks: AsyncIterator[tuple[int, str, str | None]], record: metrics.RequestMetrics,
                               stream_metrics: metrics.StreamMetrics, headers: dict, final: dict) -> Response:
        """The answer to n > 1 samples: their event stream, or one JSON answer with a ``choices`` list."""
        if job.stream:
            body = stream_choices(first, chunks, record, stream_metrics, final | {"n": job.n})
            return StreamingResponse(body, headers=headers, media_type="text/event-stream")
        texts: list[list[str]] = [[] for _ in range(job.n)]
        reasons: list[str | None] = [None] * job.n
        try:
            part = first
            while True:
                index, text, reason = part
                stream_metrics.chars(len(text))
                texts[index].append(text)
                reasons[index] = reason or reasons[index]
                try:
                    part = await anext(chunks)
                except StopAsyncIteration:
                    break
        except Exception as e:
            return error_response(record, e)
        finally:
            stream_metrics.stop()
            await chunks.aclose()
        record.finish(200)
        return JSONResponse({"model": final["model"], "seed": job.seed, "n": job.n,
                             "choices": [{"index": i, "text": "".join(parts), "finish_reason": reasons[i]}
                                         for i, parts in enumerate(texts)],
                             "timings_ms": record.timings_ms()})

    async def list_models(request: Request) -> Response:
        return JSONResponse({"models": get_repository().describe()})

    async def docs_json(request: Request) -> Response:
        return JSONResponse(openapi.merge(base_spec()))

    return Starlette(routes=[
        Route("/classify", classify, methods=["POST"]),
        Route("/features", features, methods=["POST"]),
        Route("/generate", generate, methods=["POST"]),
        Route("/models", list_models, methods=["GET"]),
        Route("/docs.json", docs_json, methods=["GET"]),
    ])


async def stream_body(first: str, chunks: Generation, record: metrics.RequestMetrics,
                      stream_metrics: metrics.StreamMetrics, sse: bool, final: dict) -> AsyncIterator[str]:
    """The streamed characters, each chunk everything sampled since the last one was sent. Chunked text,
    or Server-Sent Events: a ``data:`` event per chunk (one ``data:`` line per line of text), then an
    ``end`` event with the model, seed, character count and finish reason (or an ``error`` event)."""
    status, count = 500, 0  # failed mid-stream: the client gets a cut-off body, the server log the error
    try:
        chunk = first
        while True:
            count += len(chunk)
            if chunk:  # only the first can be empty (a stop string at once): no empty event
                yield sse_event(chunk) if sse else chunk
            try:
                chunk = await anext(chunks)
            except StopAsyncIteration:
                break
            stream_metrics.chars(len(chunk))
        if sse:
            yield sse_event(json.dumps({**final, "chars": count, "finish_reason": chunks.finish_reason}), "end")
        status = 200
    except (GeneratorExit, asyncio.CancelledError):
        status = 499  # the client went away (nginx's "client closed request"): counted as client_error
        raise
    except Exception as e:
        log.error("generation stream failed", exc_info=e)
        if sse:
            yield sse_event(json.dumps({"error": str(e)}), "error")
    finally:
        await chunks.aclose()  # frees the request's batch slot at once
        stream_metrics.stop()
        record.finish(status)


async def stream_choices(first: tuple[int, str, str | None], chunks: AsyncIterator[tuple[int, str, str | None]],
                         record: metrics.RequestMetrics, stream_metrics: metrics.StreamMetrics, final: dict
                         ) -> AsyncIterator[str]:
    """Server-Sent Events for n > 1 samples: a ``choice`` event per chunk, ``{"index", "text"}`` with the
    sample's ``finish_reason`` on its last one, then an ``end`` event with the model, seed, n, and each
    sample's character count and finish reason (or an ``error`` event)."""
    status, counts, reasons = 500, [0] * final["n"], [None] * final["n"]
    try:
        part = first
        while True:
            index, text, reason = part
            stream_metrics.chars(len(text))
            counts[index] += len(text)
            reasons[index] = reason or reasons[index]
            yield sse_event(json.dumps({"index": index, "text": text} | ({"finish_reason": reason} if reason else {})),
                            "choice")
            try:
                part = await anext(chunks)
            except StopAsyncIteration:
                break
        choices = [{"index": i, "chars": count, "finish_reason": reason}
                   for i, (count, reason) in enumerate(zip(counts, reasons, strict=True))]
        yield sse_event(json.dumps({**final, "chars": sum(counts), "choices": choices}), "end")
        status = 200
    except (GeneratorExit, asyncio.CancelledError):
        status = 499  # the client went away: closing ``chunks`` below frees every sample's slot
        raise
    except Exception as e:
        log.error("generation stream failed", exc_info=e)
        yield sse_event(json.dumps({"error": str(e)}), "error")
    finally:
        await chunks.aclose()
        stream_metrics.stop()
        record.finish(status)


def sse_event(data: str, event: str | None = None) -> str:
    lines = "".join(f"data: {line}\n" for line in data.split("\n"))
    return (f"event: {event}\n" if event else "") + lines + "\n"
