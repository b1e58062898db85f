"""Part 9: Triton's protocols and OpenAI's API beside REST on the same nnserve server (issues 19 and 27, "Measured").

- Streamed generation: gRPC ``ModelStreamInfer`` (tritonclient.grpc ``start_stream`` + ``async_stream_infer``,
  ``text_input`` + ``max_tokens``/``temperature``/``seed`` to ``char_lstm.text``) against streamed REST
  ``/generate``, at each ``--streams`` level, same prompts, seeds and characters per request, in
  ``--triton-rounds`` rounds whose order alternates (REST first, then gRPC first): characters/s over all
  streams (only complete, error-free streams count) and first-chunk p50/p95 (request sent -> first text at
  the client). Streamed OpenAI ``/v1/completions`` (issue 27) is a third row at each level, read by the same
  HTTP client as ``/generate``.
- Classification of image bytes: gRPC ``ModelInfer`` on ``lenet5.image`` with an ``image`` BYTES [1] PNG of a
  held-out digit and the scores output asked with ``class_count=5``, against ``/classify`` (the same PNG, top
  5) at ``--triton-classify-clients``: the same Python harness on both, plus wrk on ``/classify`` (a C
  client: what the server does when the client costs little).

Every Python row runs in worker processes (``protocol_clients.run_clients``, one client per thread, clients
spread over ``--triton-client-processes`` processes, spawned once and warmed up), and reports the CPU those
processes used: on a small machine the client shares the cores with the server.
"""

from __future__ import annotations

import math
import multiprocessing
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from loadtest.bench.common import log, percentile
from loadtest.bench.protocol_clients import Call, Options, run_clients, warm_up

REST_GENERATE, GRPC_GENERATE = "REST /generate (stream)", "gRPC ModelStreamInfer"
OPENAI_GENERATE = "OpenAI /v1/completions (stream)"
REST_CLASSIFY, GRPC_CLASSIFY, WRK_CLASSIFY = "REST /classify (Python)", "gRPC image bytes", "REST /classify (wrk)"
KINDS = {REST_GENERATE: "rest-generate", GRPC_GENERATE: "grpc-generate", REST_CLASSIFY: "rest-classify",
         GRPC_CLASSIFY: "grpc-classify", OPENAI_GENERATE: "openai-generate"}
GENERATION = (REST_GENERATE, GRPC_GENERATE, OPENAI_GENERATE)


@dataclass
class ProtocolRow:
    what: str  # one of the row names above
    clients: int
    round_no: int
    seconds: float  # from the start to the last answer (closed loop: the last requests end after the deadline)
    ok: int  # complete, error-free answers
    errors: int
    ok_per_s: float  # characters/s of complete streams (generation), answers/s (classification)
    first_p50_ms: float  # generation: first text; classification: the answer
    first_p95_ms: float
    full_p50_ms: float
    full_p95_ms: float
    client_cpu: float | None  # cores the client processes used (CPU s / wall s); None for wrk
    error_sample: str = ""


def summarize(what: str, clients: int, round_no: int, calls: list[Call], start_at: float,
              cpu_s: float | None) -> ProtocolRow:
    """One row from its calls. Only ``ok`` calls are work done: a failed or short stream adds nothing to the
    throughput (its characters are not counted) and no latency sample, and counts as an error."""
    ok = [c for c in calls if c.ok]
    end = max((c.ended for c in calls), default=start_at)
    seconds = max(end - start_at, 1e-9)
    firsts = [1e3 * (c.first - c.started) for c in ok if not math.isnan(c.first)]
    fulls = [1e3 * (c.ended - c.started) for c in ok]
    failed = [c for c in calls if not c.ok]
    return ProtocolRow(what, clients, round_no, seconds, len(ok), len(failed), sum(c.units for c in ok) / seconds,
                       percentile(firsts, 50), percentile(firsts, 95), percentile(fulls, 50), percentile(fulls, 95),
                       None if cpu_s is None else cpu_s / seconds, failed[0].error if failed else "")


