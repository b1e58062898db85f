"""``python -m loadtest.bench``: run every part (see the package docstring) and write docs/bench.md."""

from __future__ import annotations

import argparse
import contextlib
import os
import shlex
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

from loadtest.bench import __doc__ as PACKAGE_DOC
from loadtest.bench.common import REPO_ROOT, load_average, log, machine, write_atomic
from loadtest.bench.report import Results, report

PARTS = ("in-process", "nnserve", "stacks", "generate", "triton", "recovery", "overload", "budgets", "baselines",
         "user-model", "real-size")


def int_list(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m loadtest.bench", description=PACKAGE_DOC,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=REPO_ROOT / "docs", help="bench.md goes here, plots in OUT/img")
    p.add_argument("--runs", type=int, default=300, help="timed calls per in-process case (median reported)")
    p.add_argument("--max-seconds", type=float, default=4.0, help="time limit per in-process case")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1,
                   help="intra-op threads of the multi-threaded in-process rows (default: all cores)")
    p.add_argument("--duration", type=int, default=5, help="seconds per wrk row of the rounds and per /generate "
                   "level")
    p.add_argument("--rounds", type=int, default=5, help="interleaved rounds of the serving-stack rows (ratio "
                   "targets judged on the median of the per-round ratios, min-max reported)")
    p.add_argument("--sweep-duration", type=float, default=3, help="seconds per row of each peer configuration "
                   "in the sweep that picks its best one")
    p.add_argument("--connections", type=int_list, default=[1, 32],
                   help="wrk concurrency levels (closed loop), comma-separated; targets use the lowest and highest")
    p.add_argument("--baselines", type=lambda s: [b for b in s.split(",") if b],
                   default=["bentoml", "litserve", "fastapi", "mlserver", "triton"],
                   help="peer servers to sweep and measure, comma-separated (loadtest/baselines); MLServer runs "
                        "from .venv-mlserver and Triton from .venv-triton, which the bench creates when missing")
    p.add_argument("--streams", type=int_list, default=[1, 16], help="concurrent /generate streams, comma-separated")
    p.add_argument("--generate-chars", type=int, default=200, help="characters per /generate request")
    p.add_argument("--step-loop-steps", type=int, default=2000,
                   help="decode steps per step-loop measurement (the best of 3 is reported)")
    p.add_argument("--skip-step-loop", action="store_true",
                   help="leave out the bare step-loop limit (service.generation.measure_step_loop)")
    p.add_argument("--overload-clients", type=int, default=300, help="concurrent clients of the overload run")
    p.add_argument("--overload-seconds", type=float, default=10, help="seconds of the overload run")
    p.add_argument("--large-items", type=int, default=10_000, help="items of the large KServe v2 request")
    p.add_argument("--budget-duration", type=int, default=30, help="seconds of the load test with budgets")
    p.add_argument("--server-env", action="append", default=[], metavar="KEY=VALUE",
                   help="environment for the nnserve server (e.g. NNSERVE_MAX_QUEUE_DELAY_MS=5), repeatable; "
                        "passed through as is")
    p.add_argument("--user-model-tag", metavar="TAG",
                   help="user-model part: serve this store entry (one an earlier run made) instead of making one "
                        "with models.finetune + export (minutes on a small CPU)")
    p.add_argument("--user-model-rounds", type=int, default=5,
                   help="user-model part: rounds of wrk rows, nnserve's and FastAPI's alternating (medians judged)")
    p.add_argument("--triton-rounds", type=int, default=3,
                   help="triton part: rounds of REST and gRPC rows, their order alternating (medians judged)")
    p.add_argument("--triton-classify-clients", type=int, default=32,
                   help="triton part: concurrent clients of the image-bytes (gRPC) and /classify rows")
    p.add_argument("--triton-client-processes", type=int, default=4,
                   help="triton part: worker processes the Python clients are spread over (one client per thread)")
    p.add_argument("--previous", metavar="REF",
                   help="part 2: also serve nnserve's rows with the code of this git commit (a worktree of it, on the "
                        "same model store and settings): CPU per request and goodput judged against it in the same run")
    p.add_argument("--real-size-rounds", type=int, default=5,
                   help="real-size part: interleaved rounds of nnserve and every peer's best configuration")
    p.add_argument("--real-size-connections", type=int_list, default=[1, 4, 32],
                   help="real-size part: wrk concurrency levels, comma-separated")
    p.add_argument("--real-size-peers", type=lambda s: [b for b in s.split(",") if b],
                   default=["fastapi", "litserve", "bentoml", "triton"],
                   help="real-size part: peers to sweep and measure on vgg_fc7 and EfficientNet-B0")
    p.add_argument("--skip", choices=PARTS, action="append", default=[],
                   help="leave a part out (repeatable); nnserve = every part that needs the nnserve server")
    return p.parse_args(argv)


