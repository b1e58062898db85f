"""Part 2: nnserve beside every peer at its best, repeated in interleaved rounds.

1. Sweep: each peer (loadtest/baselines) in every configuration of its grid (``launch.grid``: workers x
   batching off / on with its documented knobs), alone, each of its rows once for ``sweep_s`` seconds. The
   best configuration per row (peer, endpoint, clients) is the one with the most 2xx answers per second
   among those without errors (all of them if every one had errors).
2. Rounds: nnserve (as shipped: its defaults), with ``--previous REF`` the same nnserve rows served by the
   code of REF (a git worktree of that commit, on the same model store and settings), the bare HTTP stack
   (the limit) and each peer's best configurations, each started alone, measured on its rows, stopped;
   ``rounds`` times, in a different order each round (shuffled with the round number as seed). The load
   average is logged before each row. Every round pairs nnserve with each peer measured in it: a ratio
   target is judged on the median of the per-round ratios, their min-max printed (targets.Ratios).

The lenet5 rows (part 2) use each peer's routes in ``BASELINES``; the real-size part (realsize.py) passes
its own ``routes`` per model.

Every row is wrk, closed loop (loadtest/bench/wrk.py), after one checked request per server.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from pathlib import Path

from loadtest.baselines.launch import BASELINES, Config, ensure_mlserver, grid, running_baseline
from loadtest.bench.common import load_average, log
from loadtest.bench.promscrape import batch_histogram, scrape
from loadtest.bench.stacks import (
    BATCHED_MODEL,
    CLASSIFY,
    FEATURES,
    NNSERVE,
    PREVIOUS,
    V2,
    V2_BINARY,
    StackRun,
    check_answer,
    route,
    wrk_args,
)
from loadtest.bench.wrk import RequestFiles, run_wrk

LIMIT = "limit"
NNSERVE_ROUTES = (CLASSIFY, FEATURES, V2, V2_BINARY)


@dataclass(frozen=True)
class Unit:
    """One server start in a round: nnserve or a peer in one configuration, and the rows it is measured on."""

    server: str
    config: Config | None
    rows: tuple[tuple[str, int], ...]
    note: str = ""  # an nnserve unit's configuration in words (default: its defaults)

    def describe(self) -> str:
        if self.config is None:
            return self.note or "defaults (2 workers, max_queue_delay 0)"
        return self.config.describe()


@dataclass(frozen=True)
class Nnserve:
    """One more nnserve server in the rounds (the real-size part's tuned configurations): its environment
    (models config, workers) and its configuration in words; its rows are ``routes[name]``."""

    env: dict[str, str]
    note: str


@dataclass
class Comparison:
    runs: list[StackRun] = field(default_factory=list)  # the rounds' rows
    sweep: list[StackRun] = field(default_factory=list)  # the sweep's rows (one per configuration and row)
    best: dict[tuple[str, str, int], str] = field(default_factory=dict)  # (peer, endpoint, clients) -> config
    answers: dict[str, dict[str, str]] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)  # peer -> why it did not run
    orders: list[list[str]] = field(default_factory=list)  # per round, the servers in the order they ran


def process_cpu_s(pid: int) -> float:
    """User + system CPU seconds of a process and every live descendant (a server's workers)."""
    import psutil

    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return float("nan")
    total = 0.0
    for p in procs:
        try:
            t = p.cpu_times()
            total += t.user + t.system + t.children_user + t.children_system
        except psutil.NoSuchProcess:
            pass
    return total


def measure_rows(server: str, config: str, live, rows, files: RequestFiles, seconds: float, round_no: int,
                 metrics: bool = False, model: str | None = None) -> tuple[list[StackRun], dict[str, str]]:
    """``metrics``: nnserve's batch histograms of ``model`` (default: the endpoint's, BATCHED_MODEL)."""
    url = live.http_url
    answers = {endpoint: check_answer(url, endpoint, files) for endpoint in dict.fromkeys(e for e, _ in rows)}
    runs, last = [], 0
    for endpoint, c in rows:
        if c < last:  # what the previous row's clients left queued drains first (a lone request waits behind it)
            run_wrk(url + route(endpoint), wrk_args(endpoint, files), 1, 1)
        last = c
        load = load_average()
        before = scrape(url) if metrics else {}
        cpu = process_cpu_s(live.process.pid)
        result = run_wrk(url + route(endpoint), wrk_args(endpoint, files), c, seconds)
        cpu = process_cpu_s(live.process.pid) - cpu
        run = StackRun(server, endpoint, result, round_no=round_no, config=config, load=load,
                       cpu_ms_per_request=1e3 * cpu / result.requests if result.requests else float("nan"))
        if metrics:
            hist = batch_histogram(before, scrape(url), model or BATCHED_MODEL[endpoint], "dynamic")
            run.mean_batch, run.batches = hist.mean, hist.describe()
        log(f"  r{round_no} load {load:16s} {server:8s} {endpoint:24s} c={c:<3d} {result.ok_rps:8.1f} 2xx/s  "
            f"p50 {result.p50_ms:7.2f} ms  p95 {result.p95_ms:7.2f}  errors {result.errors}  "
            f"cpu {run.cpu_ms_per_request:.3f} ms/req  [{config}]")
        runs.append(run)
    return runs, answers


Routes = dict[str, tuple[str, ...]]  # server -> the endpoints it is measured on (default: BASELINES')


def peer_rows(peer: str, connections: list[int], routes: Routes | None = None) -> tuple[tuple[str, int], ...]:
    return tuple((endpoint, c) for endpoint in (routes or {}).get(peer, BASELINES[peer][1]) for c in connections)


def sweep(peers: list[str], files: RequestFiles, connections: list[int], seconds: float, workdir: Path,
          env: dict[str, str], cmp: Comparison, routes: Routes | None = None) -> None:
    from loadtest.baselines.triton_server import ensure_triton

    for peer in peers:
        ensure = {"mlserver": ensure_mlserver, "triton": ensure_triton}.get(peer)
        why = ensure() if ensure else None
        if why:
            log(f"{peer} skipped: {why}")
            cmp.skipped[peer] = why
            continue
        for config in grid(peer):
            log(f"sweep {peer}: {config.describe()}")
            try:
                with running_baseline(config, workdir / f"sweep-{peer}-{len(cmp.sweep)}.log", env) as live:
                    found, _ = measure_rows(peer, config.describe(), live, peer_rows(peer, connections, routes),
                                            files, seconds, 0)
            except RuntimeError as e:  # a configuration that does not start: reported, the others go on
                log(f"  {peer} {config.describe()} failed: {str(e)[:300]}")
                cmp.skipped[f"{peer} {config.describe()}"] = str(e).splitlines()[0][:200]
                continue
            cmp.sweep += found
    cmp.best = pick_best(cmp.sweep)


def pick_best(sweep_runs: list[StackRun]) -> dict[tuple[str, str, int], str]:
    """(peer, endpoint, clients) -> the configuration with the most 2xx/s among those without errors (among
    all of them when every one had errors)."""
    best = {}
    for key in dict.fromkeys((r.server, r.endpoint, r.result.connections) for r in sweep_runs):
        rivals = [r for r in sweep_runs if (r.server, r.endpoint, r.result.connections) == key]
        clean = [r for r in rivals if r.result.errors == 0] or rivals
        best[key] = max(clean, key=lambda r: r.result.ok_rps).config
    return best


def units(peers: list[str], connections: list[int], cmp: Comparison, routes: Routes | None = None,
          previous: bool = False, servers: dict[str, Nnserve] | None = None) -> list[Unit]:
    """nnserve, the previous release (``previous``), the limit (unless ``routes`` leaves it out) and each
    peer's best configurations; ``servers``: nnserve's own configurations by name (default: its defaults)."""
    def rows_of(name: str) -> tuple[tuple[str, int], ...]:
        return tuple((e, c) for e in (routes or {}).get(name, NNSERVE_ROUTES) for c in connections)

    nnserve_rows = rows_of(NNSERVE)
    found = [Unit(name, None, rows_of(name), served.note) for name, served in servers.items()] if servers else \
        [Unit(NNSERVE, None, nnserve_rows)]
    if previous:  # the same rows, the same settings, the code of --previous REF
        found.append(Unit(PREVIOUS, None, nnserve_rows))
    if routes is None or LIMIT in routes:
        found.append(Unit(LIMIT, grid(LIMIT)[0], peer_rows(LIMIT, connections, routes)))
    for peer in peers:
        configs = {c.describe(): c for c in grid(peer)}
        chosen: dict[str, list[tuple[str, int]]] = {}
        for (server, endpoint, c), config in cmp.best.items():
            if server == peer:
                chosen.setdefault(config, []).append((endpoint, c))
        found += [Unit(peer, configs[config], tuple(rows)) for config, rows in chosen.items()]
    return found


def round_order(all_units: list[Unit], round_no: int, previous: list[Unit] | None) -> list[Unit]:
    """The units shuffled with ``round_no`` as seed; reshuffled (a few tries) if equal to the last round's."""
    rng = random.Random(round_no)
    order = list(all_units)
    for _ in range(10):
        rng.shuffle(order)
        if order != previous:
            break
    return order


def compare(peers: list[str], files: RequestFiles, connections: list[int], seconds: float, sweep_s: float,
            rounds: int, workdir: Path, env: dict[str, str], nnserve_env: dict[str, str],
            routes: Routes | None = None, model: str | None = None, previous: Path | None = None,
            servers: dict[str, Nnserve] | None = None) -> Comparison:
    """The whole part: sweep the peers, then ``rounds`` interleaved rounds (module docstring). ``routes``:
    each server's endpoints when not the lenet5 rows' (then no limit row unless it names one); ``model``:
    the model whose batches nnserve's rows report (default: each endpoint's, BATCHED_MODEL); ``previous``: a
    checkout of an older nnserve (a git worktree), measured as one more server on nnserve's rows; ``servers``:
    nnserve in these configurations (name -> environment added to ``nnserve_env``) instead of its defaults."""
    from harness.server import running_server

    cmp = Comparison()
    log(f"sweep: {', '.join(peers)} over their grids, {sweep_s:g} s per row")
    sweep(peers, files, connections, sweep_s, workdir, env, cmp, routes)
    plan = units([p for p in peers if p not in cmp.skipped], connections, cmp, routes, previous is not None,
                 servers)
    ours = {NNSERVE, PREVIOUS, *(servers or {})}
    last_order = None
    for round_no in range(1, rounds + 1):
        order = round_order(plan, round_no, last_order)
        last_order = order
        cmp.orders.append([f"{u.server} ({u.describe()})" for u in order])
        log(f"round {round_no}/{rounds}: " + ", ".join(f"{u.server}" for u in order))
        for unit in order:
            log_path = workdir / f"round{round_no}-{unit.server}.log"
            if servers and unit.server in servers:
                context = running_server(log_path, {**nnserve_env, **servers[unit.server].env})
            elif unit.server == NNSERVE:
                context = running_server(log_path, nnserve_env)
            elif unit.server == PREVIOUS:
                assert previous is not None  # units() plans a PREVIOUS unit only with a previous checkout
                context = running_server(log_path, nnserve_env, root=previous)
            else:
                assert unit.config is not None, "only nnserve's unit has no configuration (units())"
                context = running_baseline(unit.config, log_path, env)
            try:
                with context as live:
                    found, answers = measure_rows(unit.server, unit.describe(), live, unit.rows, files, seconds,
                                                  round_no, metrics=unit.server in ours,
                                                  model=model)
            except RuntimeError as e:
                log(f"  {unit.server} failed in round {round_no}: {str(e)[:300]}")
                cmp.skipped[f"{unit.server} round {round_no}"] = str(e).splitlines()[0][:200]
                continue
            cmp.runs += found
            cmp.answers.setdefault(unit.server, {}).update(answers)
    return cmp

