"""The lifecycle scenario's own logic (loadtest/lifecycle.py), without a server: reading a /generate event
stream, judging a stream cut, counting the server's responses, judging the targets, writing the doc.
No timing is asserted; the real run is `make lifecycle` (docs/lifecycle.md)."""

from __future__ import annotations

import json

import pytest

from harness.server import REPO_ROOT
from loadtest import lifecycle
from service.rest import sse_event

END = sse_event(json.dumps({"model": "char_gru:v", "chars": 5, "finish_reason": "length"}), "end")


def test_an_event_stream_is_read_back_as_the_server_writes_it():
    body = sse_event("ab") + sse_event("c\nd") + sse_event("e") + END
    text, end, error = lifecycle.parse_sse(body)
    assert text == "abc\nde" and end["finish_reason"] == "length" and error is None
    assert lifecycle.stream_cut(200, body, 6) is None


@pytest.mark.parametrize("status, body, reason", [
    (503, "", "status 503"),
    (200, sse_event("abc"), "no end event after 3 characters"),
    (200, sse_event("abc") + sse_event(json.dumps({"error": "boom"}), "error"), "error event"),
    (200, sse_event("abc") + END, "3 characters of 6"),
    (200, sse_event("abc") + "event: end\ndata: {not json\n\n", "unreadable end event"),
])
def test_every_kind_of_cut_stream_is_named(status, body, reason):
    assert reason in lifecycle.stream_cut(status, body, 6)


def test_the_servers_response_counts_are_differenced_by_route_and_code():
    before = lifecycle.http_codes('nnserve_http_responses_total{code="200",route="classify"} 10.0\n'
                                  "# HELP x\nother_total 3.0\n")
    after = lifecycle.http_codes('nnserve_http_responses_total{code="200",route="classify"} 25.0\n'
                                 'nnserve_http_responses_total{route="classify",code="503"} 2.0\n'
                                 'nnserve_http_responses_total{code="200",route="generate"} 0.0\n')
    assert lifecycle.codes_delta(before, after) == {"classify 200": 15, "classify 503": 2}


def phase(kind: str, rnd: int, p99: float, changes: list | None = None) -> dict:
    return {"kind": kind, "round": rnd, "t0": 0.0, "t1": 1.0, "load_avg": "1.0 / 1.0 / 1.0", "requests": 100,
            "rps": 100.0, "p50_ms": 5.0, "p99_ms": p99, "max_ms": 50.0, "errors": 0, "changes": changes or []}


def result(p99s: dict[str, list[float]], wrk_errors: int = 0, cut: int = 0, drift: float = 2.0,
           streams: int = 30) -> dict:
    change = {"what": "default abc", "status": 200, "call_s": 0.3, "seconds": 0.2}
    phases = [phase(kind, i + 1, p, [change] if kind == "switch" else None)
              for kind, values in p99s.items() for i, p in enumerate(values)]
    load = {"phases": phases, "rounds": 2, "wrk_errors": wrk_errors, "probe_failures": 0, "stream_not_200": 0,
            "answers": 1000, "streams": streams, "cut_streams": cut, "cut_examples": ["status 500"] * cut,
            "changes": 40, "failed_changes": 0, "stream_chars": 300, "text_model": "char_gru" if streams else None,
            "probe_answers": 50, "probe_versions": {"a": 50}, "server_codes": {"classify 200": 950},
            "cycle_load_s": [1.0, 2.0], "cycle_unload_s": [0.5]}
    memory = {"cycles": 50, "load_avg": "1", "drift_mib": {1: drift, 2: -1.0},
              "workers": {1: {"pid": 7, "baseline": 300.0, "end": 300.0 + drift, "max_unloaded": 305.0,
                              "max_loaded": 500.0, "restarted": False}}}
    timing = {m: {"call_s_median": 1.2, "seconds_median": 1.0, "call_s": [1.2], "load_avg": "1",
                  "probes_not_200": 0} for m in ("lenet5", "vgg_fc7")}
    info = {"date": "today", "cpu": "cpu", "os": "os", "versions": "v", "command": "python -m loadtest.lifecycle",
            "seconds": 600.0, "served": "lenet5 = lifecycle-digits:a", "load_start": "1", "load_end": "2"}
    out = {"info": info, "load": load, "memory": memory, "timing": timing,
           "log": {"errors": 0, "freed": 3, "examples": []}}
    out["judged"] = lifecycle.judge(out)
    return out


def verdicts(res: dict) -> dict[str, bool | None]:
    return {row["id"]: row["met"] for row in res["judged"]}


def test_targets_met_and_the_p99_ratio_uses_the_medians_of_the_rounds():
    res = result({"quiet": [10.0, 20.0, 1000.0], "switch": [25.0, 28.0, 30.0], "cycle": [40.0, 40.0, 40.0]})
    judged = verdicts(res)
    assert judged == {"1a": True, "1b": True, "1c": True, "1d": True, "2": True, "3": None, "-": None}
    assert "1.40 (28.0 ms / 20.0 ms" in res["judged"][2]["measured"]  # medians: 28 / 20, not the means


@pytest.mark.parametrize("change, missed", [
    ({"p99s": {"quiet": [10.0, 10.0], "switch": [16.0, 15.1], "cycle": [9.0, 9.0]}}, "1c"),
    ({"wrk_errors": 1}, "1a"),
    ({"cut": 1}, "1b"),
    ({"drift": -10.5}, "2"),
])
def test_each_target_can_be_missed(change, missed):
    p99s = change.pop("p99s", {"quiet": [10.0, 10.0], "switch": [10.0, 10.0], "cycle": [20.0, 20.0]})
    judged = verdicts(result(p99s, **change))
    assert judged[missed] is False
    assert all(v is not False for k, v in judged.items() if k != missed)


