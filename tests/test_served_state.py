"""One owner of the served state (issue 25, part 2) and the management API's input bounds (part 3): the races
of the served state, each against the real classes (Repository, StateDir) or a real two-worker server.

In process: a worker's report never goes back a generation, however a drain's finish and a change interleave;
``state.json`` replaced while it is read gives one write's models and generation; a statistics call (run in a
worker thread) takes no lease. A real server: a config override out of bounds is refused naming the field and
the bound; statistics under load; a change while the server sheds load; a worker killed during a change; a
change that times out rolls back, says which worker serves what, and leaves the change lock free."""

from __future__ import annotations

import asyncio
import json
import os
import random
import signal
import threading
import time

import pytest
import requests

from loadtest.faults import store_copy
from service import management
from service.lifecycle import LiveState, StateDir, alive
from service.repository import Repository, request_scope
from service.settings import ModelConfig, Settings

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")
TOKEN = "served-state-test-token-0123456789"
AUTH = {"authorization": f"Bearer {TOKEN}"}


def settings_for(models: tuple[ModelConfig, ...], **kwargs) -> Settings:
    return Settings(models=models, providers=("CPUExecutionProvider",), intra_op_threads=1, workers=1, **kwargs)


# -- in process ---------------------------------------------------------------------------------------------

def test_a_report_never_goes_back_a_generation(tmp_path):
    state = StateDir(tmp_path, settings_for((ModelConfig("digits", "digits"),)))
    pid = os.getpid()
    assert state.report(1, {"pid": pid, "generation": 9, "models": {}, "draining": []})
    # The same process, an older generation (a drain that read the state before the change): refused.
    assert not state.report(1, {"pid": pid, "generation": 8, "models": {}, "draining": ["digits:a"]})
    assert state.reports()[1]["generation"] == 9 and state.reports()[1]["draining"] == []
    assert state.report(1, {"pid": pid, "generation": 9, "models": {}, "draining": []})  # the same one again: fine
    # A restarted worker (a new process) reports whatever it serves.
    assert state.report(1, {"pid": pid + 1, "generation": 3, "models": {}, "draining": []})
    assert state.reports()[1]["generation"] == 3


def test_state_json_replaced_between_reads_is_read_whole(tmp_path):
    """A writer replaces state.json as fast as it can, alternating two states whose models say which
    generation they belong to; every read pairs a generation with its own models."""
    settings = settings_for((ModelConfig("digits", "digits"),))
    state = StateDir(tmp_path, settings)

    def state_of(generation: int) -> LiveState:
        models = tuple(ModelConfig(f"m{i}", "digits", versions=("v",)) for i in range(1 + generation % 2 * 20))
        return LiveState(generation, models)

    state.write(state_of(1))
    stop = threading.Event()

    def writer() -> None:
        generation = 2
        while not stop.is_set():
            state.write(state_of(generation))
            generation += 1

    thread = threading.Thread(target=writer)
    thread.start()
    mismatched, reads = [], 0
    try:
        deadline = time.monotonic() + 3
        while time.monotonic() < deadline:
            got = state.read()
            reads += 1
            if len(got.models) != len(state_of(got.generation).models):
                mismatched.append((got.generation, len(got.models)))
    finally:
        stop.set()
        thread.join()
    assert reads > 20 and not mismatched, f"{len(mismatched)} of {reads} reads mixed two writes: {mismatched[:5]}"


