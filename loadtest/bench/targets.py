"""The issue's targets, each checked against this run's measurements: met, MISSED, or not measured."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from statistics import median

from loadtest.bench.common import fmt
from loadtest.bench.overload import OverloadResult
from loadtest.bench.recovery import RecoveryResult
from loadtest.bench.stacks import CLASSIFY, FEATURES, NNSERVE, PREVIOUS, V2, V2_BINARY, StackRun, v2_binary
from loadtest.bench.triton import GRPC_GENERATE, OPENAI_GENERATE, REST_GENERATE, ProtocolRow


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
    round_nos: list[int] = field(default_factory=list)  # the round of each value above (0: the sweep)

    def by_round(self, attr: str) -> dict[int, float]:
        return dict(zip(self.round_nos, getattr(self, attr), strict=True))

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
               sum(r.result.errors for r in rows), round_keys([r.round_no for r in rows]))


def round_keys(round_nos: list[int]) -> list[int]:
    """The rounds of a side's rows; rows that carry no round (0: a part run without rounds) are paired with
    the other side's by their order: 1, 2, 3, ..."""
    return round_nos if any(round_nos) else list(range(1, len(round_nos) + 1))


def by_round(rows: list, value) -> dict[int, float]:
    """round -> ``value(row)`` (round_keys numbering)."""
    return dict(zip(round_keys([r.round_no for r in rows]), map(value, rows), strict=True))


@dataclass
class Ratios:
    """Ours / theirs, one value per round both servers ran in (issue 26: a ratio target is judged on the
    median of these, not on the ratio of two medians, whose rounds need not be the same)."""

    values: list[float]

    @property
    def median(self) -> float:
        return float(median(self.values)) if self.values else float("nan")

    def describe(self) -> str:
        """``1.23x [1.01-1.40] over 5 rounds``: the median and the min-max of the per-round ratios."""
        if not self.values:
            return "no round with both"
        if len(self.values) == 1:
            return f"{self.values[0]:.2f}x (1 round)"
        return f"{self.median:.2f}x [{min(self.values):.2f}-{max(self.values):.2f}] over {len(self.values)} rounds"


def round_ratios(ours: dict[int, float], theirs: dict[int, float]) -> Ratios:
    """Per-round ``ours[r] / theirs[r]`` over the rounds both have; a round where theirs is 0 or not a number
    (nothing answered) or ours is not a number has no ratio."""
    return Ratios([ours[r] / theirs[r] for r in sorted(ours.keys() & theirs.keys())
                   if theirs[r] and not math.isnan(theirs[r]) and not math.isnan(ours[r])])


def paired(ours: Agg, theirs: Agg, attr: str) -> Ratios:
    """``attr`` (ok_rps, p50_ms, p95_ms) of ours over theirs, round by round."""
    return round_ratios(ours.by_round(attr), theirs.by_round(attr))


def ratio_target(what: str, ours: Agg | None, theirs: Agg | None, theirs_name: str, factor: float,
                 latency: bool = False, p95_no_higher: bool = False) -> Target:
    """Throughput (2xx/s) >= factor x theirs, or (latency) p50 <= factor x theirs, judged on the median of the
    per-round ratios (their min-max printed); ``p95_no_higher``: also the median per-round p95 ratio <= 1.
    Any error in our rows (a non-2xx answer or a socket error; none should happen at these loads) fails the
    target. The medians of each side are printed too, with their own spread."""
    goal = f"{'<=' if latency else '>='} {factor:g}x {theirs_name}" + ("" if latency else ", 2xx only") \
        + (", p95 no higher" if p95_no_higher else "")
    if ours is None or theirs is None:
        return Target(what, "not measured" + ("" if theirs else f" ({theirs_name} not run)"), goal, None)
    errors = f"; errors {ours.errors} vs {theirs.errors}" if ours.errors or theirs.errors else ""
    attr, unit, digits = ("p50_ms", "ms p50", 2) if latency else ("ok_rps", "2xx/s", 0)
    ratios = paired(ours, theirs, attr)
    a, b = (" ".join(filter(None, (f"{statistic(x, attr):,.{digits}f}", x.spread(attr, digits))))
            for x in (ours, theirs))
    measured = f"{ratios.describe()} (medians {a} vs {b} {unit}){errors}"
    if not ratios.values:
        return Target(what, measured, goal, None)
    met = (ratios.median <= factor) if latency else (ratios.median >= factor)
    if p95_no_higher:
        p95 = paired(ours, theirs, "p95_ms")
        measured += f"; p95 {p95.describe()}"
        met = met and bool(p95.values) and p95.median <= 1.0
    return Target(what, measured, goal, met and ours.errors == 0)