def split(clients: int, processes: int) -> list[int]:
    """Clients per worker process: as even as possible, no empty process (16 over 4 -> [4, 4, 4, 4])."""
    n = max(1, min(clients, processes))
    return [clients // n + (1 if i < clients % n else 0) for i in range(n)]


def round_order(i: int) -> tuple[str, ...]:
    """The generation rows rotated by round (REST, gRPC, OpenAI first in turn): none always runs on the warmer
    machine."""
    k = i % len(GENERATION)
    return GENERATION[k:] + GENERATION[:k]


def row_from_wrk(result, round_no: int) -> ProtocolRow:
    nan = float("nan")
    return ProtocolRow(WRK_CLASSIFY, result.connections, round_no, result.seconds,
                       max(0, result.requests - result.status_errors), result.errors, result.ok_rps, nan, nan,
                       result.p50_ms, result.p95_ms, None)


class Clients:
    """The worker processes, spawned (not forked: gRPC's threads do not survive a fork) and warmed up once."""

    def __init__(self, processes: int) -> None:
        self.processes = processes
        self.pool = ProcessPoolExecutor(processes, mp_context=multiprocessing.get_context("spawn"))
        list(self.pool.map(warm_up, ["all"] * processes))

    def run(self, what: str, options: Options, clients: int, seconds: float, round_no: int) -> ProtocolRow:
        start_at = time.time() + 0.5  # every process waits for it: the clients start together
        sizes = split(clients, self.processes)
        futures = [self.pool.submit(run_clients, KINDS[what], options, sum(sizes[:i]), n, start_at, seconds)
                   for i, n in enumerate(sizes)]
        parts = [f.result(timeout=seconds + 120) for f in futures]
        row = summarize(what, clients, round_no, [c for calls, _ in parts for c in calls], start_at,
                        sum(cpu for _, cpu in parts))
        log(f"  round {round_no} {what}, {clients} client(s): {row.ok_per_s:,.0f}/s ok, first p50/p95 "
            f"{row.first_p50_ms:.1f}/{row.first_p95_ms:.1f} ms, {row.errors} errors, client CPU "
            f"{row.client_cpu:.2f} cores")
        return row

    def close(self) -> None:
        self.pool.shutdown()


def scores_output(url: str) -> str:
    """lenet5's scores: the first FP32 output in its /v2 metadata (the name the classification extension takes)."""
    from loadtest.bench.server_info import get_json

    meta = get_json(f"{url}/v2/models/lenet5")
    return next(o["name"] for o in meta["outputs"] if o["datatype"] == "FP32")


def bench_triton(url: str, grpc_url: str, png: Path, wrk_args: list[str], streams: list[int], seconds: float,
                 chars: int, rounds: int, classify_clients: int, processes: int) -> list[ProtocolRow]:
    from harness.data import prompts, served_vocab
    from loadtest.bench.protocol_clients import GENERATE_MODEL
    from loadtest.bench.wrk import run_wrk

    rest = Options(url, prompts(vocab=served_vocab(url, GENERATE_MODEL)), chars, png.read_bytes(), scores_output(url))
    grpc = Options(grpc_url, rest.prompts, chars, rest.png, rest.scores_output)
    by_protocol = {REST_GENERATE: rest, GRPC_GENERATE: grpc, REST_CLASSIFY: rest, GRPC_CLASSIFY: grpc,
                   OPENAI_GENERATE: rest}
    rows: list[ProtocolRow] = []
    log(f"Triton protocols: {processes} client process(es), {rounds} round(s) of {seconds:g} s rows")
    clients = Clients(processes)
    try:
        for i in range(rounds):
            for n in streams:
                for what in round_order(i):
                    rows.append(clients.run(what, by_protocol[what], n, seconds, i + 1))
            for what in (REST_CLASSIFY, GRPC_CLASSIFY) if i % 2 == 0 else (GRPC_CLASSIFY, REST_CLASSIFY):
                rows.append(clients.run(what, by_protocol[what], classify_clients, seconds, i + 1))
            rows.append(row_from_wrk(run_wrk(url + "/classify", wrk_args, classify_clients, seconds), i + 1))
            log(f"  round {i + 1} {WRK_CLASSIFY}, {classify_clients} connections: {rows[-1].ok_per_s:,.0f}/s ok")
    finally:
        clients.close()
    return rows