def test_a_drain_finishing_during_changes_never_reports_an_older_generation(tiny_store, tmp_path):
    """The watch loop of a real Repository follows state.json while changes come every 30-130 ms, each
    retiring the version before it (its batching changes), so drains finish while changes are applied.
    Every report the worker writes is read back: the generations never go back, and the last one is the
    last change, with nothing draining."""
    digits = store_copy(tiny_store["lenet5"], "drain-digits")
    version = digits.split(":")[1]
    base = ModelConfig("digits", "drain-digits", max_batch_size=4, versions=(version,))
    settings = settings_for((base,), state_dir=str(tmp_path), drain_timeout_s=30)
    state = StateDir(tmp_path, settings)
    state.write(LiveState(1, (base,)))
    repository = Repository(settings, state, worker=1)
    repository.start_loading()
    assert repository.loaded.wait(120)
    seen: list[int] = []
    stop = threading.Event()

    def watch() -> None:
        report = tmp_path / "workers" / "1.json"
        while not stop.is_set():
            try:
                seen.append(json.loads(report.read_bytes())["generation"])
            except (OSError, ValueError):
                pass

    watcher = threading.Thread(target=watch)
    watcher.start()
    rng = random.Random(0)
    last = 1
    try:
        for generation in range(2, 62):
            # a request holds the served version now and then: its drain ends at a random later time
            config = ModelConfig("digits", "drain-digits", max_batch_size=4, versions=(version,),
                                 max_queue_delay_ms=generation % 2)
            state.write(LiveState(generation, (config,)))
            last = generation
            time.sleep(rng.uniform(0.03, 0.13))
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            report = state.reports()[1]
            if report["generation"] == last and not report["draining"]:
                break
            time.sleep(0.05)
    finally:
        stop.set()
        watcher.join()
        repository.close()
    went_back = [(a, b) for a, b in zip(seen, seen[1:], strict=False) if b < a]
    assert not went_back, f"the report went back a generation {len(went_back)} times, e.g. {went_back[:5]}"
    report = state.reports()[1]
    assert report["generation"] == last and report["draining"] == [], report
    assert repository.snapshot().generation == last


def test_a_statistics_call_in_a_worker_thread_takes_no_lease(tiny_store):
    """Lease counts change on the event loop only: the management reads run in worker threads (inside the
    request's scope, whose context they inherit) and must not touch them."""
    settings = settings_for((ModelConfig("digits", tiny_store["lenet5"]),))
    repository = Repository(settings)
    repository.load_all()

    async def request() -> tuple[int, int, int]:
        served = next(iter(repository.served.values()))  # the one version served
        with request_scope() as scope:
            await asyncio.to_thread(management.model_statistics, repository, "digits")
            await asyncio.to_thread(management.model_config, repository, "digits")
            during_reads = served.leases
            repository.get("digits")  # inference, on the loop: a lease until the request ends
            during_inference = served.leases
            assert scope.held == [served]
        return during_reads, during_inference, served.leases

    try:
        assert asyncio.run(request()) == (0, 1, 0)
    finally:
        repository.close()


def test_the_snapshot_is_one_generation_whole(tiny_store):
    settings = settings_for((ModelConfig("digits", tiny_store["lenet5"]), ModelConfig("ghost", "ghost")))
    repository = Repository(settings)
    before = repository.snapshot()
    assert before.generation == 0 and {m.state for m in before.models} == {"loading"}
    repository.load_all()
    try:
        snapshot = repository.snapshot()
        assert snapshot is not before and not snapshot.ready
        digits, ghost = snapshot.model("digits"), snapshot.model("ghost")
        assert digits.state == "ready" and digits.kind == "image_classifier"
        assert [v.state for v in digits.versions] == ["READY"]
        assert ghost.state == "loading" and "waiting for 'ghost' to be exported" in ghost.reason
        assert "waiting for 'ghost'" in snapshot.not_ready_reason()
        with pytest.raises(AttributeError):
            snapshot.generation = 5  # type: ignore[misc]
        assert [m["name"] for m in repository.describe(snapshot)] == ["digits", "ghost"]
    finally:
        repository.close()


# -- a real two-worker server -------------------------------------------------------------------------------

CHANGE_TIMEOUT_S = 6


@pytest.fixture(scope="module")
def server(own_server, tiny_store, session_dir):
    versions = [store_copy(tiny_store["lenet5"], "state-digits").split(":")[1] for _ in range(2)]
    config = session_dir / "served-state-models.yaml"
    config.write_text(json.dumps({"models": {"digits": {
        "tag": "state-digits", "version_policy": {"specific": {"versions": versions}}}}}))
    token = session_dir / "served-state-token"
    token.write_text(TOKEN)
    token.chmod(0o600)
    state = session_dir / "served-state"
    env = {"NNSERVE_MANAGEMENT_TOKEN_FILE": str(token), "NNSERVE_MODELS_CONFIG": str(config), "NNSERVE_WORKERS": "2",
           "NNSERVE_STATE_DIR": str(state), "NNSERVE_QUEUE_TIMEOUT_MS": "60000", "NNSERVE_DRAIN_TIMEOUT_S": "60",
           "NNSERVE_CHANGE_TIMEOUT_S": str(CHANGE_TIMEOUT_S), "NNSERVE_MAX_CONCURRENT_REQUESTS": "4"}
    with own_server("served-state", env) as live:
        live.state_dir = state
        live.versions = versions
        yield live


