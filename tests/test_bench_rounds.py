"""Issue 26's verdicts: a ratio target is judged on the median of the per-round ratios (each round pairs
nnserve with each peer measured in it), their min-max printed; the real-size rows against the best peer;
Triton's rows. Pure functions over made-up rows: no server, nothing timed."""

from __future__ import annotations

import math

from loadtest.bench.stacks import CLASSIFY, FEATURES, NNSERVE, StackRun, v2_binary
from loadtest.bench.targets import Ratios, find, paired, real_size_targets, round_ratios, triton_peer_targets
from loadtest.bench.wrk import WrkResult


def run(server: str, endpoint: str, connections: int, rps: float, p50: float, p95: float, round_no: int,
        config: str = "") -> StackRun:
    return StackRun(server, endpoint, WrkResult(connections, int(rps * 10), 10.0, rps, p50, p95, p95, p95, 0, 0),
                    round_no=round_no, config=config)


def test_per_round_ratio_median_and_min_max():
    ratios = round_ratios({1: 900, 2: 1300, 3: 1000, 4: 800, 5: 1100}, {1: 600, 2: 450, 3: 500, 4: 800, 5: 500})
    assert [round(v, 2) for v in ratios.values] == [1.5, 2.89, 2.0, 1.0, 2.2]
    assert ratios.median == 2.0
    assert ratios.describe() == "2.00x [1.00-2.89] over 5 rounds"


def test_median_of_ratios_is_not_the_ratio_of_medians():
    # nnserve's best round against the peer's worst: the ratio of medians (1000 / 500 = 2.0) hides that in
    # every round nnserve was below 2x of the peer measured in that same round.
    ours, theirs = {1: 1000, 2: 1900, 3: 600}, {1: 600, 2: 1000, 3: 500}
    assert sorted(ours.values())[1] / sorted(theirs.values())[1] == 1000 / 600
    ratios = round_ratios(ours, theirs)
    assert max(ratios.values) < 2 and math.isclose(ratios.median, 1000 / 600)


def test_only_rounds_both_ran_are_paired_and_empty_rounds_have_no_ratio():
    ratios = round_ratios({1: 100, 2: 200, 3: 300}, {2: 100, 3: 0, 4: 50})  # round 3: the peer answered nothing
    assert ratios.values == [2.0]
    assert ratios.describe() == "2.00x (1 round)"
    assert round_ratios({1: float("nan")}, {1: 10}).values == []
    nothing = Ratios([])
    assert math.isnan(nothing.median) and nothing.describe() == "no round with both"


def test_rows_pair_by_round_number_not_by_order():
    runs = [run(NNSERVE, CLASSIFY, 32, rps, 5, 9, r) for r, rps in ((2, 200), (1, 100))]
    runs += [run("fastapi", CLASSIFY, 32, rps, 5, 9, r) for r, rps in ((1, 50), (2, 400))]
    ratios = paired(find(runs, NNSERVE, CLASSIFY, 32), find(runs, "fastapi", CLASSIFY, 32), "ok_rps")
    assert ratios.values == [2.0, 0.5]


def real_size_rows() -> list[StackRun]:
    rows = []
    for r in range(1, 6):
        rows += [run(NNSERVE, FEATURES, 1, 200, 5.0, 6.0, r), run("fastapi", FEATURES, 1, 250, 4.0, 5.0, r, "w=1 t=2"),
                 run("litserve", FEATURES, 1, 150, 6.0, 7.0, r, "batch"),
                 run(NNSERVE, FEATURES, 32, 300 + r, 90.0, 120.0, r),
                 run("fastapi", FEATURES, 32, 280, 100.0, 110.0, r, "w=2 t=1"),
                 run("litserve", FEATURES, 32, 290, 95.0, 130.0, r, "batch 5 ms")]
    return rows


def test_real_size_targets_judge_against_the_best_peer_at_each_level():
    targets = real_size_targets(real_size_rows(), "vgg_fc7", FEATURES, ["fastapi", "litserve"], [1, 32],
                                {"fastapi": "FastAPI + ORT", "litserve": "LitServe"})
    one, many = targets
    # 1 client: the best peer is the one with the lowest p50 (FastAPI, 4 ms): 5 / 4 = 1.25x > 1.0: missed
    assert one.met is False and "FastAPI + ORT (w=1 t=2)" in one.target and one.measured.startswith("1.25x")
    # 32 clients: the best is the most 2xx/s (LitServe 290); nnserve (301-305) is faster, its p95 (120 ms)
    # below LitServe's (130): met
    assert "LitServe (batch 5 ms)" in many.target and "p95 no higher" in many.target
    assert many.met is True and "p95 0.92x" in many.measured


def test_real_size_throughput_with_a_higher_p95_is_a_miss():
    rows = [row for row in real_size_rows() if row.server != "litserve"]  # best at 32 is now FastAPI, p95 110
    many = real_size_targets(rows, "vgg_fc7", FEATURES, ["fastapi"], [32], {})[0]
    assert many.met is False and "p95 1.09x" in many.measured  # 2xx/s above 1.0x, p95 120 / 110 not


