"""The bench's verdict logic on made-up measurements (no server, no timing): a target is met, MISSED or
not measured exactly as its rule says."""

from __future__ import annotations

import io
import json
from collections import Counter

import numpy as np
import pytest

from loadtest.bench.overload import OverloadResult
from loadtest.bench.recovery import RecoveryResult, recovery_time, recovery_time_single
from loadtest.bench.stacks import CLASSIFY, FEATURES, NNSERVE, V2, StackRun
from loadtest.bench.targets import evaluate, recovery_target
from loadtest.bench.wrk import WrkResult


def run(server: str, endpoint: str, connections: int, rps: float, p50: float, p95: float, round_no: int = 0,
        status_errors: int = 0) -> StackRun:
    return StackRun(server, endpoint, WrkResult(connections, int(rps * 10), 10.0, rps, p50, p95, p95, p95,
                                                status_errors, 0), round_no=round_no)


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
    assert v["/classify 32 clients throughput >= 1x FastAPI, 2xx only"] == "met"
    assert v["/classify 32 clients throughput >= 2x LitServe, 2xx only"] == "**MISSED**"  # 1.8x
    assert v["/classify 32 clients p95 <= 50 ms"] == "**MISSED**"
    assert v["/features 32 clients throughput >= 3x FastAPI, 2xx only"] == "**MISSED**"  # 2.5x
    assert v["/v2 lenet5 32 clients throughput >= 1.5x MLServer, 2xx only"] == "not measured"
    v2 = [run(NNSERVE, V2, 32, 1200, 25.0, 50.0), run("mlserver", V2, 32, 850, 37.0, 60.0)]
    assert verdicts(runs=v2)["/v2 lenet5 32 clients throughput >= 1.5x MLServer, 2xx only"] == "**MISSED**"  # 1.41x
    v2[1] = run("mlserver", V2, 32, 800, 37.0, 60.0)
    assert verdicts(runs=v2)["/v2 lenet5 32 clients throughput >= 1.5x MLServer, 2xx only"] == "met"


def test_targets_judge_the_median_over_rounds_and_ignore_the_sweep():
    # nnserve 900 / 1300 / 1000 2xx/s over three rounds vs LitServe 600 / 450 / 500: per-round ratios 1.5,
    # 2.89, 2.0, median 2.0 (issue 26). The sweep's row (round 0) at 100 2xx/s is not a round and must not count.
    runs = [run(NNSERVE, CLASSIFY, 32, rps, 30.0, 40.0, round_no=i + 1) for i, rps in enumerate((900, 1300, 1000))]
    runs += [run("litserve", CLASSIFY, 32, rps, 50.0, 60.0, round_no=i + 1) for i, rps in enumerate((600, 450, 500))]
    runs.append(run("litserve", CLASSIFY, 32, 100, 50.0, 60.0, round_no=0))
    targets = {t.target: t for t in evaluate(runs=runs, low=1, high=32, generate=[], step_limits={}, overload=None,
                                             max_queue_delay_ms=None, batch_ms=None, recovery=None)}
    litserve = targets[">= 2x LitServe, 2xx only"]
    assert litserve.met is True and litserve.measured.startswith("2.00x [1.50-2.89] over 3 rounds")
    assert "(medians 1,000 [900-1,300] vs 500 [450-600] 2xx/s)" in litserve.measured
    # one round below 2x does not decide it; the median does
    assert min(900 / 600, 1300 / 450, 1000 / 500) < 2


