"""Closed-loop Python clients of part 9 (``loadtest.bench.triton``), run in worker processes.

One function per kind of request; each is one client (its own connection or gRPC channel) sending its next
request when the previous answer is complete, until a deadline. ``run_clients`` runs ``threads`` of them in
one process and returns every call plus the process's CPU time, so the report can say when the client, not
the server, was the limit. REST and gRPC rows use this same harness, so a gap between them is the server's
protocol path, not a C client against a Python one.
"""

from __future__ import annotations

import math
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Any

GENERATE_MODEL, CLASSIFY_MODEL = "char_lstm", "lenet5"
TEMPERATURE = 0.8  # as locust's GenerateStreamUser
TOP_K = 5  # /classify's default top_k, and the class_count asked over gRPC
STREAM_TIMEOUT_S = 30.0  # a stream silent this long is counted as an error and reopened


@dataclass
class Call:
    """One request as its client saw it; times are ``time.time()`` so processes' calls can be merged."""

    ok: bool  # a full answer: 200 / no stream error, and every character asked for (or all K classes)
    units: int  # characters received (generation) or 1 answer (classification)
    started: float
    first: float  # when the first text arrived (generation), else when the answer arrived; nan if never
    ended: float
    error: str = ""


@dataclass
class Options:
    url: str  # http://host:port for REST kinds, host:port for gRPC kinds
    prompts: list[str] = field(default_factory=list)
    chars: int = 200
    png: bytes = b""
    scores_output: str = "logits"


def request_plan(thread: int, i: int, prompts: list[str]) -> tuple[str, int]:
    """The prompt and seed of a client's i-th request: the same sequence for REST and gRPC, so both protocols
    sample the same texts (same seed, same text) and do the same work."""
    n = thread * 1009 + i
    return prompts[n % len(prompts)], n


def rest_generate(options: Options, thread: int, deadline: float) -> list[Call]:
    import requests

    calls, session = [], requests.Session()
    i = 0
    while time.time() < deadline:
        prompt, seed = request_plan(thread, i, options.prompts)
        i += 1
        body: dict[str, Any] = {"prompt": prompt, "max_new_chars": options.chars, "model": GENERATE_MODEL,
                "temperature": TEMPERATURE, "seed": seed, "stream": True}
        started, first, raw, error = time.time(), math.nan, b"", ""
        try:
            with session.post(options.url + "/generate", json=body, stream=True, timeout=STREAM_TIMEOUT_S) as r:
                if r.status_code != 200:
                    error = f"HTTP {r.status_code}: {r.text[:200]}"
                else:
                    # chunk_size=None: each chunk as it arrives, so the first one is timed when it lands.
                    for chunk in r.iter_content(chunk_size=None):
                        if chunk and math.isnan(first):
                            first = time.time()
                        raw += chunk
        except Exception as e:  # connection dropped mid-stream, timeout
            error = f"{type(e).__name__}: {e}"
        chars = len(raw.decode("utf-8", errors="replace"))
        if not error and chars != options.chars:
            error = f"stream ended after {chars} characters, asked for {options.chars}"
        calls.append(Call(not error, chars, started, first, time.time(), error))
    return calls


def openai_generate(options: Options, thread: int, deadline: float) -> list[Call]:
    """Streamed ``/v1/completions`` (docs/openai.md), the same prompts, seeds and characters as rest_generate, read
    with the same HTTP client (not the ``openai`` package: the rows compare the server's paths, not clients):
    each ``data:`` event's JSON parsed, its text counted, ``[DONE]`` required."""
    import json

    import requests

    calls, session = [], requests.Session()
    i = 0
    while time.time() < deadline:
        prompt, seed = request_plan(thread, i, options.prompts)
        i += 1
        body: dict[str, Any] = {"prompt": prompt, "max_tokens": options.chars, "model": GENERATE_MODEL,
                                "temperature": TEMPERATURE, "seed": seed, "stream": True}
        started, first, chars, done, error = time.time(), math.nan, 0, False, ""
        try:
            with session.post(options.url + "/v1/completions", json=body, stream=True, timeout=STREAM_TIMEOUT_S) as r:
                if r.status_code != 200:
                    error = f"HTTP {r.status_code}: {r.text[:200]}"
                else:
                    # None: each event as it arrives (iter_lines hands it to iter_content; typeshed says int only)
                    for line in r.iter_lines(chunk_size=None):  # type: ignore[call-overload]
                        if not line.startswith(b"data: "):
                            continue
                        if line == b"data: [DONE]":
                            done = True
                            break
                        event = json.loads(line[6:])
                        if "error" in event:
                            error = str(event["error"])[:200]
                            break
                        text = "".join(choice["text"] for choice in event["choices"])
                        if text and math.isnan(first):
                            first = time.time()
                        chars += len(text)
        except Exception as e:  # connection dropped mid-stream, timeout
            error = f"{type(e).__name__}: {e}"
        if not error and (chars != options.chars or not done):
            ended = "" if done else " without [DONE]"
            error = f"stream ended after {chars} characters{ended}, asked for {options.chars}"
        calls.append(Call(not error, chars, started, first, time.time(), error))
    return calls