def server_env(args: argparse.Namespace) -> dict[str, str]:
    pairs = [item.split("=", 1) for item in args.server_env]
    if any(len(pair) != 2 for pair in pairs):
        raise SystemExit(f"--server-env takes KEY=VALUE, got {args.server_env}")
    return dict(pairs)


def server_threads(env: dict[str, str]) -> int:
    """ORT threads per session of the nnserve server the bench started (its settings: cores / workers)."""
    from service.settings import Settings

    return Settings.from_env({**os.environ, **env}).threads_per_session()


def batch_time_ms(batch: int, threads: int) -> float:
    """Median time of one lenet5 ORT call at ``batch`` items, as the server runs it (in process, ``threads``
    = the server's threads per session, spinning off): the "batch time" of the overload target."""
    import numpy as np

    from loadtest.baselines.common import StoreModel
    from loadtest.bench.inprocess import time_calls

    model = StoreModel.load("lenet5", threads)
    x = np.zeros((batch, *model.input_shape), dtype=np.float32)
    return float(np.median(time_calls(lambda: model.run(x), runs=50, max_seconds=2.0)))


def run_nnserve(args: argparse.Namespace, env: dict[str, str], workdir: Path, r: Results) -> None:
    """Every part that needs the nnserve server, on one server."""
    from harness.server import running_server
    from loadtest.bench import budgets, generate, overload, recovery, server_info, stacks, wrk

    log("starting nnserve (bentoml serve; loads and warms up every model)")
    with running_server(workdir / "nnserve.log", env) as server:
        url = server.http_url
        log(f"nnserve ready at {url}")
        r.models, tags = server_info.served_models(url)
        r.settings = server_info.server_settings(url, env)
        r.memory["ready"] = server_info.server_memory(server)
        files, x_one, input_name = lenet5_inputs(workdir, tags.get("lenet5", "lenet5:latest"))
        if "generate" not in args.skip:
            r.generate = generate.bench_streams(url, args.streams, args.duration, args.generate_chars, workdir)
        if "triton" not in args.skip:
            from loadtest.bench.triton import bench_triton

            r.triton = bench_triton(url, server.grpc_url, files.png, files.classify_args(), args.streams,
                                    args.duration, args.generate_chars, args.triton_rounds,
                                    args.triton_classify_clients, args.triton_client_processes)
        if "recovery" not in args.skip:
            log(f"large request ({args.large_items} items), then single-item requests")
            r.recovery = recovery.run_recovery(url, files.v2_json.read_bytes(), x_one, input_name,
                                               items=args.large_items)
        if "overload" not in args.skip:
            log(f"overload: {args.overload_clients} clients on /classify for {args.overload_seconds:g} s")
            body, content_type = wrk.multipart_body(files.png.read_bytes())
            r.overload = overload.run_overload(url, stacks.CLASSIFY, body, content_type, args.overload_clients,
                                               args.overload_seconds)
        if "budgets" not in args.skip:
            r.budgets = budgets.bench_budgets(url, args.budget_duration, args.generate_chars, workdir)
        r.memory["after load"] = server_info.server_memory(server)
    log("nnserve stopped")
    r.labels[stacks.NNSERVE], r.tags = "nnserve", tags