def test_throughput_counts_2xx_only_and_our_errors_fail_the_target():
    # 1000 answers/s of which 600/s were 503s: 400 2xx/s against FastAPI's 300 is 1.33x, and even then an
    # error in our row fails the target (none should happen at 32 clients).
    ours = StackRun(NNSERVE, CLASSIFY, WrkResult(32, 10_000, 10.0, 1000.0, 5.0, 9.0, 9.0, 9.0, 6_000, 0), round_no=1)
    theirs = run("fastapi", CLASSIFY, 32, 300, 50.0, 70.0, round_no=1)
    assert ours.result.ok_rps == 400
    target = next(t for t in evaluate(runs=[ours, theirs], low=1, high=32, generate=[], step_limits={},
                                      overload=None, max_queue_delay_ms=None, batch_ms=None, recovery=None)
                  if t.target == ">= 1x FastAPI, 2xx only")
    assert target.met is False and "1.33x (1 round) (medians 400 vs 300 2xx/s); errors 6000 vs 0" in target.measured
    clean = StackRun(NNSERVE, CLASSIFY, WrkResult(32, 4_000, 10.0, 400.0, 5.0, 9.0, 9.0, 9.0, 0, 0), round_no=1)
    assert next(t for t in evaluate(runs=[clean, theirs], low=1, high=32, generate=[], step_limits={},
                                    overload=None, max_queue_delay_ms=None, batch_ms=None, recovery=None)
                if t.target == ">= 1x FastAPI, 2xx only").met is True


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


def test_recovery_target_is_judged_by_the_rule_fixed_before_the_first_run():
    # One lone slow request 1.5 s in: the original rule (last single request over 2x idle) says 1.5 s, a miss;
    # the windowed rule added after a miss would say 0 s. The target must follow the original rule.
    samples = [(0.01 * i, 9.0 if i == 150 else 1.0) for i in range(200)]
    assert recovery_time_single(samples, 2.0) == (pytest.approx(1.509), True)
    assert recovery_time(samples, 2.0) == (0.0, True)
    result = RecoveryResult(items=10, idle_median_ms=1.0, large_status=200, samples=samples)
    result.recovery_s, result.recovered = recovery_time(samples, 2.0)
    result.recovery_single_s, result.recovered_single = recovery_time_single(samples, 2.0)
    target = recovery_target(result)
    assert target.met is False and "1.509 s" in target.measured and "windowed" in target.measured
    still_slow = samples[:-1] + [(2.0, 9.0)]
    assert recovery_time_single(still_slow, 2.0)[1] is False


# ---- the user-model part (loadtest/bench/user_model.py) -------------------------------------------------------

def test_user_model_target_counts_only_answers_below_400():
    from loadtest.bench.targets import user_model_target
    from loadtest.bench.user_model import FASTAPI, NNSERVE

    def wrk(server: str, requests: int, status_errors: int = 0) -> StackRun:
        return StackRun(server, CLASSIFY, WrkResult(32, requests, 10.0, requests / 10, 50.0, 80.0, 90.0, 99.0,
                                                     status_errors, 0))

    assert user_model_target([wrk(NNSERVE, 1000), wrk(FASTAPI, 500)], 32).verdict == "met"  # exactly 2x
    assert user_model_target([wrk(NNSERVE, 999), wrk(FASTAPI, 500)], 32).verdict == "**MISSED**"
    # 3x the answers, but half of them 503s: 1.5x the work done
    shed = user_model_target([wrk(NNSERVE, 1500, status_errors=750), wrk(FASTAPI, 500)], 32)
    assert shed.verdict == "**MISSED**" and "1.50x" in shed.measured and "errors: 750 vs 0" in shed.measured
    # the baseline's errors count against it the same way
    assert user_model_target([wrk(NNSERVE, 800), wrk(FASTAPI, 500, status_errors=200)], 32).verdict == "met"
    assert user_model_target([wrk(NNSERVE, 800)], 32).verdict == "not measured"
    assert user_model_target([wrk(NNSERVE, 800), wrk(FASTAPI, 500, status_errors=500)], 32).verdict \
        == "not measured"  # FastAPI did no work: no ratio