def statistic(agg: Agg, attr: str) -> float:
    return {"ok_rps": agg.rps, "p50_ms": agg.p50, "p95_ms": agg.p95}[attr]


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
    errors = f" (errors: {a.errors} vs {b.errors})" if a.errors or b.errors else ""
    # Judged on the median of the per-round ratios (issue 26); the rows of a round ran back to back.
    ratios = round_ratios(*(by_round([r for r in runs if (r.server, r.endpoint, r.result.connections)
                                      == (server, CLASSIFY, high)], lambda r: r.result.ok_rps)
                            for server in (ours, theirs)))
    if not ratios.values:  # FastAPI answered nothing right: no ratio to judge
        return Target(what, f"{a.ok_rps:,.1f} vs {b.ok_rps:,.1f} req/s answered < 400{errors}", goal, None)
    return Target(what, f"{ratios.describe()} (medians {a.ok_rps:,.1f} vs {b.ok_rps:,.1f} req/s){errors}", goal,
                  ratios.median >= USER_MODEL_FACTOR)


# Issue 19, fixed before the first run: gRPC streamed generation "within 10% of REST" in the same run.
GRPC_THROUGHPUT_FACTOR, GRPC_FIRST_P95_FACTOR = 0.9, 1.1


def row_ratios(rows: list[ProtocolRow], ours: str, theirs: str, clients: int, attr: str) -> Ratios:
    """Per-round ``attr`` of ``ours`` over ``theirs`` at ``clients`` (rows of the same round ran back to back)."""
    def side(what: str) -> dict[int, float]:
        return by_round([r for r in rows if (r.what, r.clients) == (what, clients)], lambda r: getattr(r, attr))
    return round_ratios(side(ours), side(theirs))


def client_cpu(rows: list[ProtocolRow], what: str, clients: int) -> str:
    """The client's CPU (cores) of ``what``'s rows at ``clients``: median and min-max over the rounds."""
    values = [r.client_cpu for r in rows if (r.what, r.clients) == (what, clients) and r.client_cpu is not None]
    if not values:
        return "-"
    spread = f" [{min(values):.2f}-{max(values):.2f}]" if len(values) > 1 else ""
    return f"{median(values):.2f}{spread}"


def median_row(rows: list[ProtocolRow], what: str, clients: int, attr: str) -> tuple[float, int, int] | None:
    """(median of ``attr`` over the rounds, errors summed, rounds) of part 9's rows ``what`` at ``clients``."""
    found = [r for r in rows if (r.what, r.clients) == (what, clients)]
    if not found:
        return None
    return float(median([getattr(r, attr) for r in found])), sum(r.errors for r in found), len(found)


def triton_targets(rows: list[ProtocolRow], streams: list[int], rest: str = REST_GENERATE,
                   grpc: str = GRPC_GENERATE, name: str = "gRPC") -> list[Target]:
    """Part 9 (loadtest/bench/triton.py), per stream level: gRPC ModelStreamInfer chars/s >= 0.9x REST
    /generate's, and gRPC first-chunk p95 <= 1.1x REST's, each judged on the median of the per-round ratios
    (issue 26; their min-max printed), with each side's client CPU (cores) beside it.
    chars/s counts only complete, error-free streams on both sides (``summarize``): a failed stream is not
    work done, so errors count against a protocol's throughput; errors are also shown beside the ratio."""
    targets = []
    for n in streams:
        label = f"{n} stream{'s' if n != 1 else ''}"
        what = f"{name} streamed generation chars/s at {label}"
        goal = f">= {GRPC_THROUGHPUT_FACTOR:g}x REST /generate, same run, errors not counted"
        cpu = f"; client CPU (cores) {name} {client_cpu(rows, grpc, n)}, REST {client_cpu(rows, rest, n)}"
        a, b = median_row(rows, grpc, n, "ok_per_s"), median_row(rows, rest, n, "ok_per_s")
        ratios = row_ratios(rows, grpc, rest, n, "ok_per_s")
        if a is None or b is None or not ratios.values:
            targets.append(Target(what, "not measured" if a is None or b is None else "REST completed no stream",
                                  goal, None))
        else:
            errors = f" (errors: {a[1]} vs {b[1]})" if a[1] or b[1] else ""
            targets.append(Target(what, f"{ratios.describe()} (medians {a[0]:,.0f} vs {b[0]:,.0f} chars/s){errors}"
                                        f"{cpu}", goal, ratios.median >= GRPC_THROUGHPUT_FACTOR))
        what = f"{name} streamed generation first-chunk p95 at {label}"
        goal = f"<= {GRPC_FIRST_P95_FACTOR:g}x REST /generate's"
        a, b = median_row(rows, grpc, n, "first_p95_ms"), median_row(rows, rest, n, "first_p95_ms")
        ratios = row_ratios(rows, grpc, rest, n, "first_p95_ms")
        if a is None or b is None or not ratios.values:
            targets.append(Target(what, "not measured", goal, None))
        else:
            targets.append(Target(what, f"{ratios.describe()} (medians {a[0]:.1f} vs {b[0]:.1f} ms){cpu}", goal,
                                  ratios.median <= GRPC_FIRST_P95_FACTOR))
    return targets


