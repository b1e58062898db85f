"""The issue's targets, each checked against this run's measurements: met, MISSED, or not measured."""

from __future__ import annotations

import math
from dataclasses import dataclass
from statistics import median

from loadtest.bench.common import fmt
from loadtest.bench.overload import OverloadResult
from loadtest.bench.recovery import RecoveryResult
from loadtest.bench.stacks import CLASSIFY, FEATURES, NNSERVE, PREVIOUS, V2, V2_BINARY, StackRun
from loadtest.bench.triton import GRPC_GENERATE, REST_GENERATE, ProtocolRow


@dataclass
class Target:
    what: str
    measured: str
    target: str
    met: bool | None  # None: not measured (or not computable from this run)

    @property
    def verdict(self) -> str:
        return "not measured" if self.met is None else ("met" if self.met else "**MISSED**")


@dataclass
class Agg:
    """One server's rows at one endpoint and level over the rounds: medians, spread (min-max), errors."""

    ok_rps: list[float]  # 2xx answers per second, one per round
    p50_ms: list[float]
    p95_ms: list[float]
    errors: int  # non-2xx answers + socket errors, summed over the rounds

    @property
    def rounds(self) -> int:
        return len(self.ok_rps)

    @property
    def rps(self) -> float:
        return float(median(self.ok_rps))

    @property
    def p50(self) -> float:
        return float(median(self.p50_ms))

    @property
    def p95(self) -> float:
        return float(median(self.p95_ms))

    def spread(self, attr: str = "ok_rps", digits: int = 0) -> str:
        values = getattr(self, attr)
        return f"[{min(values):,.{digits}f}-{max(values):,.{digits}f}]" if len(values) > 1 else ""


def find(runs: list[StackRun], server: str, endpoint: str, connections: int) -> Agg | None:
    """``server``'s rows at (endpoint, connections) over every round (the sweep's round 0 left out when
    rounds exist)."""
    rows = [r for r in runs if (r.server, r.endpoint, r.result.connections) == (server, endpoint, connections)]
    if any(r.round_no for r in rows):
        rows = [r for r in rows if r.round_no]
    if not rows:
        return None
    return Agg([r.result.ok_rps for r in rows], [r.result.p50_ms for r in rows], [r.result.p95_ms for r in rows],
               sum(r.result.errors for r in rows))


def ratio_target(what: str, ours: Agg | None, theirs: Agg | None, theirs_name: str, factor: float,
                 latency: bool = False) -> Target:
    """Median throughput (2xx/s) >= factor x theirs, or (latency) median p50 <= factor x theirs. Any error
    in our rows (a non-2xx answer or a socket error; none should happen at these loads) fails the target."""
    goal = f"{'<=' if latency else '>='} {factor:g}x {theirs_name}" + ("" if latency else ", 2xx only")
    if ours is None or theirs is None:
        return Target(what, "not measured" + ("" if theirs else f" ({theirs_name} not run)"), goal, None)
    rounds = f"median of {min(ours.rounds, theirs.rounds)}: " if max(ours.rounds, theirs.rounds) > 1 else ""
    errors = f"; errors {ours.errors} vs {theirs.errors}" if ours.errors or theirs.errors else ""
    if latency:
        r = ours.p50 / theirs.p50
        a, b = " ".join(filter(None, (f"{ours.p50:.2f}", ours.spread("p50_ms", 2)))), \
            " ".join(filter(None, (f"{theirs.p50:.2f}", theirs.spread("p50_ms", 2))))
        return Target(what, f"{rounds}{a} vs {b} ms = {r:.2f}x{errors}", goal,
                      r <= factor and ours.errors == 0)
    if theirs.rps == 0:
        return Target(what, f"{rounds}{ours.rps:,.0f} vs 0 2xx/s{errors}", goal, None)
    r = ours.rps / theirs.rps
    a, b = " ".join(filter(None, (f"{ours.rps:,.0f}", ours.spread()))), \
        " ".join(filter(None, (f"{theirs.rps:,.0f}", theirs.spread())))
    return Target(what, f"{rounds}{a} vs {b} 2xx/s = {r:.2f}x{errors}", goal, r >= factor and ours.errors == 0)


def limit_note(chars_per_s: float, limit: float | None) -> str:
    return f" ({chars_per_s / limit:.0%} of the step-loop limit {limit:,.0f})" if limit else \
        " (step-loop limit not measured)"