def grpc_generate(options: Options, thread: int, deadline: float) -> list[Call]:
    import numpy as np
    import tritonclient.grpc as grpcclient

    client = grpcclient.InferenceServerClient(options.url)
    answers: queue.Queue = queue.Queue()

    def on_response(result, error) -> None:  # in tritonclient's stream thread: stamp arrival there
        answers.put((result, error, time.time()))

    client.start_stream(callback=on_response)
    calls, i = [], 0
    try:
        while time.time() < deadline:
            prompt, seed = request_plan(thread, i, options.prompts)
            i += 1
            text_input = grpcclient.InferInput("text_input", [1], "BYTES")
            text_input.set_data_from_numpy(np.array([prompt.encode()], dtype=object))
            started, first, chars, error = time.time(), math.nan, 0, ""
            client.async_stream_infer(f"{GENERATE_MODEL}.text", [text_input], request_id=str(i), parameters={
                "max_tokens": options.chars, "temperature": TEMPERATURE, "seed": seed})
            while True:
                try:
                    result, failure, at = answers.get(timeout=STREAM_TIMEOUT_S)
                except queue.Empty:
                    error = f"no response for {STREAM_TIMEOUT_S:g} s"
                    client.stop_stream()  # the stream is stuck or gone: a fresh one for the next request
                    client.start_stream(callback=on_response)
                    break
                if failure is not None:
                    error = str(failure)[:200]
                    break
                response = result.get_response()
                if response.outputs:
                    chars += len(result.as_numpy("text_output")[0].decode())
                    if math.isnan(first):
                        first = at
                if response.parameters["triton_final_response"].bool_param:
                    break
            if not error and chars != options.chars:
                error = f"stream ended after {chars} characters, asked for {options.chars}"
            calls.append(Call(not error, chars, started, first, time.time(), error))
    finally:
        client.stop_stream()
        client.close()
    return calls


def grpc_classify(options: Options, thread: int, deadline: float) -> list[Call]:
    import numpy as np
    import tritonclient.grpc as grpcclient

    client = grpcclient.InferenceServerClient(options.url)
    image = grpcclient.InferInput("image", [1], "BYTES")
    image.set_data_from_numpy(np.array([options.png], dtype=object))
    wanted = [grpcclient.InferRequestedOutput(options.scores_output, class_count=TOP_K)]
    calls = []
    while time.time() < deadline:
        started, error = time.time(), ""
        try:
            classes = client.infer(f"{CLASSIFY_MODEL}.image", [image], outputs=wanted).as_numpy(
                options.scores_output)
            if classes is None or classes.shape[-1] != TOP_K:
                error = f"asked for {TOP_K} classes, got {None if classes is None else classes.shape}"
        except Exception as e:  # InferenceServerException: the server's status and message
            error = f"{type(e).__name__}: {str(e)[:200]}"
        ended = time.time()
        calls.append(Call(not error, 1, started, ended, ended, error))
    client.close()
    return calls


def rest_classify(options: Options, thread: int, deadline: float) -> list[Call]:
    import requests

    calls, session = [], requests.Session()
    while time.time() < deadline:
        started, error = time.time(), ""
        try:
            r = session.post(options.url + "/classify", files={"image": ("digit.png", options.png, "image/png")},
                             timeout=STREAM_TIMEOUT_S)
            if r.status_code != 200:
                error = f"HTTP {r.status_code}: {r.text[:200]}"
        except Exception as e:
            error = f"{type(e).__name__}: {e}"
        ended = time.time()
        calls.append(Call(not error, 1, started, ended, ended, error))
    return calls


CLIENTS = {"rest-generate": rest_generate, "grpc-generate": grpc_generate, "grpc-classify": grpc_classify,
           "rest-classify": rest_classify, "openai-generate": openai_generate}


def warm_up(kind: str) -> None:
    """Import the client's libraries in a fresh worker process, so the first timed row does not pay for it."""
    import requests  # noqa: F401
    import tritonclient.grpc  # noqa: F401


def run_clients(kind: str, options: Options, first: int, threads: int, start_at: float,
                seconds: float) -> tuple[list[Call], float]:
    """Clients ``first`` .. ``first + threads - 1`` of ``kind`` from ``start_at`` (time.time()) for ``seconds``:
    (every call, CPU seconds this process used meanwhile, all its threads, gRPC's own included)."""
    client = CLIENTS[kind]
    results: list[list[Call]] = [[] for _ in range(threads)]

    def one(t: int) -> None:
        results[t] = client(options, first + t, start_at + seconds)

    time.sleep(max(0.0, start_at - time.time()))
    cpu = time.process_time()
    workers = [threading.Thread(target=one, args=(t,)) for t in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    return [c for r in results for c in r], time.process_time() - cpu