def openai_targets(rows: list[ProtocolRow], streams: list[int]) -> list[Target]:
    """Issue 27, fixed before the first run: streamed /v1/completions within the same bounds against /generate."""
    return triton_targets(rows, streams, grpc=OPENAI_GENERATE, name="OpenAI /v1/completions")


def ratio_note(rows: list[ProtocolRow], ours: str, theirs: str, clients: int) -> str:
    """No target in the issue for classification by image bytes: the median ratio only, in words."""
    a, b = median_row(rows, ours, clients, "ok_per_s"), median_row(rows, theirs, clients, "ok_per_s")
    if a is None or b is None:
        return f"{ours} vs {theirs} at {clients} clients: not measured"
    ratios = row_ratios(rows, ours, theirs, clients, "ok_per_s")
    return (f"{ours} vs {theirs} at {clients} clients: {ratios.describe()} (medians {a[0]:,.0f} vs {b[0]:,.0f} "
            f"answers/s; client CPU {client_cpu(rows, ours, clients)} vs {client_cpu(rows, theirs, clients)} cores)")


# Issue 26, fixed before the first run with Triton and the real-size rows: every factor 1.0, judged on the
# median of the per-round ratios (each round runs nnserve and every peer's best configuration once).
PEER_FACTOR = 1.0


def triton_peer_targets(runs: list[StackRun], model: str, low: int, high: int) -> list[Target]:
    """Triton's row beside ours on ``model`` (KServe v2, binary tensors, same bytes to both): nnserve at least
    1.0x its goodput at ``high`` clients, its p50 at ``low`` client(s) no higher."""
    endpoint = v2_binary(model)
    ours_high, theirs_high = find(runs, NNSERVE, endpoint, high), find(runs, "triton", endpoint, high)
    ours_low, theirs_low = find(runs, NNSERVE, endpoint, low), find(runs, "triton", endpoint, low)
    return [ratio_target(f"{model} /v2 (binary) {high} clients throughput", ours_high, theirs_high, "Triton",
                         PEER_FACTOR),
            ratio_target(f"{model} /v2 (binary) {low} client p50", ours_low, theirs_low, "Triton", PEER_FACTOR,
                         latency=True)]


def best_peer(runs: list[StackRun], peers: list[str], endpoint: str, connections: int) -> tuple[str, Agg] | None:
    """The peer with the best median at ``connections`` on ``endpoint``: the lowest p50 at one client, the
    most 2xx/s above (each peer at the configuration its sweep picked for that row)."""
    found = [(peer, agg) for peer in peers if (agg := find(runs, peer, endpoint, connections)) is not None]
    if not found:
        return None
    if connections == 1:
        return min(found, key=lambda pa: pa[1].p50)
    return max(found, key=lambda pa: pa[1].rps)