def test_real_size_target_not_measured_without_peers():
    assert real_size_targets(real_size_rows(), "vgg_fc7", FEATURES, ["bentoml"], [1], {})[0].met is None


def test_triton_targets_on_the_binary_v2_rows():
    endpoint = v2_binary("effnet_b0")
    rows = []
    for r in range(1, 6):
        rows += [run(NNSERVE, endpoint, 1, 50, 19.0, 22.0, r), run("triton", endpoint, 1, 48, 20.0, 23.0, r),
                 run(NNSERVE, endpoint, 32, 90 if r != 3 else 60, 300.0, 350.0, r),
                 run("triton", endpoint, 32, 85, 320.0, 360.0, r)]
    throughput, latency = triton_peer_targets(rows, "effnet_b0", 1, 32)
    assert throughput.what == "effnet_b0 /v2 (binary) 32 clients throughput" and throughput.met is True
    assert throughput.measured.startswith("1.06x [0.71-1.06] over 5 rounds")  # one bad round does not decide it
    assert latency.met is True and latency.measured.startswith("0.95x")
    assert triton_peer_targets(rows, "vgg_fc7", 1, 32)[0].met is None  # Triton did not serve it: not measured


def test_previous_release_targets_pair_cpu_and_goodput_by_round():
    from loadtest.bench.stacks import PREVIOUS, V2_BINARY
    from loadtest.bench.targets import previous_targets

    runs = []
    for round_no, (ours_cpu, old_cpu, ours_rps, old_rps) in enumerate(
            [(0.30, 0.60, 3000, 2000), (0.35, 0.50, 2800, 2000), (0.50, 0.55, 2000, 2100)], start=1):
        for server, cpu, rps in ((NNSERVE, ours_cpu, ours_rps), (PREVIOUS, old_cpu, old_rps)):
            row = run(server, CLASSIFY, 32, rps, 5.0, 9.0, round_no)
            row.cpu_ms_per_request = cpu
            runs.append(row)
    cpu, goodput, v2_cpu, v2_goodput = previous_targets(runs, 32, "abc123")
    assert cpu.what == "/classify 32 clients CPU/request vs abc123" and cpu.target == "<= 0.6x"
    assert cpu.measured == "0.70x [0.50-0.91] over 3 rounds" and cpu.met is False  # median 0.70 > 0.6
    assert goodput.measured == "1.40x [0.95-1.50] over 3 rounds" and goodput.met is True
    assert v2_cpu.what.startswith(V2_BINARY) and v2_cpu.met is None and v2_goodput.met is None  # not measured


def test_int8_row_against_fastapi_fp32_and_not_measured_without_a_gated_variant():
    from loadtest.bench.targets import int8_target

    rows = [run("nnserve-int8", FEATURES, 32, rps, 50, 60, r) for r, rps in ((1, 700), (2, 500), (3, 640))]
    rows += [run("fastapi", FEATURES, 32, 300, 90, 100, r) for r in (1, 2, 3)]
    met = int8_target(rows, "vgg_fc7", FEATURES, 32, "nnserve-int8", "top-1 drop 0.0 points", {})
    assert met.met is True and met.measured.startswith("2.13x [1.67-2.33] over 3 rounds")
    assert "top-1 drop 0.0 points" in met.what and met.target.startswith(">= 2x")
    assert int8_target(rows, "vgg_fc7", FEATURES, 32, None, "not tried", {}).met is None


def test_the_tuners_pick_rerun_is_judged_within_ten_percent_at_each_level():
    from loadtest.bench.targets import rerun_targets

    rows = [run(NNSERVE, FEATURES, c, rps, 5, 6, r) for r in (1, 2, 3) for c, rps in ((1, 200 + r), (32, 330))]
    one, absent, many = rerun_targets(rows, "vgg_fc7", FEATURES, NNSERVE, {1: 190.0, 32: 400.0, 4: 250.0})
    assert one.met is True and "202.0 2xx/s" in one.measured and "1.06x" in one.measured  # 202 / 190
    assert many.met is False and "0.82x" in many.measured  # 330 / 400: more than 10% below
    assert absent.met is None  # the rounds did not run that level


def test_tuned_nnserve_servers_replace_the_defaults_in_the_rounds():
    from loadtest.bench.compare import Comparison, Nnserve, units

    servers = {NNSERVE: Nnserve({"NNSERVE_WORKERS": "1"}, "tuned: workers=1"),
               "nnserve-int8": Nnserve({"NNSERVE_WORKERS": "1"}, "tuned: int8")}
    routes = {NNSERVE: (FEATURES, v2_binary("vgg_fc7")), "nnserve-int8": (FEATURES,)}
    plan = units([], [1, 32], Comparison(), routes, servers=servers)
    assert [(u.server, u.describe(), len(u.rows)) for u in plan] == [
        (NNSERVE, "tuned: workers=1", 4), ("nnserve-int8", "tuned: int8", 2)]
    assert units([], [1], Comparison())[0].describe().startswith("defaults")
