"""The REST endpoints: ``/classify``, ``/features``, ``/generate``, ``GET /models`` and the merged OpenAPI
``/docs.json``: a codec over the data plane (service/dataplane.py), one short method per route, served by
the front door (service/front.py) through service/asgi.py.

These routes are not ``@bentoml.api``: BentoML's API machinery (its file input, pydantic validation,
per-request bookkeeping) cost 2x the throughput of the same work in a mounted route, and since then
Starlette's routing and middleware went too (service/asgi.py). The request format is unchanged
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
from collections.abc import AsyncGenerator, Callable

import numpy as np

from models.kinds.image import class_probabilities
from service import images, metrics, openapi
from service.asgi import HttpRequest, HttpResponse, Router, error_response, json_response
from service.dataplane import DataPlane
from service.errors import ClientError
from service.generation import Generation, GenerationRequest, read_choices
from service.runtime import ModelRuntime
from service.uploads import Part, bool_field, check_fields, choice_field, int_field, parse_multipart, text_field

log = logging.getLogger("nnserve.rest")

INLINE_DECODE_BYTES = 32 << 10  # smaller uploads decode in the event loop: a thread hop costs more
MULTIPART_OVERHEAD = 64 << 10  # form framing and the other fields, on top of the upload limit
MAX_JSON_BYTES = 64 << 10  # a /generate body: a 2000-character prompt and a few numbers
SSE, TEXT = b"text/event-stream", b"text/plain; charset=utf-8"


def failed(record: metrics.RequestMetrics, error: Exception) -> HttpResponse:
    """A failed request's JSON error, counted by outcome."""
    response = error_response(error, record.endpoint)
    record.finish(response.status)
    return response