def evaluate(runs: list[StackRun], low: int, high: int, generate: list[dict], step_limits: dict[int, float],
             overload: OverloadResult | None, max_queue_delay_ms: float | None, batch_ms: float | None,
             recovery: RecoveryResult | None) -> list[Target]:
    targets = [
        ratio_target(f"/classify {low} client p50", find(runs, NNSERVE, CLASSIFY, low),
                     find(runs, "fastapi", CLASSIFY, low), "FastAPI", 1.25, latency=True),
        ratio_target(f"/classify {high} clients throughput", find(runs, NNSERVE, CLASSIFY, high),
                     find(runs, "fastapi", CLASSIFY, high), "FastAPI", 1.0),
        ratio_target(f"/classify {high} clients throughput", find(runs, NNSERVE, CLASSIFY, high),
                     find(runs, "litserve", CLASSIFY, high), "LitServe", 2.0),
    ]
    ours = find(runs, NNSERVE, CLASSIFY, high)
    targets.append(Target(f"/classify {high} clients p95",
                          " ".join(filter(None, (f"median {ours.p95:.1f}", ours.spread("p95_ms", 1), "ms")))
                          if ours else "not measured",
                          "<= 50 ms", None if ours is None else ours.p95 <= 50 and ours.errors == 0))
    targets.append(ratio_target(f"/features {high} clients throughput", find(runs, NNSERVE, FEATURES, high),
                                find(runs, "fastapi", FEATURES, high), "FastAPI", 3.0))
    targets.append(ratio_target(f"/v2 lenet5 {high} clients throughput", find(runs, NNSERVE, V2, high),
                                find(runs, "mlserver", V2, high), "MLServer", 1.5))
    by_streams = {g["streams"]: g for g in generate}
    one, many = by_streams.get(1), max(by_streams.values(), key=lambda g: g["streams"], default=None)
    if not one:
        targets.append(Target("/generate 1 stream", "not measured", ">= 5,000 chars/s", None))
    else:
        targets.append(Target("/generate 1 stream", f"{one['chars_per_s']:,.0f} chars/s"
                              + limit_note(one["chars_per_s"], step_limits.get(1)),
                              ">= 5,000 chars/s", one["chars_per_s"] >= 5000))
    if not many or many["streams"] == 1:
        targets += [Target("/generate 16 streams", "not measured", ">= 25,000 chars/s", None),
                    Target("/generate first char p95 at 16 streams", "not measured", "<= 20 ms", None)]
    else:
        n = many["streams"]
        targets.append(Target(f"/generate {n} streams", f"{many['chars_per_s']:,.0f} chars/s aggregate"
                              + limit_note(many["chars_per_s"], step_limits.get(n)),
                              ">= 25,000 chars/s", many["chars_per_s"] >= 25000))
        targets.append(Target(f"/generate first char p95 at {n} streams", f"{fmt(many['first_p95'], 0)} ms",
                              "<= 20 ms", many["first_p95"] <= 20))
    if not overload:
        targets += [Target("overload: accepted p99", "not measured", "<= 4 x max_queue_delay + batch time", None),
                    Target("overload: 503s with Retry-After, p99", "not measured", "<= 20 ms", None),
                    Target("overload: any other status or failure", "not measured", "none", None)]
    else:
        bound = None if max_queue_delay_ms is None or batch_ms is None else 4 * max_queue_delay_ms + batch_ms
        goal = (f"<= 4 x max_queue_delay + batch time = {fmt(bound)} ms" if bound is not None
                else "<= 4 x max_queue_delay + batch time (max_queue_delay unknown: pass NNSERVE_MAX_QUEUE_DELAY_MS)")
        # In the server: queue wait + model call, each a histogram bucket's upper bound (so an overestimate).
        waited = overload.server_p99_ms.get("queue wait", float("nan")) + overload.server_p99_ms.get("model call",
                                                                                                   float("nan"))
        targets.append(Target(
            f"overload ({overload.clients} clients): accepted p99 in the server (queue wait + model call)",
            f"<= {fmt(waited)} ms ({overload.accepted} accepted)", goal,
            None if bound is None or not overload.accepted or math.isnan(waited) else waited <= bound))
        targets.append(Target(
            f"overload ({overload.clients} clients): accepted p99 at the client", f"{fmt(overload.p99(200))} ms",
            goal, None if bound is None or not overload.accepted else overload.p99(200) <= bound))
        targets.append(Target(
            "overload: 503s with Retry-After, p99",
            f"{overload.rejected} x 503, {fmt(overload.p99(503))} ms, Retry-After on "
            f"{overload.retry_after[503]}", "<= 20 ms, all with Retry-After",
            None if not overload.rejected else overload.p99(503) <= 20 and overload.all_503_retry_after))
        others = overload.others
        targets.append(Target("overload: any other status or failure",
                              ", ".join(f"{k}: {v}" for k, v in others.items()) or "none", "none", not others))
    targets.append(recovery_target(recovery))
    return targets