def test_user_model_target_judges_the_medians_of_the_rounds():
    from loadtest.bench.targets import median_ok_rps, user_model_target
    from loadtest.bench.user_model import FASTAPI, NNSERVE, round_order

    # FastAPI's second round hit a busy machine: one slow round must not decide the verdict. Per-round
    # ratios 1.04, 3.06, 1.08: their median, 1.08x, is judged (issue 26).
    runs = [run(NNSERVE, CLASSIFY, 32, rps, 500.0, 700.0, round_no=i + 1) for i, rps in enumerate((56.0, 55.0, 57.0))]
    runs += [run(FASTAPI, CLASSIFY, 32, rps, 500.0, 700.0, round_no=i + 1) for i, rps in enumerate((54.0, 18.0, 53.0))]
    runs.append(run(NNSERVE, CLASSIFY, 1, 40.0, 20.0, 25.0))  # another level: not in the medians at 32
    m = median_ok_rps(runs, NNSERVE, CLASSIFY, 32)
    assert (m.ok_rps, m.rounds, m.errors) == (56.0, 3, 0)
    target = user_model_target(runs, 32)
    assert target.verdict == "**MISSED**" and target.measured.startswith("1.08x [1.04-3.06] over 3 rounds (medians "
                                                                            "56.0 vs 53.0 req/s)")
    assert [round_order(i)[0] for i in range(4)] == [NNSERVE, FASTAPI, NNSERVE, FASTAPI]


def test_ok_rps_leaves_out_error_answers():
    w = WrkResult(32, 1000, 10.0, 100.0, 1.0, 2.0, 3.0, 4.0, status_errors=250, socket_errors=7)
    assert w.ok_rps == 75.0 and w.errors == 257


def test_user_models_config_serves_only_that_model_with_the_default_batching(tmp_path):
    from loadtest.bench.user_model import write_models_config
    from service.settings import ModelConfig, Settings

    path = write_models_config(tmp_path / "models.yaml", "effnet_b0", "effnet_b0:abc123")
    settings = Settings.from_env({"NNSERVE_MODELS_CONFIG": str(path)})
    assert settings.models == (ModelConfig("effnet_b0", "effnet_b0:abc123"),)
    globals_ = Settings.from_env({"NNSERVE_MODELS_CONFIG": str(path), "NNSERVE_MAX_QUEUE_DELAY_MS": "2"})
    assert globals_.model("effnet_b0").max_queue_delay_ms == 2.0, "--server-env still sets the batching"


def test_fastapi_baseline_serves_the_model_the_environment_names():
    from loadtest.baselines.common import served_models, tag_variable
    from loadtest.bench.user_model import baseline_env

    assert served_models({}) == ("lenet5", "vgg_fc7"), "the main rows' baseline is unchanged"
    env = baseline_env("effnet_b0", "effnet_b0:abc123")
    assert served_models(env) == ("effnet_b0", None), "no /features model to load"
    assert tag_variable("effnet_b0") == "BASELINE_EFFNET_B0_TAG" and env["BASELINE_EFFNET_B0_TAG"] == "effnet_b0:abc123"
    assert tag_variable("my-net.v2") == "BASELINE_MY_NET_V2_TAG"


def test_user_model_commands_are_what_finetune_and_export_accept(tmp_path):
    from export.__main__ import parse_args as export_args
    from loadtest.bench.user_model import KWARGS, SIZE, export_command, finetune_command
    from models.finetune import parse_args as finetune_args

    ft = finetune_args(finetune_command(tmp_path / "a")[3:])  # after: python -m models.finetune
    assert (ft.name, ft.size, ft.channels, json.loads(ft.kwargs), ft.out) == ("effnet_b0", SIZE, 3, KWARGS,
                                                                             tmp_path / "a")
    assert KWARGS["image_size"] == SIZE and ft.max_steps <= 10
    artifacts, options = export_args(export_command(tmp_path / "a", tmp_path / "r")[3:])
    assert artifacts == [tmp_path / "a"] and options.register and not options.int8 and options.bench_runs <= 10