class RestApi:
    """The REST routes over ``plane()`` (the worker's data plane); ``base_spec()`` is BentoML's own OpenAPI
    document, which /docs.json extends."""

    def __init__(self, plane: Callable[[], DataPlane], base_spec: Callable[[], dict]) -> None:
        self.plane, self.base_spec = plane, base_spec

    def router(self) -> Router:
        router = Router("REST")
        for path, method, handler in (("/classify", "POST", self.classify), ("/features", "POST", self.features),
                                      ("/generate", "POST", self.generate), ("/models", "GET", self.list_models),
                                      ("/docs.json", "GET", self.docs_json)):
            router.add(path, method, handler)
        return router

    async def image_form(self, request: HttpRequest, allowed: tuple[str, ...], endpoint: str
                         ) -> tuple[dict[str, Part], ModelRuntime]:
        """The form's fields and its model: ``model`` (and ``version``), else the endpoint's default."""
        plane, settings = self.plane(), self.plane().settings
        body = await request.body(settings.max_upload_bytes + MULTIPART_OVERHEAD, "upload")
        parts = parse_multipart(body, request.header(b"content-type") or "")
        check_fields(parts, allowed)
        if "image" not in parts:
            raise ClientError("missing form field 'image': the image file (curl -F image=@digit.png ...)")
        name = text_field(parts, "model", "") if "model" in parts else plane.default_model(endpoint)
        return parts, plane.model(name, text_field(parts, "version", ""), endpoint)

    async def run_image(self, model: ModelRuntime, data: bytes, record: metrics.RequestMetrics
                        ) -> tuple[dict[str, np.ndarray], int]:
        """Upload bytes -> model input [1, C, H, W] (decoded once; large uploads in a worker thread) -> the
        model's outputs and the size of the batch it ran in."""
        plane = self.plane()
        settings, spec = plane.settings, model.metadata["preprocessing"]
        with record.timed("preprocess"):
            if len(data) <= INLINE_DECODE_BYTES:
                x = images.preprocess_upload(data, spec, settings.max_upload_bytes, settings.max_image_pixels)
            else:
                x = await asyncio.to_thread(images.preprocess_upload, data, spec, settings.max_upload_bytes,
                                            settings.max_image_pixels)
        outputs, stats = await plane.infer(model, {model.roles["image"]: x[None]}, record)
        return outputs, stats.batch_size

    async def classify(self, request: HttpRequest) -> HttpResponse:
        record = metrics.RequestMetrics("classify")
        try:
            parts, model = await self.image_form(request, ("image", "model", "version", "top_k"), "/classify")
            if "scores" not in model.roles:
                raise ClientError(f"model {model.name!r} has no class scores (its card has no labels); use /features")
            record.begin(model)
            top_k = int_field(parts, "top_k", 5, minimum=1)
            outputs, batch_size = await self.run_image(model, parts["image"].data, record)
        except Exception as e:
            return failed(record, e)
        probabilities = class_probabilities(model.metadata["scores"], outputs[model.roles["scores"]][0])
        labels = model.metadata["labels"]
        best = np.argsort(-probabilities, kind="stable")[:top_k]
        record.finish(200)
        return json_response({"model": model.tag, "batch_size": batch_size, "timings_ms": record.timings_ms(),
                              "predictions": [{"label": labels[i], "probability": float(probabilities[i])}
                                              for i in best]})

    async def features(self, request: HttpRequest) -> HttpResponse:
        record = metrics.RequestMetrics("features")
        try:
            parts, model = await self.image_form(request, ("image", "model", "version", "normalize", "format"),
                                                 "/features")
            record.begin(model)
            normalize = bool_field(parts, "normalize", False)
            fmt = choice_field(parts, "format", ("json", "npy"))
            outputs, batch_size = await self.run_image(model, parts["image"].data, record)
        except Exception as e:
            return failed(record, e)
        vector = outputs[model.roles["features"]][0].astype(np.float32)
        if normalize:
            vector = vector / max(float(np.linalg.norm(vector)), 1e-12)
        record.finish(200)
        if fmt == "npy":
            buffer = io.BytesIO()
            np.save(buffer, vector)
            return HttpResponse(buffer.getvalue(), content_type=b"application/x-npy", headers=[
                (b"x-model", model.tag.encode()), (b"x-feature-dim", str(vector.size).encode())])
        return json_response({"model": model.tag, "dim": int(vector.size), "features": vector.tolist(),
                              "batch_size": batch_size, "timings_ms": record.timings_ms()})

    async def generation_job(self, request: HttpRequest) -> tuple[GenerationRequest, ModelRuntime, bool]:
        """The /generate body as a GenerationRequest, its model, and whether the client reads SSE."""
        body = await request.body(MAX_JSON_BYTES)
        try:
            parsed = json.loads(body)
        # ValueError: also an integer of over 4300 digits (Python's int parsing limit), not only JSONDecodeError
        except (UnicodeDecodeError, ValueError, RecursionError) as e:
            raise ClientError(f"the body must be a JSON object ({type(e).__name__}: {str(e)[:200]})") from e
        job = GenerationRequest.from_dict(parsed)
        for name in ("model", "version"):
            if not isinstance(getattr(job, name), str):
                raise ClientError(f"{name} must be a string, got {type(getattr(job, name)).__name__}")
        sse = "text/event-stream" in (request.header(b"accept") or "")
        if job.stream is True and isinstance(job.n, int) and job.n > 1 and not sse:
            raise ClientError(f"n is {job.n} with stream: true, which needs Accept: text/event-stream: a chunked "
                              "text/plain stream cannot say which sample a chunk belongs to")
        plane = self.plane()
        if "model" not in parsed:  # GenerationRequest's own default is a name that may not be served
            job.model = plane.default_model("/generate")
        return job, plane.model(job.model, job.version, "/generate"), sse

    async def generate(self, request: HttpRequest) -> HttpResponse:
        record = metrics.RequestMetrics("generate")
        try:
            job, model, sse = await self.generation_job(request)
            record.begin(model)
            generations = self.plane().generate(model, job)
        except Exception as e:
            return failed(record, e)
        stream_metrics = metrics.StreamMetrics(model).start()
        headers = [(b"x-model", model.tag.encode()), (b"x-seed", str(job.seed).encode())]
        final = {"model": model.tag, "seed": job.seed}
        # Wait for the first characters before answering: a request that cannot start gets its error.
        if job.n > 1:
            choices = read_choices(generations)
            try:
                first_choice = await anext(choices)  # never empty: each sample's last chunk has its reason
            except Exception as e:
                stream_metrics.stop()
                await choices.aclose()
                return failed(record, e)
            return await generate_choices(job, first_choice, choices, record, stream_metrics, headers, final)
        chunks = generations[0]
        try:
            first = await anext(chunks, "")  # "": the first characters are a stop string, an empty text
        except Exception as e:
            stream_metrics.stop()
            await chunks.aclose()
            return failed(record, e)
        stream_metrics.chars(len(first))
        if job.stream:
            return HttpResponse(stream_body(first, chunks, record, stream_metrics, sse, final),
                                content_type=SSE if sse else TEXT, headers=headers)
        return await whole_text(job, first, chunks, record, stream_metrics, final)

    async def list_models(self, request: HttpRequest) -> HttpResponse:
        return json_response({"models": self.plane().repository.describe()})

    async def docs_json(self, request: HttpRequest) -> HttpResponse:
        return json_response(openapi.merge(self.base_spec()))


