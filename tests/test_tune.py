"""The tuner (issue 26, item 2) on a tiny model with a very short sweep: the table, the Pareto plot, the
measurements and the models.yaml entry it writes (the file's other entries and comments kept), and its bad
input: a model not in the store, a budget nothing meets, an INT8 variant whose gate failed, an interrupted
sweep. Each run starts real servers; the numbers are not what is checked."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from loadtest.faults import store_copy
from loadtest.tune.report import pareto, write_entry
from service.settings import Settings, SettingsError
from tests.test_execution import register_int8

REPO_ROOT = Path(__file__).resolve().parent.parent
SHORT = ["--workers", "1", "--instances", "1", "--threads", "1", "--concurrency", "1,2", "--seconds", "1"]
MODELS_YAML = """# the user's own comment
models:
  # the other model stays as it is
  other:
    tag: other:latest
    max_batch_size: 4
  tune-digits: {tag: tune-digits, max_batch_size: 2}
"""


@pytest.fixture(scope="module")
def model(tiny_store) -> str:
    store_copy(tiny_store["lenet5"], "tune-digits")
    register_int8(tiny_store["lenet5"], "tune-digits-int8", passed=False)
    return "tune-digits"


def tune(args: list[str], cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    return subprocess.run([sys.executable, "-m", "loadtest.tune", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout)


def test_a_short_sweep_writes_the_table_plot_and_the_chosen_entry(model, tmp_path):
    config = tmp_path / "models.yaml"
    config.write_text(MODELS_YAML)
    out = tmp_path / "out"
    done = tune([model, *SHORT, "--batch-sizes", "1,8", "--delays-us", "0,1000", "--p95-ms", "10000",
                 "--models-config", str(config), "--out", str(out)], tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    # the failed-gate INT8 entry is named and never tried
    assert "variant int8 not tried: tune-digits-int8:" in done.stdout and "gate did not pass" in done.stdout
    # progress: one line per point, counted
    assert "1/6 [execution] workers=1 instances=1 threads=1 max_batch_size=32" in done.stdout, done.stdout
    assert "6/6 [adaptive]" in done.stdout, done.stdout
    results = json.loads((out / "results.json").read_text())
    points = [r["point"] for r in results["results"]]
    assert len(points) == 6 and {p["variant"] for p in points} == {"fp32"}
    fixed = [p for p in points if not p["lone_threads"]]
    assert {(p["max_batch_size"], p["delay_us"]) for p in fixed} == {(32, 0), (1, 0), (8, 0), (8, 1000)}
    # the adaptive policy on the best two points: two 1-thread instances, a lone batch on a 2-thread session
    adaptive = [p for p in points if p["lone_threads"]]
    assert [(p["instances"], p["threads"], p["lone_threads"]) for p in adaptive] == [(2, 1, 2)] * 2
    assert all(len(r["runs"]) == 2 and r["runs"][0]["goodput"] > 0 for r in results["results"])
    chosen = results["chosen"]["point"]
    assert chosen == points[0]  # ranked best first
    table = (out / "table.md").read_text()
    assert table.count("\n") == 2 + 6 and "**chosen**" in table and "c=2 p95 ms" in table
    assert (out / "pareto.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (out / "server.env").read_text() == "NNSERVE_WORKERS=1\n"
    # models.yaml: the tuned entry replaced in place; the other entry and every comment kept; the server reads it
    text = config.read_text()
    assert "# the user's own comment" in text and "# the other model stays as it is" in text
    assert "    max_batch_size: 4" in text and "# tuned " in text
    written = yaml.safe_load(text)["models"][model]
    assert written["max_batch_size"] == chosen["max_batch_size"]
    assert written["instance_group"] == [{"count": chosen["instances"]}] and written["variant"] == "fp32"
    settings = Settings.from_env({"NNSERVE_MODELS_CONFIG": str(config)})
    served = settings.model(model)
    assert (served.max_batch_size, served.instances, served.intra_op_threads, served.lone_request_threads) == (
        chosen["max_batch_size"], chosen["instances"], chosen["threads"], chosen["lone_threads"])
    assert settings.model("other").max_batch_size == 4
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temp file left


def test_a_model_not_in_the_store_is_named_with_what_the_store_holds(model, tmp_path):
    done = tune(["no-such-model", "--models-config", str(tmp_path / "models.yaml")], tmp_path, timeout=60)
    assert done.returncode == 2, done.stdout + done.stderr
    assert "model 'no-such-model' is not in the BentoML model store" in done.stdout and model in done.stdout
    assert not (tmp_path / "models.yaml").exists()


def test_a_budget_nothing_meets_says_so_shows_the_closest_and_writes_nothing(model, tmp_path):
    config = tmp_path / "models.yaml"
    config.write_text(MODELS_YAML)
    done = tune([model, *SHORT, "--batch-sizes", "32", "--delays-us", "0", "--p95-ms", "0.001", "--no-adaptive",
                 "--models-config", str(config), "--out", str(tmp_path / "out")], tmp_path)
    assert done.returncode == 3, done.stdout + done.stderr
    assert "no configuration meets p95 <= 0.001 ms" in done.stdout
    assert "the closest: workers=1 instances=1 threads=1 max_batch_size=32" in done.stdout
    assert config.read_text() == MODELS_YAML
    assert json.loads((tmp_path / "out" / "results.json").read_text())["chosen"] is None


def test_an_interrupted_sweep_leaves_the_models_config_untouched(model, tmp_path):
    config = tmp_path / "models.yaml"
    config.write_text(MODELS_YAML)
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    process = subprocess.Popen([sys.executable, "-m", "loadtest.tune", model, *SHORT, "--seconds", "3",
                                "--models-config", str(config), "--out", str(tmp_path / "out")],
                               cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines = []
    assert process.stdout is not None
    for line in process.stdout:  # interrupt once the first point is being measured
        lines.append(line)
        if "1/" in line and "[execution]" in line:
            break
    time.sleep(2)
    process.send_signal(signal.SIGINT)
    rest, _ = process.communicate(timeout=120)
    output = "".join(lines) + rest
    assert process.returncode == 130, output
    assert "interrupted" in output and "untouched" in output
    assert config.read_text() == MODELS_YAML
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []
    assert json.loads((tmp_path / "out" / "results.json").read_text())["interrupted"] is True
    assert servers_of(tmp_path) == [], "the sweep's server is still running"


def servers_of(folder: Path) -> list[int]:
    """Processes whose NNSERVE_STATE_DIR is under ``folder`` (the tuner's servers and their workers)."""
    import psutil

    found = []
    for process in psutil.process_iter():
        try:
            if str(folder) in process.environ().get("NNSERVE_STATE_DIR", ""):
                found.append(process.pid)
        except (psutil.AccessDenied, psutil.NoSuchProcess, psutil.ZombieProcess):
            continue
    return found


# -- in process -----------------------------------------------------------------------------------------------

def test_the_pareto_front_keeps_only_points_nothing_beats():
    points = [(10.0, 100.0), (5.0, 80.0), (12.0, 90.0), (20.0, 150.0), (5.0, 60.0)]
    assert pareto(points) == [(5.0, 80.0), (10.0, 100.0), (20.0, 150.0)]


def test_an_entry_that_would_not_read_back_is_not_written(tmp_path):
    config = tmp_path / "models.yaml"
    config.write_text(MODELS_YAML)
    with pytest.raises(SettingsError):
        write_entry(config, "tune-digits", {"tag": "tune-digits", "max_batch_size": 0}, "tuned")
    assert config.read_text() == MODELS_YAML
    write_entry(config, "fresh", {"tag": "fresh", "max_batch_size": 8}, "tuned now")  # a new model: appended
    models = yaml.safe_load(config.read_text())["models"]
    assert list(models) == ["other", "tune-digits", "fresh"] and models["fresh"]["max_batch_size"] == 8


def test_apply_sends_the_chosen_entry_through_the_management_api(model, own_server, session_dir, tmp_path):
    import requests

    token = session_dir / "tune-apply-token"
    token.write_text("tune-apply-token-0123456789")
    token.chmod(0o600)
    config = session_dir / "tune-apply-models.yaml"
    config.write_text(json.dumps({"models": {model: {"tag": model}}}))
    env = {"NNSERVE_MANAGEMENT_TOKEN_FILE": str(token), "NNSERVE_MODELS_CONFIG": str(config),
           "NNSERVE_WORKERS": "2", "NNSERVE_STATE_DIR": str(session_dir / "tune-apply-state")}
    with own_server("tune-apply", env) as live:
        done = tune([model, *SHORT, "--instances", "2", "--batch-sizes", "32", "--delays-us", "0", "--no-adaptive",
                     "--apply", live.http_url, "--token-file", str(token), "--out", str(tmp_path / "out"),
                     "--models-config", str(tmp_path / "models.yaml")], tmp_path)
        assert done.returncode == 0, done.stdout + done.stderr
        assert f"{live.http_url} serves it" in done.stdout
        assert "that server runs 2 worker(s); this configuration was measured with 1" in done.stdout
        assert token.read_text() not in done.stdout + done.stderr  # the token is never echoed
        served = requests.get(f"{live.http_url}/v2/models/{model}/config", timeout=30).json()
        assert served["instance_group"][0]["count"] == 2
        assert served["parameters"]["intra_op_thread_count"]["string_value"] == "1"
    assert not (tmp_path / "models.yaml").exists()  # --apply instead of writing the file


def test_the_route_is_the_models_own_and_a_route_it_cannot_serve_is_named(tiny_store, tmp_path):
    from loadtest.tune.sweep import find_target

    features = find_target("vgg_fc7", tmp_path, route="features")
    assert features.endpoint == "/features" and features.body_args[-1] == "format=npy"
    assert find_target("vgg_fc7", tmp_path).endpoint == "/classify"  # it has class scores: /classify first
    with pytest.raises(ValueError, match="char_lstm is a sequence_lm model: it is tuned on KServe v2 /infer"):
        find_target("char_lstm", tmp_path, route="features")


def test_the_best_fp32_pick_is_kept_beside_the_overall_one():
    from loadtest.tune.sweep import Measurement, Point, Result, pick

    def result(variant: str, goodput: float, p95: float) -> Result:
        return Result(Point(1, 1, 2, variant=variant), [Measurement(1, goodput, p95 / 2, p95, 0)])

    results = [result("fp32", 100, 9), result("int8", 300, 8), result("fp32", 150, 30)]
    assert pick(results, None).point.variant == "int8"
    assert pick(results, None, "fp32").runs[0].goodput == 150
    assert pick(results, 10.0, "fp32").runs[0].goodput == 100  # the budget first
    assert pick(results, 1.0) is None


def test_the_adaptive_stage_starts_from_the_best_points_with_spare_cores_per_worker():
    import argparse

    from loadtest.tune.__main__ import Sweep
    from loadtest.tune.sweep import Measurement, Point, Result, adaptive_points

    args = argparse.Namespace(p95_ms=None, max_minutes=1.0, cores=2)
    sweep = Sweep(args, None, lambda: 0)  # best() reads only the results
    for point, goodput in ((Point(2, 1, 1), 140), (Point(2, 1, 1, max_batch_size=8), 138), (Point(1, 1, 2), 120),
                           (Point(1, 2, 1), 100)):
        sweep.results.append(Result(point, [Measurement(1, goodput, 5, 6, 0)]))
    assert sweep.best(1) == [Point(2, 1, 1)]  # one worker per core: no core to lend a lone request
    assert adaptive_points(sweep.best(2), 2) == []
    spare = sweep.best(2, where=lambda p: args.cores // p.workers > 1)
    assert spare == [Point(1, 1, 2), Point(1, 2, 1)]
    assert [(p.instances, p.threads, p.lone_threads) for p in adaptive_points(spare, 2)] == [(2, 1, 2), (2, 1, 2)]
