"""Part 4: streamed ``/generate`` (char_lstm, continuous batching of decode steps), and its ceiling.

- Live: locust's ``GenerateStreamUser`` with 1 stream, then ``streams`` concurrent ones, each asking for
  ``generate_chars`` characters in a closed loop: characters/s over all streams, first-character latency
  (time to the response headers: the service answers once the first character is sampled), full-stream
  latency, and the decode batch sizes from /metrics. Locust, not wrk: a stream's length must be checked and
  its first byte timed.
- Step-loop limit: ``service.generation.measure_step_loop(runtime, batch_size, steps)``, the server's own
  decode step + vectorised sampling loop in one thread, no HTTP: characters/s at batch 1 and at
  ``streams``. The live numbers are reported as a fraction of it: what HTTP, streaming and scheduling cost.
"""

from __future__ import annotations

import time
from pathlib import Path

from loadtest.bench.common import log
from loadtest.bench.promscrape import batch_histogram, scrape
from loadtest.locust_runner import number, run_locust

FIRST_CHAR, COMPLETE = "/generate [stream] first char", "/generate [stream] complete"
GENERATE_MODEL = "char_lstm"


def bench_streams(url: str, streams: list[int], seconds: int, generate_chars: int, workdir: Path) -> list[dict]:
    results = []
    for n in streams:
        log(f"streamed /generate ({generate_chars} chars each), {n} concurrent stream(s), {seconds} s")
        before = scrape(url)
        rows = run_locust(url, ["GenerateStreamUser"], n, seconds, workdir, generate_chars=generate_chars).check().rows
        hist = batch_histogram(before, scrape(url), GENERATE_MODEL, "continuous")
        first, complete = rows.get(FIRST_CHAR), rows.get(COMPLETE)
        result = {"streams": n, "completed": number(complete, "Request Count"),
                  "failures": number(first, "Failure Count") + number(complete, "Failure Count"),
                  "chars_per_s": number(complete, "Requests/s") * generate_chars,
                  "first_p50": number(first, "50%"), "first_p95": number(first, "95%"),
                  "full_p50": number(complete, "50%"), "full_p95": number(complete, "95%"),
                  "mean_batch": hist.mean, "batches": hist.describe()}
        log(f"  {result['chars_per_s']:.0f} chars/s, first char p50 {result['first_p50']:.0f} ms / p95 "
            f"{result['first_p95']:.0f} ms, full p50 {result['full_p50']:.0f} ms, mean decode batch "
            f"{result['mean_batch']:.2f}")
        results.append(result)
    return results


def bench_step_loop(batch_sizes: list[int], steps: int) -> dict[int, float]:
    """chars/s of the bare step loop per batch size (in this process; run it while no server is up).

    Needs ``service.generation.measure_step_loop`` (added on main alongside this bench)."""
    from service.generation import measure_step_loop
    from service.runtime import load_runtime

    runtime = load_runtime(GENERATE_MODEL)
    limits = {}
    for batch in batch_sizes:
        started = time.perf_counter()
        # The best of 3: a limit, and short runs on a shared box vary by 2x (500 steps gave 2,800-5,300/s).
        runs = [measure_step_loop(runtime, batch_size=batch, steps=steps) for _ in range(3)]
        limits[batch] = max(runs)
        log(f"  step loop, batch {batch}: {limits[batch]:,.0f} chars/s (best of 3 x {steps} steps: "
            f"{', '.join(f'{r:,.0f}' for r in runs)}; {time.perf_counter() - started:.1f} s)")
    return limits