def recovery_target(recovery: RecoveryResult | None) -> Target:
    """Judged by the rule fixed before the first run (the last single request over 2x idle); the windowed
    rule added after that rule missed is shown beside it, never judged (loadtest/bench/recovery.py)."""
    goal = "< 1 s (last single request over 2x idle; rule fixed before the first run)"
    if not recovery:
        return Target("large request then small: recovery", "not measured", goal, None)
    ok = recovery.large_status == 200 and recovery.small_errors == 0 and recovery.recovered_single
    slow_end = "" if recovery.recovered_single else ", still slow at the end"
    problems = "" if ok else (f" (large request answered {recovery.large_status}, small errors "
                              f"{recovery.small_errors}{slow_end})")
    return Target(f"large request ({recovery.items:,} items) then small: recovery",
                  f"{recovery.recovery_single_s:.3f} s{problems}; windowed rule (information only): "
                  f"{recovery.recovery_s:.3f} s", goal, recovery.recovery_single_s < 1 and ok)



USER_MODEL_FACTOR = 2.0  # the issue: "batching must pay there (>= 2x plain FastAPI at 32 clients)"


@dataclass
class Medians:
    ok_rps: float  # median over the rounds of answers < 400 per second
    errors: int  # summed over the rounds
    rounds: int


def median_ok_rps(runs: list[StackRun], server: str, endpoint: str, connections: int) -> Medians | None:
    """A server's rows at one level, over every round: the median ``ok_rps`` (one slow or fast round, when
    other work on the machine came or went, does not decide it)."""
    rows = [r.result for r in runs if (r.server, r.endpoint, r.result.connections) == (server, endpoint, connections)]
    if not rows:
        return None
    return Medians(float(median([w.ok_rps for w in rows])), sum(w.errors for w in rows), len(rows))


def user_model_target(runs: list[StackRun], high: int, ours: str = "nnserve", theirs: str = "fastapi") -> Target:
    """The user-model row (loadtest/bench/user_model.py): nnserve's /classify throughput at ``high`` clients
    >= 2x plain FastAPI + ORT's on the same ONNX file, each the median over the interleaved rounds.
    Throughput counts only answers with status < 400 on both sides (``WrkResult.ok_rps``): a 503 or a 422 is
    not work done, and a server that sheds load must not win by answering errors fast."""
    what, goal = f"user model (EfficientNet-B0) /classify {high} clients throughput", \
        f">= {USER_MODEL_FACTOR:g}x FastAPI, errors not counted"
    a, b = median_ok_rps(runs, ours, CLASSIFY, high), median_ok_rps(runs, theirs, CLASSIFY, high)
    if a is None or b is None:
        return Target(what, "not measured", goal, None)
    rounds = f"median of {min(a.rounds, b.rounds)} round(s): " if max(a.rounds, b.rounds) > 1 else ""
    errors = f" (errors: {a.errors} vs {b.errors})" if a.errors or b.errors else ""
    if b.ok_rps == 0:  # FastAPI answered nothing right: no ratio to judge
        return Target(what, f"{rounds}{a.ok_rps:,.1f} vs 0 req/s answered < 400{errors}", goal, None)
    r = a.ok_rps / b.ok_rps
    return Target(what, f"{rounds}{a.ok_rps:,.1f} vs {b.ok_rps:,.1f} req/s = {r:.2f}x{errors}", goal,
                  r >= USER_MODEL_FACTOR)


# Issue 19, fixed before the first run: gRPC streamed generation "within 10% of REST" in the same run.
GRPC_THROUGHPUT_FACTOR, GRPC_FIRST_P95_FACTOR = 0.9, 1.1


def median_row(rows: list[ProtocolRow], what: str, clients: int, attr: str) -> tuple[float, int, int] | None:
    """(median of ``attr`` over the rounds, errors summed, rounds) of part 9's rows ``what`` at ``clients``."""
    found = [r for r in rows if (r.what, r.clients) == (what, clients)]
    if not found:
        return None
    return float(median([getattr(r, attr) for r in found])), sum(r.errors for r in found), len(found)