def real_size_targets(runs: list[StackRun], model: str, endpoint: str, peers: list[str], levels: list[int],
                      labels: dict[str, str]) -> list[Target]:
    """Issue 26 on a real-size model: at 1 client nnserve's p50 at most 1.0x the best peer's; at every other
    level its goodput at least 1.0x the best peer's with p95 no higher. Same store entry, same bytes."""
    targets = []
    for c in levels:
        latency = c == 1
        what = f"{model} {endpoint} {c} client{'s' * (c > 1)} {'p50' if latency else 'throughput'} vs the best peer"
        best = best_peer(runs, peers, endpoint, c)
        if best is None:
            targets.append(Target(what, "not measured (no peer ran)", f"{'<=' if latency else '>='} 1x", None))
            continue
        peer, agg = best
        config = next((r.config for r in runs if (r.server, r.endpoint, r.result.connections) == (peer, endpoint, c)
                       and r.round_no), "")
        name = f"{labels.get(peer, peer)}" + (f" ({config})" if config else "")
        targets.append(ratio_target(what, find(runs, NNSERVE, endpoint, c), agg, name, PEER_FACTOR,
                                    latency=latency, p95_no_higher=not latency))
    return targets


def previous_targets(runs: list[StackRun], high: int, ref: str) -> list[Target]:
    """Against the previous release in the same run (--previous REF), at ``high`` clients on /classify and /v2
    binary infer: CPU per request (the server's processes) at most 0.6x, goodput at least 1.4x, each judged on
    the median of the per-round ratios (min-max printed). The share of the bare stack is in the report's tables."""
    def side(server: str, endpoint: str, cpu: bool) -> dict[int, float]:
        return {r.round_no: r.cpu_ms_per_request if cpu else r.result.ok_rps for r in runs
                if (r.server, r.endpoint, r.result.connections) == (server, endpoint, high) and r.round_no}

    targets = []
    for endpoint in (CLASSIFY, V2_BINARY):
        cpu = round_ratios(side(NNSERVE, endpoint, True), side(PREVIOUS, endpoint, True))
        goodput = round_ratios(side(NNSERVE, endpoint, False), side(PREVIOUS, endpoint, False))
        for what, ratios, goal, met in ((f"{endpoint} {high} clients CPU/request vs {ref}", cpu, "<= 0.6x",
                                         cpu.median <= 0.6),
                                        (f"{endpoint} {high} clients goodput vs {ref}", goodput, ">= 1.4x",
                                         goodput.median >= 1.4)):
            targets.append(Target(what, ratios.describe(), goal, met if ratios.values else None))
    return targets


INT8_FACTOR = 2.0  # issue 26: the tuner's INT8 pick at least 2x plain FastAPI serving the fp32 model
RERUN_TOLERANCE = 0.10  # issue 26: the tuner's pick, rerun in the bench, within 10% of what the tuner measured


def int8_target(runs: list[StackRun], model: str, endpoint: str, high: int, server: str | None, gate: str,
                labels: dict[str, str]) -> Target:
    """The tuner allowed to serve the gated INT8 variant (``server``: the nnserve server of that pick; None:
    the store has no gated INT8 entry of ``model``) vs plain FastAPI + ORT on the fp32 model at ``high``
    clients: goodput at least 2x, judged on the median of the per-round ratios. ``gate``: the INT8 accuracy
    drop (or why it was not tried), printed with the verdict."""
    what = f"{model} {endpoint} {high} clients, tuner's pick with INT8 allowed ({gate}) vs FastAPI fp32"
    if server is None:
        return Target(what, "not measured (no gated INT8 variant in the store)", f">= {INT8_FACTOR:g}x", None)
    return ratio_target(what, find(runs, server, endpoint, high), find(runs, "fastapi", endpoint, high),
                        labels.get("fastapi", "fastapi"), INT8_FACTOR)


def rerun_targets(runs: list[StackRun], model: str, endpoint: str, server: str, measured: dict[int, float]) -> \
        list[Target]:
    """The tuner's pick (served by ``server`` in the rounds) within 10% of the goodput the tuner measured for
    it (``measured``: concurrency -> 2xx/s), at each concurrency: the median over the rounds."""
    targets = []
    for c, tuner_rps in sorted(measured.items()):
        what = f"{model} {endpoint} {c} client{'s' * (c > 1)}: {server} (the tuner's pick) rerun vs the tuner"
        agg = find(runs, server, endpoint, c)
        goal = f"within {RERUN_TOLERANCE:.0%} of the tuner's {tuner_rps:,.1f} 2xx/s"
        if agg is None or not tuner_rps:
            targets.append(Target(what, "not measured", goal, None))
            continue
        ratio = agg.rps / tuner_rps
        targets.append(Target(what, f"{agg.rps:,.1f} 2xx/s {agg.spread()} = {ratio:.2f}x the tuner's", goal,
                              abs(ratio - 1) <= RERUN_TOLERANCE))
    return targets
