"""Where a /classify request's CPU goes: each stage of nnserve's request path timed in process with the
server's own functions (parse, decode, preprocess, queue hop, model, encode, metrics), beside the CPU the
live server spent per request (its processes' CPU time over a wrk row / the requests answered). What the
stages do not cover is the HTTP stack, the ASGI layers and the event loop: the bare-stack row (the
limit server, loadtest/baselines/limit.py) measures that part on its own.

Each stage: a warm-up, then the median of repeated calls on one thread (a stage's median is its cost when
nothing else runs; under load the same work competes for the cores). The queue hop is the batcher's
handoff alone (submit, worker thread wake-up, result back on the event loop): ``await batcher.infer`` minus
the model call it timed.
"""

from __future__ import annotations

import asyncio
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import cast

import numpy as np

STAGES = ("parse", "decode", "preprocess", "queue hop", "model", "encode", "metrics")


@dataclass
class Breakdown:
    stages_us: dict[str, float]  # stage -> median microseconds per request
    reference_preprocess_us: float  # training's array path (what the baselines used before issue 16)

    @property
    def total_us(self) -> float:
        return sum(self.stages_us.values())


def median_us(call: Callable[[], object], runs: int = 400, warmup: int = 20) -> float:
    for _ in range(warmup):
        call()
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return 1e6 * statistics.median(times)


def request_breakdown(tag: str, png: bytes, runs: int = 400) -> Breakdown:
    """The stages of one /classify request for the PNG ``png`` on the store model ``tag`` (lenet5)."""
    from starlette.responses import JSONResponse

    from loadtest.bench.wrk import multipart_body
    from models.kinds.image import class_probabilities
    from models.preprocess import image_to_uint8, preprocess_uint8, preprocess_upload_pixels
    from service import metrics
    from service.images import decode_image
    from service.repository import batching_config
    from service.runtime import load_runtime
    from service.settings import Settings
    from service.uploads import parse_multipart

    settings = Settings.from_env()
    runtime = load_runtime("lenet5", tag, settings=settings)  # the server's session options and threads
    spec = runtime.metadata["preprocessing"]
    body, content_type = multipart_body(png, {"model": "lenet5"})
    data = parse_multipart(body, content_type)["image"].data
    image = decode_image(data)
    pixels = image_to_uint8(image, spec)
    x = preprocess_upload_pixels(pixels, spec)[None]
    feeds = {runtime.roles["image"]: x}
    outputs = runtime.run(feeds)
    scores = outputs[runtime.roles["scores"]][0]
    labels = runtime.metadata["labels"]

    def encode() -> bytes:
        probabilities = class_probabilities(runtime.metadata["scores"], scores)
        best = np.argsort(-probabilities, kind="stable")[:5]
        # Response.body is typed bytes | memoryview for all responses; JSONResponse.render returns bytes.
        return cast(bytes, JSONResponse({"model": runtime.tag, "batch_size": 1, "timings_ms": {"preprocess": 0.1},
                             "predictions": [{"label": labels[i], "probability": float(probabilities[i])}
                                             for i in best]}).body)

    def record() -> None:
        request = metrics.RequestMetrics("classify")
        request.begin(runtime)
        request.observe("preprocess", 1e-4)
        request.observe("batch_wait", 1e-5)
        request.observe("inference", 1e-4)
        request.timings_ms()
        request.finish(200)

    stages = {
        "parse": median_us(lambda: parse_multipart(body, content_type), runs),
        "decode": median_us(lambda: decode_image(data), runs),
        "preprocess": median_us(lambda: preprocess_upload_pixels(image_to_uint8(image, spec), spec), runs),
        "model": median_us(lambda: runtime.run(feeds), runs),
        "encode": median_us(encode, runs),
        "metrics": median_us(record, runs),
    }
    stages["queue hop"] = queue_hop_us(runtime, feeds, batching_config(settings.model("lenet5")), runs)
    reference = median_us(lambda: preprocess_uint8(image_to_uint8(image, spec)[None], spec), runs)
    return Breakdown({s: stages[s] for s in STAGES}, reference)


def queue_hop_us(runtime, feeds: dict, config, runs: int) -> float:
    """``await batcher.infer(feeds)`` minus its model call, one request at a time, on a real DynamicBatcher."""
    from service.batching import DynamicBatcher

    async def main() -> float:
        batcher = DynamicBatcher("lenet5", runtime.run, runtime.batch_axis, config)
        try:
            hops = []
            for i in range(runs + 20):
                start = time.perf_counter()
                _, stats = await batcher.infer(feeds)
                if i >= 20:
                    hops.append(time.perf_counter() - start - stats.inference_s)
            return 1e6 * statistics.median(hops)
        finally:
            batcher.close()

    return asyncio.run(main())