def test_user_model_request_is_a_224_rgb_png_with_the_model_field(tmp_path):
    from PIL import Image

    from loadtest.bench.user_model import SIZE, upscaled_png
    from loadtest.bench.wrk import RequestFiles, multipart_body

    png = upscaled_png(np.full((28, 28), 200, dtype=np.uint8))
    image = Image.open(io.BytesIO(png))
    assert (image.format, image.mode, image.size) == ("PNG", "RGB", (SIZE, SIZE))
    files = RequestFiles(tmp_path / "x.png", "7", classify_fields={"model": "effnet_b0"})
    assert files.classify_args() == ["multipart", str(tmp_path / "x.png"), "model=effnet_b0"]
    body, _ = multipart_body(png, files.classify_fields)
    assert b'name="model"\r\n\r\neffnet_b0\r\n' in body


def test_user_model_section_reports_the_rows_and_the_verdict():
    import argparse

    from loadtest.bench.report import Results, user_model_section
    from loadtest.bench.targets import user_model_target
    from loadtest.bench.user_model import FASTAPI, NNSERVE, UserModelResult

    runs = [run(NNSERVE, CLASSIFY, 32, 60.0, 500.0, 700.0), run(FASTAPI, CLASSIFY, 32, 50.0, 600.0, 800.0)]
    for r in runs:
        r.round_no = 1
    r = Results(info={}, user_model=UserModelResult("effnet_b0:abc", runs, made="made", png_bytes=1234, threads=1,
                                                    item_ms={1: 20.0, 32: 25.0}))
    r.targets = [user_model_target(runs, 32)]
    text = "\n".join(user_model_section(argparse.Namespace(duration=5), r))
    assert "## 8. User model (EfficientNet-B0, 224x224)" in text and "`effnet_b0:abc`" in text
    assert "| 1 | nnserve (dynamic batching) | 32 | 600 | 60.0 | 60.0 |" in text
    assert "Median ok req/s over the rounds: nnserve (dynamic batching) at 32: 60.0; FastAPI + ORT, 2 workers at 32: " \
        "50.0." in text
    assert "1.20x (1 round) (medians 60.0 vs 50.0 req/s): **MISSED**" in text
    assert "batch 1: 20.0 ms, batch 32: 25.0 ms (0.80x batch 1's speed)" in text
    assert user_model_section(argparse.Namespace(duration=5), Results(info={})) == []


# --- part 9: Triton protocols (loadtest/bench/triton.py) ---------------------------------------------------

def call(ok: bool, units: int, started: float, first: float, ended: float, error: str = ""):
    from loadtest.bench.protocol_clients import Call

    return Call(ok, units, started, first, ended, error or ("" if ok else "stream ended early"))


def test_summarize_counts_only_complete_streams():
    from loadtest.bench.triton import GRPC_GENERATE, summarize

    calls = [call(True, 200, 0.0, 0.010, 0.5), call(True, 200, 0.5, 0.520, 1.0),
             call(False, 120, 1.0, 1.010, 2.0)]  # a short stream: its 120 characters are not work done
    row = summarize(GRPC_GENERATE, 1, 1, calls, start_at=0.0, cpu_s=0.5)
    assert (row.ok, row.errors, row.error_sample) == (2, 1, "stream ended early")
    assert row.seconds == 2.0 and row.ok_per_s == 200.0  # 400 characters over the 2 s up to the last answer
    assert row.first_p50_ms == pytest.approx(15.0) and row.full_p50_ms == pytest.approx(500.0)
    assert row.client_cpu == 0.25


def test_summarize_with_no_complete_call_measures_nothing():
    from loadtest.bench.triton import REST_GENERATE, summarize

    row = summarize(REST_GENERATE, 16, 1, [call(False, 0, 0.0, float("nan"), 1.0, "HTTP 503")], 0.0, None)
    assert (row.ok, row.errors, row.ok_per_s, row.client_cpu) == (0, 1, 0.0, None)
    assert np.isnan(row.first_p95_ms)


