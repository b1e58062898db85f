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
import threading
import time

import pytest

from loadtest.faults import store_copy
from service import management
from service.lifecycle import LiveState, StateDir
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
        assert digits.state == "ready" and digits.kind == "image_classifier" and [v.state for v in digits.versions] == ["READY"]
        assert ghost.state == "loading" and "waiting for 'ghost' to be exported" in ghost.reason
        assert "waiting for 'ghost'" in snapshot.not_ready_reason()
        with pytest.raises(AttributeError):
            snapshot.generation = 5  # type: ignore[misc]
        assert [m["name"] for m in repository.describe(snapshot)] == ["digits", "ghost"]
    finally:
        repository.close()
