"""nnserve's BentoML services: ``bentoml serve service.service:NNServe``.

Two services, each its own process:

- ``ImageModels`` runs lenet5 and vgg_fc7. Its APIs are batchable, so BentoML's adaptive batcher
  merges concurrent calls into one ONNX Runtime call (up to NNSERVE_MAX_BATCH_SIZE items, waiting at
  most NNSERVE_MAX_LATENCY_MS). Only the entry service calls it (over a private Unix socket).
- ``NNServe`` is the entry service: ``/classify`` and ``/features`` (decode + preprocess the upload here,
  then hand the tensor to ImageModels), ``/generate`` (char LSTM/GRU with continuous batching of decode
  steps, in this process), ``GET /models``, the KServe v2 REST routes under ``/v2`` and the KServe v2
  gRPC server on NNSERVE_GRPC_PORT. The three front ends share one ``Repository`` (models + metrics).

Every client mistake answers 4xx with ``{"error": "..."}`` naming it (see docs/service.md).
"""

import asyncio
import contextlib
import functools
import io
import logging
import os
import time
from dataclasses import fields
from pathlib import Path
from typing import Annotated, Literal

import bentoml
import numpy as np
from bentoml.exceptions import BentoMLException, ServiceUnavailable
from onnxruntime.capi.onnxruntime_pybind11_state import InvalidArgument
from pydantic import Field
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from service import bentoml_fixes, images, metrics
from service.generation import MAX_NEW_CHARS, MAX_PROMPT_CHARS, ContinuousBatcher, GenerationRequest
from service.kserve_grpc import start_grpc_server
from service.kserve_http import create_app as create_kserve_app
from service.runtime import (
    DEFAULT_MODELS,
    ClientError,
    ModelRuntime,
    ModelSpec,
    NotFound,
    RemoteModel,
    Unavailable,
    load_remote,
    load_runtime,
)

bentoml_fixes.apply()  # before BentoML builds its ASGI apps (see the module)
log = logging.getLogger("nnserve.service")
# BentoML's server logging config sets the root logger to WARNING; our INFO lines (chosen execution
# provider, warm-up times, ...) belong in the server log.
logging.getLogger("nnserve").setLevel(os.environ.get("NNSERVE_LOG_LEVEL", "INFO"))

IMAGE_MODELS = ("lenet5", "vgg_fc7")  # run by ImageModels (adaptive batching)
TEXT_MODELS = ("char_lstm", "char_gru")  # run by NNServe (continuous batching of decode steps)
GRPC_PORT = int(os.environ.get("NNSERVE_GRPC_PORT", "8001"))
WORKERS = int(os.environ.get("NNSERVE_WORKERS", "1"))
MAX_BATCH_SIZE = int(os.environ.get("NNSERVE_MAX_BATCH_SIZE", "32"))
# A load-shedding bound, not a wait: a request the batcher expects to miss it is answered 503.
MAX_LATENCY_MS = int(os.environ.get("NNSERVE_MAX_LATENCY_MS", "500"))
GENERATION_BATCH_SIZE = int(os.environ.get("NNSERVE_GENERATION_BATCH_SIZE", "32"))
FEATURE_OUTPUT = "fc7"  # the feature-extractor output named in docs/architecture.md
SERVICE_CONFIG = {
    # BentoML's own request histograms: same buckets as ours (its default starts at 5 ms).
    "metrics": {"enabled": True, "duration": {"buckets": list(metrics.LATENCY_BUCKETS)}},
    "traffic": {"timeout": 300},  # a 2000-character generation on a busy CPU takes a while
}
GENERATION_DEFAULTS = {f.name: f.default for f in fields(GenerationRequest)}


def warmup_sizes(max_batch: int) -> tuple[int, ...]:
    """Powers of two up to ``max_batch``, and ``max_batch`` itself: the batch shapes served most."""
    return tuple(sorted({2 ** i for i in range(max_batch.bit_length()) if 2 ** i <= max_batch} | {max_batch}))


# BentoML 1.4.39's client for a dependency replaces its HTTP session every max_requests calls (default 100)
# or max_age seconds and closes the old one at once, failing the calls still in flight on it; under
# concurrent load that is a burst of errors every 100 requests. One long-lived session instead; the rare
# transport failure left (a keep-alive connection closed as it is reused) is retried in run_image.
IMAGE_MODELS_CONNECTION = {"max_requests": 2**31 - 1, "max_age": 86400.0}