def test_clients_are_spread_evenly_over_the_processes():
    from loadtest.bench.triton import split

    assert split(16, 4) == [4, 4, 4, 4]
    assert split(1, 4) == [1]
    assert split(6, 4) == [2, 2, 1, 1]
    assert split(32, 3) == [11, 11, 10]


def test_both_protocols_get_the_same_prompts_and_seeds():
    from loadtest.bench.protocol_clients import request_plan

    prompts = ["a", "b", "c"]
    assert [request_plan(t, i, prompts) for t in range(2) for i in range(2)] == \
        [("a", 0), ("b", 1), ("b", 1009), ("c", 1010)]


def protocol_row(what: str, clients: int, per_s: float, first_p95: float, errors: int = 0, round_no: int = 1):
    from loadtest.bench.triton import ProtocolRow

    return ProtocolRow(what, clients, round_no, 4.0, int(per_s), errors, per_s, first_p95 / 2, first_p95, 50.0,
                       60.0, 0.3)


def triton_verdicts(rows) -> dict[str, str]:
    from loadtest.bench.targets import triton_targets

    return {t.what: t.verdict for t in triton_targets(rows, [1, 16])}


def test_grpc_generation_within_ten_percent_of_rest():
    from loadtest.bench.triton import GRPC_GENERATE as G
    from loadtest.bench.triton import REST_GENERATE as R

    rows = [protocol_row(R, 1, 1000, 10.0), protocol_row(G, 1, 910, 11.0),  # 0.91x, 1.10x: both met
            protocol_row(R, 16, 4000, 20.0), protocol_row(G, 16, 3500, 23.0)]  # 0.875x, 1.15x: both missed
    v = triton_verdicts(rows)
    assert v["gRPC streamed generation chars/s at 1 stream"] == "met"
    assert v["gRPC streamed generation first-chunk p95 at 1 stream"] == "met"
    assert v["gRPC streamed generation chars/s at 16 streams"] == "**MISSED**"
    assert v["gRPC streamed generation first-chunk p95 at 16 streams"] == "**MISSED**"


def test_openai_streams_judged_against_generate_with_the_same_bounds():
    from loadtest.bench.targets import openai_targets
    from loadtest.bench.triton import GRPC_GENERATE as G
    from loadtest.bench.triton import OPENAI_GENERATE as O
    from loadtest.bench.triton import REST_GENERATE as R
    from loadtest.bench.triton import round_order

    rows = [protocol_row(R, 1, 1000, 10.0), protocol_row(O, 1, 950, 10.5), protocol_row(G, 1, 10, 99.0),
            protocol_row(R, 16, 4000, 20.0), protocol_row(O, 16, 3000, 30.0)]
    v = {t.what: t.verdict for t in openai_targets(rows, [1, 16])}
    assert v == {"OpenAI /v1/completions streamed generation chars/s at 1 stream": "met",
                 "OpenAI /v1/completions streamed generation first-chunk p95 at 1 stream": "met",
                 "OpenAI /v1/completions streamed generation chars/s at 16 streams": "**MISSED**",
                 "OpenAI /v1/completions streamed generation first-chunk p95 at 16 streams": "**MISSED**"}
    assert [round_order(i)[0] for i in range(3)] == [R, G, O] and sorted(round_order(1)) == sorted((R, G, O))


def test_grpc_generation_judged_on_the_median_round_with_errors_shown():
    from loadtest.bench.targets import triton_targets
    from loadtest.bench.triton import GRPC_GENERATE as G
    from loadtest.bench.triton import REST_GENERATE as R

    # One slow gRPC round (other work on the machine) does not decide it: the median of three does.
    rows = [protocol_row(R, 1, 1000, 10.0, round_no=i) for i in (1, 2, 3)]
    rows += [protocol_row(G, 1, per_s, 10.0, errors=1, round_no=i) for i, per_s in ((1, 400), (2, 950), (3, 990))]
    chars = triton_targets(rows, [1])[0]
    assert chars.met and chars.measured.startswith("0.95x [0.40-0.99] over 3 rounds")
    assert "errors: 3 vs 0" in chars.measured
    assert "client CPU (cores) gRPC 0.30" in chars.measured and "REST 0.30" in chars.measured  # each side's


