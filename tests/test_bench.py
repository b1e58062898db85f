"""The bench's verdict logic on made-up measurements (no server, no timing): a target is met, MISSED or
not measured exactly as its rule says."""

from __future__ import annotations

from collections import Counter

from loadtest.bench.overload import OverloadResult
from loadtest.bench.recovery import recovery_time
from loadtest.bench.stacks import CLASSIFY, FEATURES, NNSERVE, V2, StackRun
from loadtest.bench.targets import evaluate
from loadtest.bench.wrk import WrkResult


def run(server: str, endpoint: str, connections: int, rps: float, p50: float, p95: float) -> StackRun:
    return StackRun(server, endpoint, WrkResult(connections, int(rps * 10), 10.0, rps, p50, p95, p95, p95, 0, 0))


def verdicts(**kwargs) -> dict[str, str]:
    args = {"runs": [], "low": 1, "high": 32, "generate": [], "step_limits": {}, "overload": None,
            "max_queue_delay_ms": None, "batch_ms": None, "recovery": None, **kwargs}
    return {f"{t.what} {t.target}": t.verdict for t in evaluate(**args)}


def test_ratios_against_the_baselines():
    runs = [run(NNSERVE, CLASSIFY, 1, 200, 5.0, 6.0), run("fastapi", CLASSIFY, 1, 250, 4.5, 5.0),
            run(NNSERVE, CLASSIFY, 32, 900, 30.0, 60.0), run("fastapi", CLASSIFY, 32, 600, 50.0, 70.0),
            run("litserve", CLASSIFY, 32, 500, 60.0, 80.0),
            run(NNSERVE, FEATURES, 32, 100, 300.0, 400.0), run("fastapi", FEATURES, 32, 40, 800.0, 900.0)]
    v = verdicts(runs=runs)
    assert v["/classify 1 client p50 <= 1.25x FastAPI"] == "met"  # 5.0 / 4.5 = 1.11
    assert v["/classify 32 clients throughput >= 1x FastAPI"] == "met"
    assert v["/classify 32 clients throughput >= 2x LitServe"] == "**MISSED**"  # 1.8x
    assert v["/classify 32 clients p95 <= 50 ms"] == "**MISSED**"
    assert v["/features 32 clients throughput >= 3x FastAPI"] == "**MISSED**"  # 2.5x
    assert v["/v2 lenet5 32 clients throughput >= 1.5x MLServer"] == "not measured"
    v2 = [run(NNSERVE, V2, 32, 1200, 25.0, 50.0), run("mlserver", V2, 32, 850, 37.0, 60.0)]
    assert verdicts(runs=v2)["/v2 lenet5 32 clients throughput >= 1.5x MLServer"] == "**MISSED**"  # 1.41x
    v2[1] = run("mlserver", V2, 32, 800, 37.0, 60.0)
    assert verdicts(runs=v2)["/v2 lenet5 32 clients throughput >= 1.5x MLServer"] == "met"


def test_overload_rules():
    o = OverloadResult(300, 5.0, latencies_ms={200: [10.0] * 90 + [30.0] * 10, 503: [2.0] * 50},
                       retry_after=Counter({503: 50}), server_p99_ms={"queue wait": 10.0, "model call": 5.0})
    v = verdicts(overload=o, max_queue_delay_ms=5.0, batch_ms=2.0)
    bound = "<= 4 x max_queue_delay + batch time = 22.0 ms"
    assert v[f"overload (300 clients): accepted p99 in the server (queue wait + model call) {bound}"] == "met"
    assert v[f"overload (300 clients): accepted p99 at the client {bound}"] == "**MISSED**"  # 30 ms
    assert v["overload: 503s with Retry-After, p99 <= 20 ms, all with Retry-After"] == "met"
    assert v["overload: any other status or failure none"] == "met"

    o.server_p99_ms["queue wait"] = 25.0
    o.retry_after[503] = 49  # one 503 without Retry-After
    o.latencies_ms[500] = [1.0]
    o.failures["ServerDisconnectedError"] = 2
    v = verdicts(overload=o, max_queue_delay_ms=5.0, batch_ms=2.0)
    assert v["overload: 503s with Retry-After, p99 <= 20 ms, all with Retry-After"] == "**MISSED**"
    assert v["overload: any other status or failure none"] == "**MISSED**"
    assert v[f"overload (300 clients): accepted p99 in the server (queue wait + model call) {bound}"] == "**MISSED**"
    assert o.others == {"500": 1, "no answer (ServerDisconnectedError)": 2}


def test_generation_against_the_step_loop_limit():
    generate = [{"streams": 1, "chars_per_s": 6000.0, "first_p95": 5.0},
                {"streams": 16, "chars_per_s": 20000.0, "first_p95": 25.0}]
    targets = {t.what: t for t in evaluate([], 1, 32, generate, {1: 12000.0, 16: 40000.0}, None, None, None, None)}
    assert targets["/generate 1 stream"].verdict == "met"
    assert "50% of the step-loop limit" in targets["/generate 1 stream"].measured
    assert targets["/generate 16 streams"].verdict == "**MISSED**"
    assert targets["/generate first char p95 at 16 streams"].verdict == "**MISSED**"


def test_histogram_quantile_bound_is_the_upper_bound_of_its_bucket():
    from loadtest.bench.promscrape import Histogram

    h = Histogram({0.001: 90.0, 0.005: 99.0, 0.01: 100.0, float("inf"): 100.0}, total=0.2, count=100.0)
    assert h.quantile_bound(0.5) == 0.001 and h.quantile_bound(0.99) == 0.005 and h.quantile_bound(1.0) == 0.01


def test_recovery_is_where_the_median_of_a_run_of_requests_is_back_under_the_threshold():
    fast = [(0.01 * i, 1.0) for i in range(40)]
    assert recovery_time(fast, 2.0) == (0.0, True)
    lone = [(s, 9.0 if i == 20 else ms) for i, (s, ms) in enumerate(fast)]  # one outlier: not a slow period
    assert recovery_time(lone, 2.0) == (0.0, True)
    slow_start = [(s, 5.0 if i < 12 else ms) for i, (s, ms) in enumerate(fast)]  # the first 12 slow
    seconds, recovered = recovery_time(slow_start, 2.0)
    assert recovered and 0.11 < seconds < 0.2
    slow_end = [(s, 5.0 if i >= 30 else ms) for i, (s, ms) in enumerate(fast)]
    assert recovery_time(slow_end, 2.0)[1] is False