@bentoml.service(workers=1, threads=1, runner_connection=IMAGE_MODELS_CONNECTION, **SERVICE_CONFIG)
class ImageModels:
    """lenet5 and vgg_fc7 with adaptive batching. Each API takes a float32 batch [N, C, H, W] and returns
    one entry per item: that item's outputs, plus the batch's size and inference seconds (for metrics)."""

    def __init__(self) -> None:
        self.runtimes: dict[str, ModelRuntime] = {}
        for name in IMAGE_MODELS:
            runtime = load_runtime(name)
            if not runtime.is_image:
                raise RuntimeError(f"{runtime.store_tag} is a {runtime.kind!r} model; {name} must be an image model")
            runtime.warmup(warmup_sizes(MAX_BATCH_SIZE))
            self.runtimes[name] = runtime

    @bentoml.api
    def signatures(self) -> dict:
        """What each model is and how it runs here (store tag, provider, graph signature)."""
        return {name: runtime.signature() for name, runtime in self.runtimes.items()}

    @bentoml.api(batchable=True, max_batch_size=MAX_BATCH_SIZE, max_latency_ms=MAX_LATENCY_MS)
    def lenet5(self, inputs: np.ndarray) -> list:
        return self._run("lenet5", inputs)

    @bentoml.api(batchable=True, max_batch_size=MAX_BATCH_SIZE, max_latency_ms=MAX_LATENCY_MS)
    def vgg_fc7(self, inputs: np.ndarray) -> list:
        return self._run("vgg_fc7", inputs)

    def _run(self, name: str, batch: np.ndarray) -> list[dict]:
        runtime = self.runtimes[name]
        start = time.perf_counter()
        outputs = runtime.run({runtime.inputs[0].name: batch})
        seconds = time.perf_counter() - start
        metrics.observe_batch(runtime, "adaptive", len(batch), seconds)
        # One entry per item: BentoML splits this list back into the merged requests.
        return [{"outputs": {k: v[i] for k, v in outputs.items()}, "inference_s": seconds, "batch_size": len(batch)}
                for i in range(len(batch))]