def lenet5_inputs(workdir: Path, tag: str):
    """The request files every server gets (RequestFiles), and for the large request one held-out digit
    preprocessed for lenet5 [1, C, H, W] with the model's input name; all from the store entry ``tag``."""
    import bentoml

    from harness.data import held_out_digits
    from loadtest.bench.wrk import request_files
    from models.preprocess import preprocess_uint8

    meta: dict[str, Any] = bentoml.models.get(tag).info.metadata
    input_name = meta["inputs"][0]["name"]
    x_one = preprocess_uint8(held_out_digits()[0][:1], meta["preprocessing"])
    return request_files(workdir, meta["preprocessing"], input_name), x_one, input_name


def run_compare(args: argparse.Namespace, env: dict[str, str], workdir: Path, r: Results) -> None:
    """Part 2: the sweep of the peers, then nnserve, the bare stack and each peer's best configurations in
    interleaved rounds (loadtest/bench/compare.py); then the CPU breakdown of a request, in process."""
    import bentoml

    from loadtest.baselines.launch import BASELINES
    from loadtest.bench import compare, stacks
    from loadtest.bench.profile import request_breakdown

    # Pin the exact store entries nnserve serves (its settings, else the latest), so every server runs the
    # same graph.
    tags = r.tags or {name: str(bentoml.models.get(f"{name}:latest").tag) for name in ("lenet5", "vgg_fc7")}
    r.tags = r.tags or tags
    pins = {"BENTOML_HOME": os.environ.get("BENTOML_HOME", str(Path.home() / "bentoml")),
            **{f"BASELINE_{name.upper()}_TAG": tags[name] for name in ("lenet5", "vgg_fc7")}}
    files, _, _ = lenet5_inputs(workdir, tags["lenet5"])
    peers = [] if "baselines" in args.skip else args.baselines
    with previous_checkout(args.previous, workdir) as previous:
        r.comparison = compare.compare(peers, files, args.connections, args.duration, args.sweep_duration,
                                       args.rounds, workdir, pins, env, previous=previous)
    r.runs += r.comparison.runs
    r.answers.update(r.comparison.answers)
    r.labels.update({name: label for name, (label, _, _) in BASELINES.items()})
    r.labels[stacks.NNSERVE] = "nnserve"
    if args.previous:
        r.labels[stacks.PREVIOUS] = f"nnserve {args.previous}"
    log("CPU breakdown of a /classify request (in process, the server's functions)")
    r.breakdown = request_breakdown(tags["lenet5"], files.png.read_bytes())
    log("  " + ", ".join(f"{k} {v:.1f} us" for k, v in r.breakdown.stages_us.items())
        + f"; training's preprocessing path {r.breakdown.reference_preprocess_us:.1f} us")


@contextlib.contextmanager
def previous_checkout(ref: str | None, workdir: Path) -> Iterator[Path | None]:
    """A git worktree of ``ref`` (None: no previous row), removed afterwards."""
    if not ref:
        yield None
        return
    path = workdir / "previous"
    done = subprocess.run(["git", "-C", str(REPO_ROOT), "worktree", "add", "--detach", str(path), ref],
                          capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"--previous {ref}: git worktree add failed: {done.stderr.strip()[:500]}")
    log(f"previous release: {ref} checked out in {path}")
    try:
        yield path
    finally:
        subprocess.run(["git", "-C", str(REPO_ROOT), "worktree", "remove", "--force", str(path)], capture_output=True)