def test_grpc_generation_not_measured_when_a_side_is_missing_or_rest_did_nothing():
    from loadtest.bench.triton import GRPC_GENERATE as G
    from loadtest.bench.triton import REST_GENERATE as R

    v = triton_verdicts([protocol_row(G, 1, 900, 10.0), protocol_row(R, 16, 0, float("nan"), errors=5),
                         protocol_row(G, 16, 900, 10.0)])
    assert set(v.values()) == {"not measured"}


def test_image_bytes_ratio_is_reported_without_a_verdict():
    from loadtest.bench.targets import ratio_note
    from loadtest.bench.triton import GRPC_CLASSIFY, REST_CLASSIFY, WRK_CLASSIFY

    rows = [protocol_row(GRPC_CLASSIFY, 32, 600, 80.0), protocol_row(REST_CLASSIFY, 32, 400, 90.0)]
    assert ratio_note(rows, GRPC_CLASSIFY, REST_CLASSIFY, 32).endswith(
        "1.50x (1 round) (medians 600 vs 400 answers/s; client CPU 0.30 vs 0.30 cores)")
    assert ratio_note(rows, GRPC_CLASSIFY, WRK_CLASSIFY, 32).endswith("not measured")


def test_report_shows_medians_spread_configurations_and_the_load_before_each_row():
    import argparse

    from loadtest.bench.compare import LIMIT, Comparison
    from loadtest.bench.report import Results, stacks_section

    def row(server, c, rps, round_no, config, load="1.0 / 1.0 / 1.0"):
        r = run(server, CLASSIFY, c, rps, 2.0, 4.0, round_no=round_no)
        r.config, r.load, r.cpu_ms_per_request = config, load, 0.5
        return r

    runs = [row(NNSERVE, 32, rps, i + 1, "defaults", load=f"{i}.5 / 1.0 / 1.0")
            for i, rps in enumerate((900, 1100, 1000))]
    runs += [row("fastapi", 32, rps, i + 1, "workers=2, no batching") for i, rps in enumerate((400, 600, 500))]
    runs += [row(LIMIT, 32, rps, i + 1, "workers=2, no batching") for i, rps in enumerate((9000, 10000, 11000))]
    sweep = [row("fastapi", 32, 450, 0, "workers=1, no batching"), row("fastapi", 32, 520, 0, "workers=2, no batching")]
    cmp = Comparison(runs=runs, sweep=sweep, best={("fastapi", CLASSIFY, 32): "workers=2, no batching"},
                     orders=[["nnserve", "fastapi", "limit"]] * 3)
    args = argparse.Namespace(duration=5, rounds=3, sweep_duration=3)
    text = "\n".join(stacks_section(args, Results(info={}, comparison=cmp)))
    assert "| `/classify` | 32 | defaults | 1,000 [900-1,100] |" in text
    assert "| `/classify` | 32 | workers=2, no batching | 500 [400-600] |" in text
    # per-round ratios 900/400, 1100/600, 1000/500: median 2.00, min-max 1.83-2.25
    assert "| 2.00x [1.83-2.25] over 3 rounds |" in text
    assert "| fastapi | FastAPI on uvicorn + uvloop + httptools |" in text  # the HTTP stack each peer ran on
    assert "**10% of the bare stack's throughput**" in text  # 1,000 / 10,000
    assert "| 2 | 1.5 / 1.0 / 1.0 | nnserve |" in text  # the load average read before round 2's row
    assert "| **workers=2, no batching** |" in text and "| workers=1, no batching |" in text  # the sweep, kept one bold