class Repository:
    """``service.runtime.ModelRepository`` for every front end: text models run in this process, image
    models in ImageModels (through its adaptive batcher). Records the per-request metrics of /v2."""

    def __init__(self, service: "NNServe") -> None:
        self.service = service

    def names(self) -> list[str]:
        return list(DEFAULT_MODELS)

    def get(self, name: str) -> ModelSpec:
        if name in self.service.text_models:
            return self.service.text_models[name]
        if name in self.service.image_models_remote:
            return self.service.image_models_remote[name]
        if name in IMAGE_MODELS:
            raise Unavailable(f"model {name!r} is still loading")
        raise NotFound(f"unknown model {str(name)[:100]!r}; served models: {', '.join(DEFAULT_MODELS)}")

    def is_ready(self, name: str) -> bool:
        return name in self.service.text_models or name in self.service.image_models_remote

    async def infer(self, name: str, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        request = metrics.RequestMetrics("v2")
        status = 500
        try:
            model = self.get(name)
            request.begin(model)
            model.check_feeds(feeds)
            if model.is_image:
                outputs, _ = await self.service.run_image(model, feeds[model.inputs[0].name], request)
            else:
                outputs = await asyncio.to_thread(self._run_here, model, feeds)
            status = 200
            return outputs
        except ClientError as e:
            status = e.status
            raise
        except BentoMLException as e:
            status = e.error_code.value
            raise
        finally:
            request.finish(status)

    @staticmethod
    def _run_here(model: ModelRuntime, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        start = time.perf_counter()
        try:
            outputs = model.run(feeds)
        except InvalidArgument as e:  # ONNX Runtime refused the input: a client mistake check_feeds missed
            raise ClientError(f"model {model.name!r} rejected the input: {e}") from e
        batch = feeds[model.inputs[0].name].shape[0]
        metrics.observe_batch(model, "none", batch, time.perf_counter() - start)
        return outputs


def error_response(request: metrics.RequestMetrics, error: Exception) -> JSONResponse:
    """The JSON error for a failed request (4xx names the client's mistake), counted by outcome."""
    if isinstance(error, ClientError):
        status = error.status
    elif isinstance(error, BentoMLException):  # from ImageModels: e.g. 503 when its batcher sheds load
        status = error.error_code.value
    else:
        log.error("%s failed", request.endpoint, exc_info=error)
        status = 500
    request.finish(status)
    message = str(error) if status < 500 or status == 503 else f"internal error: {type(error).__name__}: {error}"
    return JSONResponse({"error": message}, status_code=status)


def softmax(logits: np.ndarray) -> np.ndarray:
    z = np.exp(logits.astype(np.float64) - logits.max())
    return z / z.sum()


async def list_models(request: Request) -> Response:
    """GET /models: every served model with its version, kind, execution provider and tensors."""
    repository: Repository = bentoml.get_current_service().repository
    described = [repository.get(name).describe() if repository.is_ready(name) else {"name": name, "ready": False}
                 for name in repository.names()]
    return JSONResponse({"models": described})


models_app = Starlette(routes=[Route("/models", list_models, methods=["GET"])])
# Mounted at "/" with the "/v2" prefix inside (a Mount at /v2 would redirect the bare GET /v2); BentoML's
# own routes still win: mounted apps only claim the paths they have routes for.
kserve_app = create_kserve_app(lambda: bentoml.get_current_service().repository, prefix="/v2")


@bentoml.service(workers=WORKERS, **SERVICE_CONFIG)
@bentoml.asgi_app(models_app, path="/")
@bentoml.asgi_app(kserve_app, path="/")
class NNServe:
    """Image classification, FC7 features and text generation over REST; KServe v2 over REST and gRPC."""

    image_models = bentoml.depends(ImageModels)

    def __init__(self) -> None:
        self.text_models: dict[str, ModelRuntime] = {}
        self.batchers: dict[str, ContinuousBatcher] = {}
        for name in TEXT_MODELS:
            runtime = load_runtime(name)
            if runtime.kind != "char_lm":
                raise RuntimeError(f"{runtime.store_tag} is a {runtime.kind!r} model; {name} must be a char_lm")
            runtime.warmup(warmup_sizes(GENERATION_BATCH_SIZE))
            self.text_models[name] = runtime
            self.batchers[name] = ContinuousBatcher(runtime, GENERATION_BATCH_SIZE,
                                                    on_step=functools.partial(metrics.observe_batch, runtime,
                                                                              "continuous"))
        self.image_models_remote: dict[str, RemoteModel] = {}  # filled once ImageModels reports them
        self.repository = Repository(self)
        self.grpc_server = None
        self._background: set[asyncio.Task] = set()

    @bentoml.on_startup
    async def start(self) -> None:
        task = asyncio.get_running_loop().create_task(self._learn_image_models())
        self._background.add(task)
        task.add_done_callback(self._background.discard)
        self.grpc_server = await start_grpc_server(self.repository, GRPC_PORT)

    @bentoml.on_shutdown
    async def stop(self) -> None:
        if self.grpc_server is not None:
            await self.grpc_server.stop(grace=5)
        for batcher in self.batchers.values():
            await batcher.close()

    async def __is_ready__(self) -> bool:
        """/readyz: every model loaded and warmed up (image models: reported by ImageModels), gRPC up."""
        return self.grpc_server is not None and all(self.repository.is_ready(n) for n in DEFAULT_MODELS)

    async def _learn_image_models(self) -> None:
        """Ask ImageModels what it serves, retrying while it loads and warms up (and while BentoML has not
        yet set up the client of this dependency: that happens right after the startup hooks)."""
        started = last_report = time.monotonic()
        while True:
            try:
                signatures = await self.image_models.to_async.signatures()
                break
            except Exception as e:  # not up yet: client not set up, connection refused, 503, ...
                if time.monotonic() - last_report > 10:
                    log.info("still waiting for ImageModels after %.0f s: %s", time.monotonic() - started, e)
                    last_report = time.monotonic()
                await asyncio.sleep(0.2)
        for name, signature in signatures.items():
            self.image_models_remote[name] = model = load_remote(name, signature)
            log.info("image model %s (%s) served by ImageModels on %s", model.tag, model.store_tag, model.provider)

    # -- helpers shared by the endpoints ---------------------------------------------------------

    def model_for(self, name: str, endpoint: str, kinds: tuple[str, ...]) -> ModelSpec:
        """The served model ``name`` if ``endpoint`` can use its kind (NotFound / Unavailable / ClientError)."""
        model = self.repository.get(name)
        if model.kind not in kinds:
            ready = [self.repository.get(n) for n in DEFAULT_MODELS if self.repository.is_ready(n)]
            fitting = [m.name for m in ready if m.kind in kinds]
            raise ClientError(f"model {name!r} is a {model.kind} model; {endpoint} serves {', '.join(fitting)}")
        return model

    async def preprocess(self, image: Path, model: ModelSpec, request: metrics.RequestMetrics) -> np.ndarray:
        """Upload file -> model input [1, C, H, W] (in a thread: decoding a large JPEG takes a while)."""
        start = time.perf_counter()
        x = await asyncio.to_thread(images.preprocess_file, image, model.metadata["preprocessing"])
        request.observe("preprocess", time.perf_counter() - start)
        return x[None]

    async def run_image(self, model: ModelSpec, batch: np.ndarray,
                        request: metrics.RequestMetrics) -> tuple[dict[str, np.ndarray], int]:
        """A batch [N, C, H, W] through ImageModels' adaptive batcher: the outputs, and the size of the
        batch it ran in (the largest, if BentoML split it over two)."""
        start = time.perf_counter()
        rows = await self._call_image_models(model.name, batch)
        elapsed = time.perf_counter() - start
        inference = max(row["inference_s"] for row in rows)
        request.observe("batch_wait", max(0.0, elapsed - inference))
        request.observe("inference", inference)
        outputs = {name: np.stack([row["outputs"][name] for row in rows]) for name in rows[0]["outputs"]}
        return outputs, max(row["batch_size"] for row in rows)

    async def _call_image_models(self, name: str, batch: np.ndarray, attempts: int = 3) -> list[dict]:
        """One call of ImageModels' batchable API ``name``. Inference has no side effects, so a call that
        failed in transport (no HTTP answer: connection closed under it) is retried; an HTTP error is not."""
        for attempt in range(1, attempts + 1):
            try:
                return await getattr(self.image_models.to_async, name)(batch)
            except ServiceUnavailable as e:  # BentoML's batcher shed it (its own message is a generic one)
                raise Unavailable(f"model {name!r} is overloaded: its batcher could not serve the request within "
                                  f"{MAX_LATENCY_MS} ms (NNSERVE_MAX_LATENCY_MS); retry later") from e
            except BentoMLException:  # any other HTTP answer from ImageModels
                raise
            except Exception as e:
                if attempt == attempts:
                    raise
                log.warning("call to ImageModels.%s failed in transport (%s: %s); retry %d of %d",
                            name, type(e).__name__, e, attempt, attempts - 1)

    # -- REST endpoints ---------------------------------------------------------------------------

    @bentoml.api(route="/classify")
    async def classify(
        self,
        image: Annotated[Path, Field(description="The image file (multipart field `image`): PNG, JPEG, GIF, "
                                                 "BMP, TIFF, WebP, ...")],
        model: Annotated[str, Field(description="lenet5 or vgg_fc7")] = "lenet5",
        top_k: Annotated[int, Field(ge=1, description="How many classes to return (at most all)")] = 5,
    ) -> dict:
        """Classify an image: the top_k labels with softmax probabilities, highest first.

        Preprocessing is the model's training transform, read from its store metadata. Response:
        `model` (name:version), `predictions` [{label, probability}], `timings_ms`, `batch_size`."""
        request = metrics.RequestMetrics("classify")
        try:
            spec = self.model_for(model, "/classify", ("image_classifier", "image_feature_extractor"))
            request.begin(spec)
            x = await self.preprocess(image, spec, request)
            outputs, batch_size = await self.run_image(spec, x, request)
        except Exception as e:
            return error_response(request, e)
        probabilities = softmax(outputs["logits"][0])
        labels = spec.metadata["labels"]
        best = np.argsort(-probabilities, kind="stable")[:top_k]
        predictions = [{"label": labels[i], "probability": float(probabilities[i])} for i in best]
        request.finish(200)
        return {"model": spec.tag, "predictions": predictions, "batch_size": batch_size,
                "timings_ms": request.timings_ms()}

    @bentoml.api(route="/features")
    async def features(
        self,
        image: Annotated[Path, Field(description="The image file (multipart field `image`)")],
        model: Annotated[str, Field(description="A feature extractor (vgg_fc7)")] = "vgg_fc7",
        normalize: Annotated[bool, Field(description="L2-normalise the vector")] = False,
        format: Annotated[Literal["json", "npy"], Field(description="json, or npy: the float32 vector as "
                                                                    ".npy bytes (application/x-npy)")] = "json",
    ) -> dict:
        """The image's FC7 feature vector (4096 floats for the default vgg_fc7).

        JSON: `model`, `dim`, `features`, `timings_ms`. With `format=npy` the body is the vector as a
        float32 .npy file (np.load(io.BytesIO(body))), with the model in the X-Model header."""
        request = metrics.RequestMetrics("features")
        try:
            spec = self.model_for(model, "/features", ("image_feature_extractor",))
            request.begin(spec)
            x = await self.preprocess(image, spec, request)
            outputs, batch_size = await self.run_image(spec, x, request)
        except Exception as e:
            return error_response(request, e)
        vector = outputs[FEATURE_OUTPUT][0].astype(np.float32)
        if normalize:
            vector = vector / max(float(np.linalg.norm(vector)), 1e-12)
        request.finish(200)
        if format == "npy":
            buffer = io.BytesIO()
            np.save(buffer, vector)
            return Response(buffer.getvalue(), media_type="application/x-npy",
                            headers={"X-Model": spec.tag, "X-Feature-Dim": str(vector.size)})
        return {"model": spec.tag, "dim": int(vector.size), "features": vector.tolist(), "batch_size": batch_size,
                "timings_ms": request.timings_ms()}

    @bentoml.api(route="/generate")
    async def generate(
        self,
        prompt: Annotated[str, Field(description=f"Text to continue, 1..{MAX_PROMPT_CHARS} characters from "
                                                 "the model's vocabulary")],
        max_new_chars: Annotated[int, Field(description=f"Characters to sample, 1..{MAX_NEW_CHARS}")]
        = GENERATION_DEFAULTS["max_new_chars"],
        temperature: Annotated[float, Field(description="Softmax temperature, > 0")]
        = GENERATION_DEFAULTS["temperature"],
        top_k: Annotated[int | None, Field(description="Sample among the k likeliest characters (>= 1); "
                                                       "null = all")] = GENERATION_DEFAULTS["top_k"],
        seed: Annotated[int | None, Field(description="Same seed, same text; null = random (reported back)")]
        = GENERATION_DEFAULTS["seed"],
        model: Annotated[str, Field(description="char_lstm or char_gru")] = GENERATION_DEFAULTS["model"],
        stream: Annotated[bool, Field(description="Stream the characters as they are sampled "
                                                  "(chunked text/plain)")] = GENERATION_DEFAULTS["stream"],
    ) -> dict:
        """Continue the prompt character by character (continuous batching across concurrent requests).

        Returns `{model, text, seed, timings_ms}`; with `stream: true` the characters arrive as chunked
        `text/plain` while they are sampled (model and seed in the X-Model / X-Seed headers)."""
        request = metrics.RequestMetrics("generate")
        stream_metrics = None
        try:
            spec = self.model_for(model, "/generate", ("char_lm",))
            request.begin(spec)
            job = GenerationRequest(prompt=prompt, max_new_chars=max_new_chars, temperature=temperature,
                                    top_k=top_k, seed=seed, model=model, stream=stream)
            stream_metrics = metrics.StreamMetrics(spec).start()
            chars = self.batchers[spec.name].generate(job)
            # Wait for the first character before answering: a rejected request still gets its 4xx.
            first = await anext(chars)
        except Exception as e:
            if stream_metrics is not None:
                stream_metrics.stop()
            return error_response(request, e)
        stream_metrics.chars(1)
        if stream:
            return StreamingResponse(self._stream(first, chars, request, stream_metrics),
                                     media_type="text/plain; charset=utf-8",
                                     headers={"X-Model": spec.tag, "X-Seed": str(job.seed)})
        text = [first]
        try:
            async with contextlib.aclosing(chars):
                async for ch in chars:
                    text.append(ch)
                    stream_metrics.chars(1)
        except Exception as e:
            return error_response(request, e)
        finally:
            stream_metrics.stop()
        request.finish(200)
        return {"model": spec.tag, "text": "".join(text), "seed": job.seed, "timings_ms": request.timings_ms()}

    @staticmethod
    async def _stream(first: str, chars, request: metrics.RequestMetrics, stream_metrics: metrics.StreamMetrics):
        status = 500  # failed mid-stream: the client gets a cut-off body, the server log the error
        try:
            yield first
            async with contextlib.aclosing(chars):  # closing it frees the request's batch slot at once
                async for ch in chars:
                    stream_metrics.chars(1)
                    yield ch
            status = 200
        except (GeneratorExit, asyncio.CancelledError):
            status = 499  # the client went away (nginx's "client closed request"): counted as client_error
            raise
        finally:
            stream_metrics.stop()
            request.finish(status)


# Oversized uploads are refused from their Content-Length, before BentoML spools them to disk.
NNServe.add_asgi_middleware(images.UploadSizeLimit, paths=("/classify", "/features"))