def run_real_size(args: argparse.Namespace, env: dict[str, str], workdir: Path, r: Results) -> None:
    """Part 10: vgg_fc7 and EfficientNet-B0 (the user-model part's store entry, ``--user-model-tag``, or one
    made now) beside every peer at its best (loadtest/bench/realsize.py)."""
    from loadtest.baselines.launch import BASELINES
    from loadtest.bench.realsize import NNSERVE_INT8, bench_real_size, real_size_tags
    from loadtest.bench.stacks import NNSERVE

    user_tag = r.user_model.tag if r.user_model else args.user_model_tag
    if not user_tag:
        from loadtest.bench.user_model import make_store_entry

        user_tag, _ = make_store_entry(workdir)
    log("part 10: real-size models (vgg_fc7, EfficientNet-B0), every peer at its best, "
        f"{args.real_size_rounds} interleaved rounds")
    r.real_size = bench_real_size(args, env, workdir, real_size_tags(r.tags, user_tag))
    r.labels.update({name: label for name, (label, _, _) in BASELINES.items()})
    r.labels[NNSERVE] = "nnserve"
    r.labels[NNSERVE_INT8] = "nnserve INT8 (gated)"


def real_size_tuner_targets(result: Any, high: int, labels: dict[str, str]) -> list:
    """The INT8 row and the tuner's picks rerun (targets.int8_target, targets.rerun_targets) of one model."""
    from loadtest.bench import targets
    from loadtest.bench.realsize import NNSERVE_INT8
    from loadtest.bench.stacks import NNSERVE

    tuned, runs = result.tuned, result.comparison.runs
    if tuned is None:
        return []
    int8 = tuned.int8_pick()
    has_int8 = "int8" in tuned.summary.get("variant_gates", {})
    server = NNSERVE_INT8 if int8 else NNSERVE if has_int8 and tuned.best_fp32 else None
    found = [targets.int8_target(runs, result.model, result.endpoint, high, server, tuned.int8_note(), labels)]
    for name, pick in ((NNSERVE, tuned.best_fp32), (NNSERVE_INT8, int8)):
        if pick:
            found += targets.rerun_targets(runs, result.model, result.endpoint, name, tuned.measured(pick))
    return found