def png() -> bytes:
    import io

    import numpy as np
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (28, 28), dtype=np.uint8)).save(buffer, "PNG")
    return buffer.getvalue()


def reports(server) -> dict[int, dict]:
    return StateDir(server.state_dir, Settings(workers=2)).reports()


def state_generation(server) -> int:
    return json.loads((server.state_dir / "state.json").read_text())["generation"]


def settled(server, timeout_s: float = 120.0) -> dict[int, dict]:
    """Every worker's report once both serve state.json's generation with nothing draining."""
    deadline = time.monotonic() + timeout_s
    while True:
        now = reports(server)
        if len(now) == 2 and all(r["generation"] == state_generation(server) and not r["draining"]
                                 and alive(r["pid"]) for r in now.values()):
            return now
        assert time.monotonic() < deadline, f"workers did not settle: {now}"
        time.sleep(0.1)


def change(server, path: str, body: dict, timeout: float = 120) -> requests.Response:
    """A management call on a new connection (a kept-alive one may lead to a stopped or killed worker)."""
    return requests.post(f"{server.http_url}/v2/repository/models/{path}", json=body, timeout=timeout,
                         headers=AUTH | {"connection": "close"})


def hammer(url: str, seconds: float, clients: int, image: bytes) -> list[int | str]:
    """``clients`` threads post /classify for ``seconds``: every answer's status (or the exception's name)."""
    codes: list[int | str] = []
    deadline = time.monotonic() + seconds

    def client() -> None:
        session = requests.Session()
        while time.monotonic() < deadline:
            try:
                codes.append(session.post(f"{url}/classify", files={"image": image}, data={"model": "digits"},
                                          timeout=60).status_code)
            except requests.RequestException as e:
                codes.append(type(e).__name__)

    threads = [threading.Thread(target=client) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return codes


@pytest.mark.parametrize("config, named", [
    ({"max_batch_size": 1_000_000}, "max_batch_size: must be <= 1024, got 1000000"),
    ({"dynamic_batching": {"max_queue_delay_microseconds": 10**9}},
     "dynamic_batching.max_queue_delay_microseconds: must be <= 10000000, got 1000000000"),
    ({"dynamic_batching": {"default_queue_policy": {"max_queue_size": 10**7}}},
     "default_queue_policy.max_queue_size: must be <= 65536"),
    ({"dynamic_batching": {"default_queue_policy": {"default_timeout_microseconds": 10**12}}},
     "default_timeout_microseconds: must be <= 600000000"),
    ({"dynamic_batching": {"preferred_batch_size": list(range(1, 40))}}, "lists at most 32 sizes"),
])
def test_a_config_override_out_of_bounds_is_refused_naming_field_and_bound(server, config, named):
    generation = state_generation(server)
    answer = change(server, "digits/load", {"parameters": {"config": json.dumps(config)}})
    assert answer.status_code == 400 and named in answer.json()["error"], answer.text
    assert state_generation(server) == generation  # nothing was written


def test_statistics_during_load_leave_the_leases_alone(server):
    """/classify from 4 clients while 2 others read the statistics and the config (worker threads) as fast as
    they can; then a change retires both served versions: they drain at once (a lease a statistics call
    took and never gave back would hold one until NNSERVE_DRAIN_TIMEOUT_S)."""
    settled(server)
    stats_codes: list[int] = []
    stop = threading.Event()

    def stats() -> None:
        session = requests.Session()
        while not stop.is_set():
            for path in ("stats", f"versions/{server.versions[0]}/stats", "config"):
                stats_codes.append(session.get(f"{server.http_url}/v2/models/digits/{path}", timeout=60).status_code)

    readers = [threading.Thread(target=stats) for _ in range(2)]
    for t in readers:
        t.start()
    try:
        codes = hammer(server.http_url, 4.0, 4, png())
    finally:
        stop.set()
        for t in readers:
            t.join()
    assert codes and set(codes) == {200}, {c: codes.count(c) for c in set(codes)}
    assert stats_codes and set(stats_codes) == {200}
    started = time.monotonic()
    answer = change(server, "digits/load", {"parameters": {"config": {"max_batch_size": 16}}})
    assert answer.status_code == 200, answer.text
    settled(server, timeout_s=30)  # well inside the 60 s drain bound
    assert time.monotonic() - started < 45


def test_a_change_while_the_server_sheds_load_is_answered(server):
    """24 clients against 2 workers x 4 admitted requests: the excess gets 503 at once; a change made
    meanwhile (the management API is never refused for load) is applied by both workers."""
    result: dict = {}

    def changes() -> None:
        time.sleep(1.0)
        result["answer"] = change(server, "digits/traffic", {"default_version": server.versions[0]})

    thread = threading.Thread(target=changes)
    thread.start()
    codes = hammer(server.http_url, 4.0, 24, png())
    thread.join()
    assert set(codes) <= {200, 503} and 503 in codes and 200 in codes, {c: codes.count(c) for c in set(codes)}
    answer = result["answer"]
    assert answer.status_code == 200, answer.text
    assert all(r["generation"] >= answer.json()["generation"] for r in settled(server).values())


def test_a_change_that_times_out_rolls_back_and_frees_the_lock(server):
    """Worker 2 stopped (SIGSTOP: alive, but it applies nothing): the change is not confirmed within
    NNSERVE_CHANGE_TIMEOUT_S, so it is rolled back; the 504 says which worker serves what, the lock is
    free at once, and worker 2 catches up with the rollback when it runs again."""
    import fcntl

    before = settled(server)
    previous = json.loads((server.state_dir / "state.json").read_text())["models"]
    victim = before[2]["pid"]
    os.kill(victim, signal.SIGSTOP)
    try:
        answer = change(server, "digits/load", {"parameters": {"config": {"max_batch_size": 8}}})
        with open(server.state_dir / "change.lock", "a+") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)  # raises if the change still held it
            fcntl.flock(lock, fcntl.LOCK_UN)
    finally:
        os.kill(victim, signal.SIGCONT)
    error = answer.json()["error"]
    assert answer.status_code == 504, answer.text
    assert "worker(s) 2 did not confirm" in error and "rolled back" in error, error
    assert f"worker 2 (pid {victim})" in error and "(behind)" in error and "worker 1 (pid" in error, error
    after = settled(server)
    assert json.loads((server.state_dir / "state.json").read_text())["models"] == previous
    assert after[2]["pid"] == victim  # the same process caught up
    assert change(server, "digits/load", {}).status_code == 200  # nothing left locked


