"""Part 5: overload. Far more concurrent clients than the server can serve within its queue bounds (300
on ``/classify`` by default), for a short run: the server must answer what it accepts quickly and reject the
rest at once with 503 + ``Retry-After``, never time out or fail otherwise.

wrk cannot split latency by status, so this part uses a small asyncio client (aiohttp, already a BentoML
dependency): ``clients`` coroutines in a closed loop, each timing its own requests. It costs more CPU per
request than wrk (measured by the run itself: ``client_cpu_s`` is this process's CPU time during the run),
and that CPU is taken from the server on a small machine; the report prints it.
"""

from __future__ import annotations

import asyncio
import resource
import time
from collections import Counter
from dataclasses import dataclass, field

from loadtest.bench.common import log, percentile
from loadtest.bench.promscrape import histogram, scrape


@dataclass
class OverloadResult:
    clients: int
    seconds: float
    latencies_ms: dict[int, list[float]] = field(default_factory=dict)  # status -> latencies
    retry_after: Counter = field(default_factory=Counter)  # status -> answers carrying Retry-After
    failures: Counter = field(default_factory=Counter)  # exception type -> count (no HTTP answer)
    client_cpu_s: float = 0.0
    # Measured by the server (its /metrics histograms over the run, bucket upper bounds, ms): requests it
    # accepted, from handler start to response, and their wait in the dynamic batcher's queue.
    server_p99_ms: dict[str, float] = field(default_factory=dict)

    def count(self, status: int) -> int:
        return len(self.latencies_ms.get(status, []))

    def p99(self, status: int) -> float:
        return percentile(self.latencies_ms.get(status, []), 99)

    @property
    def accepted(self) -> int:
        return self.count(200)

    @property
    def rejected(self) -> int:
        return self.count(503)

    @property
    def others(self) -> dict[str, int]:
        """Everything that is neither a 200 nor a 503: other statuses and transport failures."""
        found = {str(s): len(v) for s, v in self.latencies_ms.items() if s not in (200, 503)}
        return {**found, **{f"no answer ({k})": v for k, v in self.failures.items()}}

    @property
    def all_503_retry_after(self) -> bool:
        return self.retry_after[503] == self.rejected


async def _client(session, url: str, body: bytes, headers: dict, deadline: float, result: OverloadResult) -> None:
    import aiohttp

    while time.perf_counter() < deadline:
        start = time.perf_counter()
        try:
            async with session.post(url, data=body, headers=headers) as response:
                await response.read()
                status, has_retry = response.status, "Retry-After" in response.headers
        except (TimeoutError, aiohttp.ClientError) as e:
            result.failures[type(e).__name__] += 1
            continue
        result.latencies_ms.setdefault(status, []).append(1000 * (time.perf_counter() - start))
        result.retry_after[status] += has_retry


async def _overload(url: str, body: bytes, content_type: str, clients: int, seconds: float) -> OverloadResult:
    import aiohttp

    result = OverloadResult(clients, seconds)
    connector = aiohttp.TCPConnector(limit=0)  # one connection per client, like wrk -c
    timeout = aiohttp.ClientTimeout(total=60)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        deadline = time.perf_counter() + seconds
        await asyncio.gather(*(_client(session, url, body, {"Content-Type": content_type}, deadline, result)
                               for _ in range(clients)))
    return result


def run_overload(base_url: str, path: str, body: bytes, content_type: str, clients: int, seconds: float,
                 model: str = "lenet5") -> OverloadResult:
    before = scrape(base_url)
    cpu = resource.getrusage(resource.RUSAGE_SELF)
    result = asyncio.run(_overload(base_url + path, body, content_type, clients, seconds))
    after = resource.getrusage(resource.RUSAGE_SELF)
    result.client_cpu_s = (after.ru_utime - cpu.ru_utime) + (after.ru_stime - cpu.ru_stime)
    scraped = scrape(base_url)
    for name, key in (("handler", ("nnserve_request_duration_seconds", model, path.strip("/"))),
                      ("queue wait", ("nnserve_batch_wait_duration_seconds", model, None)),
                      ("model call", ("nnserve_inference_duration_seconds", model, "dynamic"))):
        result.server_p99_ms[name] = 1000 * histogram(before, scraped, key).quantile_bound(0.99)
    log(f"  overload {clients} clients: {result.accepted} accepted (p99 {result.p99(200):.1f} ms), "
        f"{result.rejected} x 503 (p99 {result.p99(503):.1f} ms, Retry-After on {result.retry_after[503]}), "
        f"other: {result.others or 'none'}; client CPU {result.client_cpu_s:.1f} s; in the server, p99 <= "
        + ", ".join(f"{k} {v:g} ms" for k, v in result.server_p99_ms.items()))
    return result