def test_no_text_model_leaves_the_stream_target_unjudged():
    assert verdicts(result({"quiet": [1.0, 1.0], "switch": [1.0, 1.0], "cycle": [1.0, 1.0]}, streams=0))["1b"] is None


def test_the_doc_section_is_replaced_between_its_markers_and_keeps_the_targets():
    res = result({"quiet": [10.0, 10.0], "switch": [16.0, 16.0], "cycle": [9.0, 9.0]})
    doc = (REPO_ROOT / "docs" / "lifecycle.md").read_text()
    updated = lifecycle.update_doc(doc, lifecycle.render(res))
    assert updated.split(lifecycle.BEGIN)[0] == doc.split(lifecycle.BEGIN)[0]  # the targets part is untouched
    assert "**MISSED**" in updated and "| 1c |" in updated and updated.count(lifecycle.BEGIN) == 1
    assert lifecycle.update_doc(updated, "again").split(lifecycle.BEGIN)[1].startswith("\nagain\n")


def test_the_docs_targets_are_the_scenarios():
    doc = (REPO_ROOT / "docs" / "lifecycle.md").read_text().split(lifecycle.BEGIN)[0]
    assert f"<= {lifecycle.TARGETS['p99_ratio']:g} x p99" in doc
    assert f"within {lifecycle.TARGETS['rss_mib']:g} MiB" in doc
    assert "| 1a | 0 non-2xx" in doc and "| 1b | 0 cut streams" in doc


def test_rss_counts_as_settled_only_once_it_holds_still():
    assert not lifecycle.steady([270.0, 171.0, 171.2])  # too few samples
    assert not lifecycle.steady([270.0, 270.1, 171.0, 171.2])  # still falling within the window
    assert lifecycle.steady([270.0, 171.0, 171.2, 171.9, 171.1])


def test_a_wall_clock_jump_is_named_next_to_the_phases_errors():
    assert lifecycle.jumped({"clock_jump_s": 21.3}) == " (wall clock jumped +21 s)"
    assert lifecycle.jumped({"clock_jump_s": 0.2}) == lifecycle.jumped({}) == ""


def stress(changes: list[tuple[int | str, float]], wrk_errors: int = 0, cut: int = 0,
           finals: dict[int, int] | None = None) -> dict:
    return {"changes": [{"what": "load C", "status": s, "call_s": t} for s, t in changes], "wrk_errors": wrk_errors,
            "probe_failures": 0, "stream_not_200": 0, "answers": 5000, "streams": 12, "cut_streams": cut,
            "final_generation": 7, "final_reports": {1: 7, 2: 7} if finals is None else finals}


def test_management_under_stress_targets_met_with_409s_to_race_losers():
    rows = {r["id"]: r for r in lifecycle.judge_stress(stress([(200, 0.4), (409, 0.01), (200, 4.9)]))}
    assert {i: r["met"] for i, r in rows.items()} == {"4a": True, "4b": True, "4c": True, "4d": True}
    assert "2 2xx, 1 409, 0 other, 0 slower; slowest 4.90 s" in rows["4a"]["measured"]


@pytest.mark.parametrize("res, missed", [
    (stress([(200, 0.4), (504, 5.0)]), "4a"),  # a timed-out change
    (stress([(200, 5.5)]), "4a"),  # answered, but too late
    (stress([(200, 0.4), ("ReadTimeout", 300.0)]), "4a"),  # a hang
    (stress([(200, 0.4)], wrk_errors=1), "4b"),
    (stress([(200, 0.4)], cut=1), "4c"),
    (stress([(200, 0.4)], finals={1: 7, 2: 6}), "4d"),  # a worker's report behind the last generation
    (stress([(200, 0.4)], finals={}), "4d"),
])
def test_each_management_under_stress_target_can_be_missed(res, missed):
    judged = {r["id"]: r["met"] for r in lifecycle.judge_stress(res)}
    assert judged[missed] is False and all(v for k, v in judged.items() if k != missed)


def test_a_stress_only_run_is_judged_and_rendered_alone():
    res = result({"quiet": [1.0, 1.0], "switch": [1.0, 1.0], "cycle": [1.0, 1.0]})
    stress_only = {"info": res["info"], "log": res["log"], "stress": stress([(200, 0.4)]) | {
        "clients": 2, "per_client": 1, "seconds": 3.0, "connections": 32, "stream_clients": 4, "load_avg": "1",
        "requests": 900, "server_codes": {"classify 200": 900}}}
    stress_only["judged"] = lifecycle.judge(stress_only)
    assert [r["id"] for r in stress_only["judged"]] == ["4a", "4b", "4c", "4d"]
    text = lifecycle.render(stress_only)
    assert "Part 4, management under stress: 2 clients" in text and "load {'200': 1}" in text
    both = res | {"stress": stress_only["stress"]}
    assert [r["id"] for r in lifecycle.judge(both)][-5:] == ["-", "4a", "4b", "4c", "4d"]


def test_the_change_clients_never_undo_each_others_next_change():
    versions = {"A": "aaaaaaaa", "B": "bbbbbbbb", "C": "cccccccc"}
    loads, switches = lifecycle.change_script(0, versions), lifecycle.change_script(1, versions)
    assert [w for w, *_ in loads] == ["load C", "reload", "unload C"]
    # the traffic client names A and B only: unloading C is never refused for the traffic it gets
    assert all("cccccccc" not in json.dumps(body) for _, _, body in switches)
    assert {w.split(" ")[0] for w, *_ in switches} == {"default", "split", "reload"}