def test_a_worker_killed_during_a_change(server, tiny_store):
    """SIGKILL a worker once a change is written and before it is answered (a new version to load and warm
    up). Whatever the answer (200 once its replacement confirms, 504 rolled back if that takes longer than
    NNSERVE_CHANGE_TIMEOUT_S, or a dropped connection if the killed worker was the one answering), the
    change lock is free afterwards, every worker (the new one included) serves state.json's generation,
    and the next change succeeds."""
    before = settled(server)
    generation = state_generation(server)
    victim = before[2]["pid"]
    version = store_copy(tiny_store["lenet5"], "state-digits").split(":")[1]
    result: dict = {}

    def load() -> None:
        try:
            result["answer"] = change(server, "digits/load", {"parameters": {"version": version}})
        except requests.RequestException as e:
            result["error"] = e

    thread = threading.Thread(target=load)
    thread.start()
    while state_generation(server) == generation and thread.is_alive():
        time.sleep(0.001)
    in_flight = thread.is_alive()
    os.kill(victim, signal.SIGKILL)
    thread.join(timeout=120)
    assert in_flight and not thread.is_alive(), "the kill did not land during the change"
    answer = result.get("answer")
    if answer is not None and answer.status_code != 200:
        assert answer.status_code == 504 and "rolled back" in answer.json()["error"], answer.text
    after = settled(server)
    assert after[2]["pid"] != victim
    deadline = time.monotonic() + 60
    while (next_change := change(server, "digits/load", {})).status_code == 409:  # a join may hold it an instant
        assert time.monotonic() < deadline
        time.sleep(0.2)
    assert next_change.status_code == 200, next_change.text
    assert requests.post(f"{server.http_url}/classify", files={"image": png()}, data={"model": "digits"},
                         timeout=60).status_code == 200
