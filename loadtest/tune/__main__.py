"""``python -m loadtest.tune MODEL [--p95-ms N]`` (``make tune MODEL=name P95_MS=N``): loadtest/tune/__init__.py
says what it does; docs/your-model.md ("Make it fast") how to use it.

Exit status: 0 a configuration was chosen (and written or applied); 2 bad input (a model not in the store, an
unusable option); 3 no configuration meets the budget (the closest is shown, nothing written); 130
interrupted (nothing written; the measurements so far are in ``--out``).
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import os
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

from loadtest.bench.common import write_atomic
from loadtest.tune import report
from loadtest.tune.sweep import (
    IMAGE_ROUTES,
    Clock,
    NotInStore,
    Point,
    Result,
    Server,
    Target,
    adaptive_points,
    apply_entry,
    batching_points,
    execution_points,
    find_target,
    measure,
    pick,
    rank,
    score,
    serving,
)
from service.settings import SettingsError

TOP = 2  # execution points whose batching is swept, and best points tried in each other variant
SERVER_START_GUESS_S = 30.0


def log(message: str) -> None:
    print(f"[tune {time.strftime('%H:%M:%S')}] {message}", flush=True)


def int_list(text: str) -> list[int]:
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or min(values) < 0:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers >= 0, got {text!r}")
    return values


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    cores = int(os.environ.get("NNSERVE_CPUS") or 0) or os.cpu_count() or 1
    parser = argparse.ArgumentParser(prog="python -m loadtest.tune", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", help="a model in the BentoML store (its <model>-int8 entry is tried too)")
    parser.add_argument("--p95-ms", type=float, default=None,
                        help="the p95 latency budget at every concurrency (default: none, the best goodput wins)")
    parser.add_argument("--concurrency", type=int_list, default=[1, 4, 32], help="closed-loop clients (1,4,32)")
    parser.add_argument("--seconds", type=float, default=3.0, help="wrk run per concurrency and point (3)")
    parser.add_argument("--max-minutes", type=float, default=10.0,
                        help="the sweep stops starting points past this (10); server starts included")
    parser.add_argument("--cores", type=int, default=cores, help=f"cores to fit threads into ({cores})")
    parser.add_argument("--workers", type=int_list, help="worker counts to try (default: 1, 2, ... within --cores)")
    parser.add_argument("--instances", type=int_list, help="instance counts to try (default 1,2 within --cores)")
    parser.add_argument("--threads", type=int_list, help="intra-op thread counts to try (default: within --cores)")
    parser.add_argument("--batch-sizes", type=int_list, default=[1, 8, 32], help="max_batch_size values (1,8,32)")
    parser.add_argument("--delays-us", type=int_list, default=[0, 2000], help="max_queue_delay values, us (0,2000)")
    parser.add_argument("--no-adaptive", action="store_true",
                        help="leave out the adaptive policy (parameters.lone_request_thread_count)")
    parser.add_argument("--route", choices=sorted(IMAGE_ROUTES),
                        help="an image model's route to load: classify (default where it has class scores) or "
                             "features")
    parser.add_argument("--image", type=Path, help="the image to send (image models; default: noise at input size)")
    parser.add_argument("--out", type=Path, help="table, plot and measurements (default .nnserve/tune/<model>)")
    parser.add_argument("--models-config", type=Path, default=Path("models.yaml"),
                        help="where the chosen entry is written (models.yaml)")
    parser.add_argument("--apply", metavar="URL", help="send the chosen entry to this server's management API "
                                                       "instead of writing the models config")
    parser.add_argument("--token-file", type=Path,
                        default=Path(os.environ.get("NNSERVE_MANAGEMENT_TOKEN_FILE", ".nnserve/management-token")),
                        help="the management token for --apply (NNSERVE_MANAGEMENT_TOKEN_FILE)")
    args = parser.parse_args(argv)
    if args.p95_ms is not None and args.p95_ms <= 0:
        parser.error(f"--p95-ms must be > 0, got {args.p95_ms:g}")
    if min(args.concurrency) < 1 or args.seconds <= 0 or args.cores < 1:
        parser.error("--concurrency values, --seconds and --cores must be > 0")
    if min(args.batch_sizes) < 1:
        parser.error("--batch-sizes must be >= 1")
    args.out = args.out or Path(".nnserve") / "tune" / args.model
    return args


def stage_execution(args: argparse.Namespace) -> list[Point]:
    if not (args.workers or args.instances or args.threads):
        return execution_points(args.cores)
    defaults = execution_points(args.cores)
    workers = args.workers or sorted({p.workers for p in defaults})
    instances = args.instances or sorted({p.instances for p in defaults})
    threads = args.threads or sorted({p.threads for p in defaults})
    return [Point(w, i, t) for w, i, t in itertools.product(workers, instances, threads) if min(w, i, t) >= 1]


def stage_batching(base: Point, args: argparse.Namespace) -> list[Point]:
    if (tuple(args.batch_sizes), tuple(args.delays_us)) == ((1, 8, 32), (0, 2000)):
        return batching_points(base)
    points = [Point(base.workers, base.instances, base.threads, size, delay, base.variant)
              for size in args.batch_sizes for delay in args.delays_us if not (size == 1 and delay)]
    return [p for p in points if p != base]


class Sweep:
    """Measures points one at a time on one server (restarted when the worker count changes)."""

    def __init__(self, args: argparse.Namespace, target: Target, planned: Callable[[], int]) -> None:
        self.args, self.target, self.planned = args, target, planned
        self.results: list[Result] = []
        self.clock = Clock(args.max_minutes * 60)
        self.skipped = 0
        self.known: dict[str, int] = {}  # stage -> its points to measure
        self._server: Server | None = None
        self._stack = contextlib.ExitStack()

    def close(self) -> None:
        self._stack.close()

    def server(self, workers: int) -> Server:
        if self._server is None or self._server.workers != workers:
            self._stack.close()
            log(f"starting a server with {workers} worker(s)")
            self._server = self._stack.enter_context(serving(self.target.model, workers, self.args.out / "work",
                                                                 self.args.cores))
        return self._server

    def run(self, points: list[Point], stage: str) -> None:
        done = {r.point for r in self.results}
        current = self._server.workers if self._server is not None else 0  # its points first: a restart less
        todo = sorted(dict.fromkeys(p for p in points if p not in done),
                      key=lambda p: (p.workers != current, p.workers))
        self.known[stage] = len(todo)
        per_point = len(self.args.concurrency) * self.args.seconds + 1 + 5  # runs, warm-up, the change
        for point in todo:
            restart = SERVER_START_GUESS_S if self._server is None or self._server.workers != point.workers else 0
            if not self.clock.fits(per_point, restart):
                self.skipped += 1
                continue
            started = time.monotonic()
            result = measure(self.server(point.workers), self.target, point, self.args.concurrency, self.args.seconds)
            self.clock.point_s.append(time.monotonic() - started)
            self.results.append(result)
            runs = "; ".join(f"c={r.concurrency} {r.goodput:.1f}/s p50 {r.p50_ms:.1f} p95 {r.p95_ms:.1f} ms"
                             + (f" {r.errors} errors" if r.errors else "") for r in result.runs)
            log(f"{len(self.results)}/{self.planned()} [{stage}] {point.describe()}: {result.failed or runs} "
                f"({self.clock.elapsed() / 60:.1f} of {self.args.max_minutes:g} min)")

    def best(self, n: int, variant: str | None = None, where: Callable[[Point], bool] | None = None) -> list[Point]:
        ranked = [r for r in rank(self.results, self.args.p95_ms) if not r.failed]
        return [r.point for r in ranked
                if (variant is None or r.point.variant == variant) and (where is None or where(r.point))][:n]


def tune(args: argparse.Namespace) -> int:
    try:
        target = find_target(args.model, args.out / "work", args.image, args.route)
    except (NotInStore, ValueError) as e:
        log(str(e))
        return 2
    budget = f"p95 <= {args.p95_ms:g} ms" if args.p95_ms else "no p95 budget (--p95-ms): the best goodput wins"
    log(f"tuning {args.model} ({target.kind}) on {target.endpoint} at concurrency {args.concurrency}, "
        f"{args.seconds:g} s per run, {budget}; variants {', '.join(target.variants)}")
    for variant, why in target.excluded.items():
        log(f"variant {variant} not tried: {why}")
    for variant, gate in target.gates.items():
        log(f"variant {variant} tried: {gate}")
    stage1 = stage_execution(args)
    batching_per = max(1, len(stage_batching(stage1[0], args)))
    extra_variants = [v for v in target.variants if v != "fp32"]

    # points per stage, for the progress count: estimates until a stage knows its own
    estimates = {"execution": len(stage1), "batching": min(TOP, len(stage1)) * batching_per,
                 "adaptive": 0 if args.no_adaptive else TOP, **{v: TOP for v in extra_variants}}

    def planned() -> int:
        return sum(sweep.known.get(stage, n) for stage, n in estimates.items())

    sweep = Sweep(args, target, planned)
    interrupted = False
    try:
        sweep.run(stage1, "execution")
        sweep.run([p for base in sweep.best(TOP) for p in stage_batching(base, args)], "batching")
        if not args.no_adaptive:
            # The best points where a worker has more than one core: the policy needs them (a lone request on
            # all of them). The best overall may have one worker per core (EfficientNet-B0 here, 2 x 1 x 1).
            spare = sweep.best(TOP, where=lambda p: args.cores // p.workers > 1)
            sweep.run(adaptive_points(spare, args.cores), "adaptive")
        for variant in extra_variants:
            sweep.run([replace(p, variant=variant) for p in sweep.best(TOP, "fp32")], variant)
    except KeyboardInterrupt:
        interrupted = True
    finally:
        sweep.close()
    return finish(args, target, sweep, interrupted)


def finish(args: argparse.Namespace, target: Target, sweep: Sweep, interrupted: bool) -> int:
    ranked = rank(sweep.results, args.p95_ms)
    chosen = None if interrupted else pick(ranked, args.p95_ms)
    best_fp32 = None if interrupted else pick(ranked, args.p95_ms, "fp32")
    args.out.mkdir(parents=True, exist_ok=True)
    summary = {"model": args.model, "p95_budget_ms": args.p95_ms, "concurrency": args.concurrency,
               "seconds": args.seconds, "cores": args.cores, "interrupted": interrupted,
               "points_left_out_at_time_limit": sweep.skipped, "excluded_variants": target.excluded,
               "variant_gates": target.gates,
               "minutes": round(sweep.clock.elapsed() / 60, 2),
               "endpoint": target.endpoint, "chosen": chosen.to_json() if chosen else None,
               "best_fp32": best_fp32.to_json() if best_fp32 else None}
    write_atomic(args.out / "results.json", report.results_json(ranked, summary))
    text = report.table(ranked, args.p95_ms, chosen)
    write_atomic(args.out / "table.md", text + "\n")
    if ranked:
        report.plot(ranked, args.p95_ms, chosen, args.out / "pareto.png",
                    f"{args.model}: throughput vs p95 ({args.cores} cores)")
    print(text, flush=True)
    log(f"{len(ranked)} configurations measured in {sweep.clock.elapsed() / 60:.1f} min; table, plot "
        f"(pareto.png) and measurements in {args.out}")
    if sweep.skipped:
        log(f"{sweep.skipped} planned configurations left out: --max-minutes {args.max_minutes:g} reached")
    if interrupted:
        log(f"interrupted: {args.models_config} untouched, nothing applied")
        return 130
    if chosen is None:
        measured = [r for r in ranked if not r.failed]
        if not measured:
            log("no configuration could be measured (see the server logs in the work folder)")
            return 3
        closest = min(measured, key=lambda r: (score(r, args.p95_ms)[2], -score(r, args.p95_ms)[1]))
        worst = max(measured_run.p95_ms for measured_run in closest.runs)
        log(f"no configuration meets p95 <= {args.p95_ms:g} ms at every concurrency without errors; the closest: "
            f"{closest.point.describe()} (worst p95 {worst:.1f} ms). Nothing written: raise --p95-ms, lower the "
            "highest --concurrency, or serve on more cores")
        return 3
    point = chosen.point
    entry = report.entry_for(point, args.model)
    log(f"chosen: {point.describe()} ({score(chosen, args.p95_ms)[1]:.1f} 2xx/s geometric mean)")
    if args.apply:
        return apply(args, entry, point)
    budget = f"p95 <= {args.p95_ms:g} ms" if args.p95_ms else "no p95 budget"
    comment = (f"tuned {time.strftime('%Y-%m-%d')} (python -m loadtest.tune): {point.workers} worker(s) "
               f"(NNSERVE_WORKERS), {budget} "
               f"at {','.join(map(str, args.concurrency))} clients")
    try:
        report.write_entry(args.models_config, args.model, entry, comment)
    except (SettingsError, OSError) as e:
        log(f"the entry was not written: {e}")
        return 2
    write_atomic(args.out / "server.env", f"NNSERVE_WORKERS={point.workers}\n")
    log(f"wrote {args.model}'s entry into {args.models_config}; serve it with NNSERVE_WORKERS={point.workers} "
        f"(a server setting: {args.out / 'server.env'})")
    return 0


def apply(args: argparse.Namespace, entry: dict, point: Point) -> int:
    """Send the chosen entry through the management API of the server at ``--apply``."""
    import requests

    try:
        token = args.token_file.read_text().strip()
    except OSError as e:
        log(f"cannot read the management token {args.token_file}: {e.strerror}")
        return 2
    url = args.apply.rstrip("/")
    try:
        answer = apply_entry(url, token, args.model, entry)
        config = requests.get(f"{url}/v2/models/{args.model}/config", timeout=30,
                              headers={"authorization": f"Bearer {token}"}).json()
    except (RuntimeError, requests.RequestException) as e:
        log(f"{url} did not take the entry: {e}")
        return 2
    log(f"{url} serves it: generation {answer['generation']} on {answer['workers']} worker(s)")
    for warning in answer.get("warnings", []):
        log(f"server warning: {warning}")
    workers = config.get("parameters", {}).get("workers", {}).get("string_value")
    if workers and int(workers) != point.workers:
        log(f"note: that server runs {workers} worker(s); this configuration was measured with {point.workers} "
            f"(NNSERVE_WORKERS is a server setting: restart it with NNSERVE_WORKERS={point.workers})")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)

    def stop(signum: int, frame: object) -> None:  # SIGTERM ends the sweep as Ctrl-C does: servers stopped
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)  # also where a shell started it with SIGINT ignored (a background job)
    return tune(args)


if __name__ == "__main__":
    sys.exit(main())