def main(argv: list[str] | None = None) -> int:
    from loadtest.bench import generate, inprocess, targets
    from loadtest.bench.plots import plot
    from loadtest.bench.wrk import wrk_binary

    args = parse_args(argv)
    env = server_env(args)
    command = shlex.join(["python", "-m", "loadtest.bench", *(sys.argv[1:] if argv is None else argv)])
    started = time.perf_counter()
    r = Results(info={"command": command, "date": datetime.now().astimezone().isoformat(timespec="seconds"),
                      "load_start": load_average(), **machine()})
    log(f"{command}: load average {r.info['load_start']}; output to {args.out}")
    if not {"nnserve", "stacks"} & set(args.skip) or not {"user-model", "real-size"} <= set(args.skip):
        wrk_binary()  # fail now, not after minutes of other parts
    with tempfile.TemporaryDirectory(prefix="nnserve-bench-") as tmp:
        workdir = Path(tmp)
        if "in-process" not in args.skip:
            log("part 1: PyTorch eager vs ONNX Runtime, in process")
            r.cases, r.case_notes = inprocess.bench_in_process(args, workdir)
        if "generate" not in args.skip and not args.skip_step_loop:
            log("generation step-loop limit (in process, no server)")
            r.step_limits = generate.bench_step_loop(sorted(set(args.streams)), args.step_loop_steps)
        elif args.skip_step_loop:
            r.step_note = "Step-loop limit not measured this run (`--skip-step-loop`)."
        if "nnserve" not in args.skip:
            run_nnserve(args, env, workdir, r)
        if not {"nnserve", "stacks"} & set(args.skip):
            log(f"part 2: serving stacks, {args.rounds} interleaved rounds")
            run_compare(args, env, workdir, r)
        if "user-model" not in args.skip:
            from loadtest.bench.user_model import bench_user_model

            log("user model: EfficientNet-B0 224x224 on /classify, nnserve vs FastAPI + ORT")
            r.user_model = bench_user_model(args, env, workdir)
        if "real-size" not in args.skip:
            run_real_size(args, env, workdir, r)
    batch_ms, delay = None, env.get("NNSERVE_MAX_QUEUE_DELAY_MS") or find_setting(r.settings, "max_queue_delay")
    if r.overload:
        max_batch = int(env.get("NNSERVE_MAX_BATCH_SIZE") or find_setting(r.settings, "max_batch_size") or 32)
        threads = server_threads(env)
        batch_ms = batch_time_ms(max_batch, threads)
        r.target_notes.append(f"batch time in the overload bound: lenet5 ORT at batch {max_batch} "
                              f"({threads} thread(s) per session as the server runs it, in process), median "
                              f"{batch_ms:.2f} ms; max_queue_delay "
                              f"{f'{delay} ms' if delay is not None else 'unknown'}")
    if r.overload:
        o = r.overload
        answers_per_s = sum(len(v) for v in o.latencies_ms.values()) / o.seconds
        if answers_per_s:
            # Little's law for a closed loop: whatever the server does, clients / rate is the mean time a
            # request spends between its client and the answer, queued sockets included.
            r.target_notes.append(
                f"overload at the client: {o.clients} closed-loop clients got {answers_per_s:,.0f} answers/s in all, "
                f"so by Little's law a request spent {o.clients / answers_per_s * 1e3:,.0f} ms on average between "
                "its client and its answer, mostly queued in socket buffers before the server read it; the "
                "client's own CPU time shares the same cores")
    levels = sorted(args.connections)
    r.targets = targets.evaluate(r.runs, levels[0], levels[-1], r.generate, r.step_limits, r.overload,
                                 as_float(delay), batch_ms, r.recovery)
    if args.previous:
        r.targets += targets.previous_targets(r.runs, levels[-1], args.previous)
    r.targets.append(targets.user_model_target(r.user_model.runs if r.user_model else [], levels[-1]))
    if r.comparison and "triton" in args.baselines and "baselines" not in args.skip:
        r.targets += targets.triton_peer_targets(r.runs, "lenet5", levels[0], levels[-1])
    for result in r.real_size:
        runs, real_levels = result.comparison.runs, sorted(args.real_size_connections)
        peers = [p for p in args.real_size_peers if p != "triton"]
        r.targets += targets.real_size_targets(runs, result.model, result.endpoint, peers, real_levels, r.labels)
        r.targets += real_size_tuner_targets(result, real_levels[-1], r.labels)
        if "triton" in args.real_size_peers:
            r.targets += targets.triton_peer_targets(runs, result.model, real_levels[0], real_levels[-1])
    if "triton" not in args.skip and "nnserve" not in args.skip:
        r.targets += targets.triton_targets(r.triton, sorted(set(args.streams)))
        r.targets += targets.openai_targets(r.triton, sorted(set(args.streams)))
    r.info.update(load_end=load_average(), seconds=time.perf_counter() - started)
    r.images = plot(r.cases, r.runs, r.labels, r.generate, args.out / "img")
    write_atomic(args.out / "bench.md", report(args, r).encode())
    log(f"wrote {args.out / 'bench.md'} and {', '.join(r.images) or 'no plot'} in {r.info['seconds']:.0f} s")
    for t in r.targets:
        log(f"  {t.verdict:12s} {t.what}: {t.measured} (goal {t.target})")
    return 0


def as_float(value: str | None) -> float | None:
    try:
        return float(value) if value is not None else None
    except ValueError:  # a setting reported in a shape we do not know: the target says "unknown"
        return None


def find_setting(settings: dict[str, str], fragment: str) -> str | None:
    """A setting's value from what the server reported or was passed (keys vary: env names or JSON keys)."""
    import json

    for key, value in settings.items():
        if fragment in key.lower():
            return value
        try:
            nested = json.loads(value)
        except (TypeError, ValueError):
            continue
        if isinstance(nested, dict):
            found = next((v for k, v in nested.items() if fragment in k.lower()), None)
            if found is not None:
                return str(found)
    return None


if __name__ == "__main__":
    try:
        sys.exit(main())
    except RuntimeError as e:  # store entry missing, a server, wrk or locust failed: the message says which
        log(f"FAILED, nothing written: {e}")
        sys.exit(1)