def triton_targets(rows: list[ProtocolRow], streams: list[int], rest: str = REST_GENERATE,
                   grpc: str = GRPC_GENERATE) -> list[Target]:
    """Part 9 (loadtest/bench/triton.py), per stream level: gRPC ModelStreamInfer chars/s >= 0.9x REST
    /generate's, and gRPC first-chunk p95 <= 1.1x REST's, each the median over the interleaved rounds.
    chars/s counts only complete, error-free streams on both sides (``summarize``): a failed stream is not
    work done, so errors count against a protocol's throughput; errors are also shown beside the ratio."""
    targets = []
    for n in streams:
        label = f"{n} stream{'s' if n != 1 else ''}"
        what = f"gRPC streamed generation chars/s at {label}"
        goal = f">= {GRPC_THROUGHPUT_FACTOR:g}x REST /generate, same run, errors not counted"
        a, b = median_row(rows, grpc, n, "ok_per_s"), median_row(rows, rest, n, "ok_per_s")
        if a is None or b is None or b[0] == 0:
            targets.append(Target(what, "not measured" if a is None or b is None else "REST completed no stream",
                                  goal, None))
        else:
            errors = f" (errors: {a[1]} vs {b[1]})" if a[1] or b[1] else ""
            r = a[0] / b[0]
            targets.append(Target(what, f"median of {min(a[2], b[2])}: {a[0]:,.0f} vs {b[0]:,.0f} chars/s = "
                                        f"{r:.2f}x{errors}", goal, r >= GRPC_THROUGHPUT_FACTOR))
        what = f"gRPC streamed generation first-chunk p95 at {label}"
        goal = f"<= {GRPC_FIRST_P95_FACTOR:g}x REST /generate's"
        a, b = median_row(rows, grpc, n, "first_p95_ms"), median_row(rows, rest, n, "first_p95_ms")
        if a is None or b is None or math.isnan(a[0]) or math.isnan(b[0]) or b[0] == 0:
            targets.append(Target(what, "not measured", goal, None))
        else:
            r = a[0] / b[0]
            targets.append(Target(what, f"median of {min(a[2], b[2])}: {a[0]:.1f} vs {b[0]:.1f} ms = {r:.2f}x", goal,
                                  r <= GRPC_FIRST_P95_FACTOR))
    return targets


def ratio_note(rows: list[ProtocolRow], ours: str, theirs: str, clients: int) -> str:
    """No target in the issue for classification by image bytes: the median ratio only, in words."""
    a, b = median_row(rows, ours, clients, "ok_per_s"), median_row(rows, theirs, clients, "ok_per_s")
    if a is None or b is None:
        return f"{ours} vs {theirs} at {clients} clients: not measured"
    ratio = f" = {a[0] / b[0]:.2f}x" if b[0] else ""
    return f"{ours} vs {theirs} at {clients} clients: {a[0]:,.0f} vs {b[0]:,.0f} answers/s{ratio} (median)"


def previous_targets(runs: list[StackRun], high: int, ref: str) -> list[Target]:
    """Against the previous release in the same run (--previous REF), at ``high`` clients on /classify and /v2
    binary infer: CPU per request (the server's processes, medians over the rounds) at most 0.6x, goodput at
    least 1.4x. The share of the bare stack's throughput is in the report's tables beside them."""
    targets = []
    for endpoint in (CLASSIFY, V2_BINARY):
        ours = [r for r in runs if (r.server, r.endpoint, r.result.connections) == (NNSERVE, endpoint, high)]
        before = [r for r in runs if (r.server, r.endpoint, r.result.connections) == (PREVIOUS, endpoint, high)]
        if not ours or not before:
            targets += [Target(f"{endpoint} {high} clients CPU/request vs {ref}", "not measured", "<= 0.6x", None),
                        Target(f"{endpoint} {high} clients goodput vs {ref}", "not measured", ">= 1.4x", None)]
            continue
        cpu = median(r.cpu_ms_per_request for r in ours) / median(r.cpu_ms_per_request for r in before)
        goodput = median(r.result.ok_rps for r in ours) / median(r.result.ok_rps for r in before)
        targets += [Target(f"{endpoint} {high} clients CPU/request vs {ref}",
                           f"{cpu:.2f}x ({median(r.cpu_ms_per_request for r in ours):.3f} vs "
                           f"{median(r.cpu_ms_per_request for r in before):.3f} ms)", "<= 0.6x", cpu <= 0.6),
                    Target(f"{endpoint} {high} clients goodput vs {ref}", f"{goodput:.2f}x", ">= 1.4x", goodput >= 1.4)]
    return targets