async def whole_text(job: GenerationRequest, first: str, chunks: Generation, record: metrics.RequestMetrics,
                     stream_metrics: metrics.StreamMetrics, final: dict) -> HttpResponse:
    """One sample's JSON answer: every chunk read, then the text and why it ended."""
    parts = [first]
    try:
        async for chunk in chunks:
            parts.append(chunk)
            stream_metrics.chars(len(chunk))
    except Exception as e:
        return failed(record, e)
    finally:
        stream_metrics.stop()
    record.finish(200)
    text, reason = "".join(parts), chunks.finish_reason
    return json_response(final | {"text": text, "finish_reason": reason,
                                  "choices": [{"index": 0, "text": text, "finish_reason": reason}],
                                  "timings_ms": record.timings_ms()})


async def generate_choices(job: GenerationRequest, first: tuple[int, str, str | None],
                           chunks: AsyncGenerator[tuple[int, str, str | None], None], record: metrics.RequestMetrics,
                           stream_metrics: metrics.StreamMetrics, headers: list, final: dict) -> HttpResponse:
    """The answer to n > 1 samples: their event stream, or one JSON answer with a ``choices`` list."""
    if job.stream:
        return HttpResponse(stream_choices(first, chunks, record, stream_metrics, final | {"n": job.n}),
                            content_type=SSE, headers=headers)
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
        return failed(record, e)
    finally:
        stream_metrics.stop()
        await chunks.aclose()
    record.finish(200)
    return json_response({"model": final["model"], "seed": job.seed, "n": job.n,
                          "choices": [{"index": i, "text": "".join(parts), "finish_reason": reasons[i]}
                                      for i, parts in enumerate(texts)],
                          "timings_ms": record.timings_ms()})


async def stream_body(first: str, chunks: Generation, record: metrics.RequestMetrics,
                      stream_metrics: metrics.StreamMetrics, sse: bool, final: dict) -> AsyncGenerator[str, None]:
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


async def stream_choices(first: tuple[int, str, str | None],
                         chunks: AsyncGenerator[tuple[int, str, str | None], None], record: metrics.RequestMetrics,
                         stream_metrics: metrics.StreamMetrics, final: dict) -> AsyncGenerator[str, None]:
    """Server-Sent Events for n > 1 samples: a ``choice`` event per chunk, ``{"index", "text"}`` with the
    sample's ``finish_reason`` on its last one, then an ``end`` event with the model, seed, n, and each
    sample's character count and finish reason (or an ``error`` event)."""
    status, counts = 500, [0] * final["n"]
    reasons: list[str | None] = [None] * final["n"]
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
