"""The live state of one server: which models and versions its workers serve, shared through files.

BentoML runs every worker as its own process, restarted at any time, and a request reaches one of them.
So what is served cannot live in one worker's memory. It is a file, the *desired state*, which every
worker reconciles to (Triton's POLL mode, with nnserve's management API as the one writer):

    <state dir>/state.json            {"generation": n, "models": {name: entry}}: the models config format
                                      (Triton's names, every key explicit) plus the store ``versions`` each
                                      model's version policy chose when the state was written
    <state dir>/change.lock           flock'ed by the worker applying a change: one change at a time
    <state dir>/workers/<index>.json  what worker <index> serves now: {"pid", "generation", "models":
                                      {name: {version: {"state", "reason"}}}}, written after each reconcile

The first worker of a server writes ``state.json`` from the models config (models.yaml and NNSERVE_*);
a worker that starts later, or restarts, serves what ``state.json`` says then, not the start-up config.
A change (service/management.py) writes the next generation atomically and answers once every worker
reports it, or rolls back and says which worker failed and why. Versions are resolved once, by the
writer, so workers never disagree because the store gained a version between two of their reads.

The state dir is per server by default (the BentoML process that started the workers, in the system's
temporary directory): a restarted server starts from its models config again, as Triton's EXPLICIT mode
does. ``NNSERVE_STATE_DIR`` keeps it elsewhere, e.g. to keep the changes across server restarts.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path

from service.errors import ChangeTimeout, ClientError, Conflict, NotFound
from service.settings import ModelConfig, Settings, SettingsError, read_models_document, resolve_entries

STATE_FILE = "state.json"
LOCK_FILE = "change.lock"
WORKERS_DIR = "workers"


@dataclass(frozen=True)
class LiveState:
    generation: int
    models: tuple[ModelConfig, ...]

    def model(self, name: str) -> ModelConfig | None:
        return next((m for m in self.models if m.name == name), None)


# -- the store: versions --------------------------------------------------------------------------------------

def store_versions(store_name: str) -> list[str]:
    """Every version of ``store_name`` in the BentoML model store, oldest first (by creation time)."""
    import bentoml

    try:
        models = bentoml.models.list(store_name)
    except bentoml.exceptions.NotFound:
        return []
    return [str(m.tag.version) for m in sorted(models, key=lambda m: m.info.creation_time)]


def store_model_complete(store_name: str) -> bool:
    """Whether ``store_name`` has a finished version: the store writes its ``latest`` pointer only once a
    version's files are all in place (a version being exported right now is not served half-copied)."""
    import bentoml

    try:
        bentoml.models.get(f"{store_name}:latest")
    except bentoml.exceptions.NotFound:
        return False
    return True


def store_index() -> dict[str, list[str]]:
    """Every model name in the store with its versions, oldest first."""
    import bentoml

    names: dict[str, list] = {}
    for model in bentoml.models.list():
        names.setdefault(model.tag.name, []).append(model)
    return {name: [m.tag.version for m in sorted(ms, key=lambda m: m.info.creation_time)]
            for name, ms in sorted(names.items())}


def resolve_versions(model: ModelConfig) -> tuple[str, ...]:
    """The store versions ``model``'s policy serves, oldest first; NotFound names what the store holds."""
    available = store_versions(model.store_name)
    if not available:
        raise NotFound(f"model {model.store_name!r} is not in the model store (run `make export` or "
                       f"python -m export ...)")
    kind, *args = model.policy
    if kind == "latest":
        return tuple(available[-args[0]:])
    if kind == "all":
        return tuple(available)
    missing = [v for v in args[0] if v not in available]
    if missing:
        raise NotFound(f"model {model.store_name!r} has no version {', '.join(map(repr, missing))} in the store; "
                       f"it has {', '.join(available)}")
    return tuple(v for v in available if v in args[0])


def with_versions(model: ModelConfig) -> ModelConfig:
    """``model`` with its policy resolved against the store, its traffic weights checked against them."""
    versions = resolve_versions(model)
    unknown = [v for v, _ in model.traffic if v not in versions]
    if unknown:
        raise ClientError(f"model {model.name!r}: traffic weights name {', '.join(map(repr, unknown))}, which its "
                          f"version policy does not serve (served: {', '.join(versions)})")
    return replace(model, versions=versions)


# -- the state dir --------------------------------------------------------------------------------------------

def default_state_dir() -> Path:
    """Per server: the process that started this worker (BentoML's arbiter), with its start time so that a
    reused process id is a new server."""
    parent = os.getppid()
    try:
        started = Path(f"/proc/{parent}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except OSError:
        started = "0"
    return Path(tempfile.gettempdir()) / f"nnserve-{os.getuid()}" / f"server-{parent}-{started}"


class StateDir:
    def __init__(self, path: str | Path, settings: Settings) -> None:
        self.path = Path(path)
        self.settings = settings
        (self.path / WORKERS_DIR).mkdir(parents=True, exist_ok=True, mode=0o700)

    @property
    def state_file(self) -> Path:
        return self.path / STATE_FILE

    def initialize(self, models: tuple[ModelConfig, ...]) -> None:
        """Write generation 1 from ``models`` (the start-up config) unless a state exists: the first worker
        to get here writes it, the others keep the winner's (os.link refuses to replace a file)."""
        if self.state_file.exists():
            return
        resolved = []
        for model in models:
            try:
                resolved.append(with_versions(model))
            except ClientError:  # not in the store yet: each worker reports it as failed, with the reason
                resolved.append(model)
        tmp = self._write_temp(LiveState(1, tuple(resolved)))
        try:
            os.link(tmp, self.state_file)
        except FileExistsError:
            pass
        finally:
            tmp.unlink()

    def stamp(self) -> tuple[int, int, int] | None:
        """Changes whenever state.json is replaced: (inode, mtime, size)."""
        try:
            st = self.state_file.stat()
        except FileNotFoundError:
            return None
        return st.st_ino, st.st_mtime_ns, st.st_size

    def read(self) -> LiveState:
        """The live state, generation and models from one read of the file (one write's bytes: a replace
        between two reads would pair one write's models with another's generation)."""
        path = str(self.state_file)
        try:
            with open(path, "rb") as f:
                document = json.loads(f.read())
        except OSError as e:
            raise SettingsError(f"{path}: cannot read the live state: {e.strerror or e}") from e
        except ValueError as e:
            raise SettingsError(f"{path}: not valid JSON: {e}") from e
        entries = read_models_document(document, path, live=True)
        generation = document.get("generation", 0)
        if not isinstance(generation, int) or isinstance(generation, bool) or generation < 0:
            raise SettingsError(f"{path}: generation must be an integer >= 0, got {str(generation)[:40]!r}")
        return LiveState(generation, resolve_entries(self.settings, entries, path))

    def write(self, state: LiveState) -> None:
        """Replace state.json atomically (temp file, then rename): a worker reads the old or the new one."""
        os.replace(self._write_temp(state), self.state_file)

    def _write_temp(self, state: LiveState) -> Path:
        document = {"generation": state.generation, "models": {m.name: m.to_entry() for m in state.models}}
        fd, tmp = tempfile.mkstemp(dir=self.path, prefix=".state-", suffix=".json")
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(document, f, indent=2)
            f.flush()
            os.fsync(f.fileno())
        return Path(tmp)

    @contextlib.contextmanager
    def change_lock(self) -> Iterator[None]:
        """One change at a time across every worker: a second one gets 409 at once (it would otherwise
        undo or interleave with the first)."""
        with open(self.path / LOCK_FILE, "a+") as f:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as e:
                if e.errno in (errno.EAGAIN, errno.EACCES):
                    raise Conflict("another change to the served models is in progress; retry when it is done") \
                        from e
                raise
            try:
                yield
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)

    # -- worker reports -----------------------------------------------------------------------------------------

    def report(self, worker: int, report: dict) -> bool:
        """Write worker ``worker``'s report (``{"pid", "generation", ...}``) atomically, unless the same process
        already reported a newer generation (reports never go back; a restarted worker, a new pid, starts
        afresh). False if refused. The worker's reconcile step is the one caller, under its lock."""
        path = self.path / WORKERS_DIR / f"{worker}.json"
        try:
            previous = json.loads(path.read_bytes())
        except (OSError, ValueError):
            previous = None
        if isinstance(previous, dict) and previous.get("pid") == report["pid"] \
                and isinstance(previous.get("generation"), int) and previous["generation"] > report["generation"]:
            return False
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{worker}-")
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(report, f)
        os.replace(tmp, path)
        return True

    def reports(self) -> dict[int, dict]:
        """The latest report of every worker that has written one (worker index -> report)."""
        out = {}
        for path in (self.path / WORKERS_DIR).glob("*.json"):
            try:
                out[int(path.stem)] = json.loads(path.read_text())
            except (ValueError, OSError):  # replaced while read: the next poll sees it
                continue
        return out

    def wait_for(self, generation: int, timeout_s: float) -> dict[int, dict]:
        """Every worker's report once all of them (NNSERVE_WORKERS, each alive) serve ``generation`` or
        later; ChangeTimeout naming the workers that did not within ``timeout_s``."""
        deadline = time.monotonic() + timeout_s
        while True:
            reports = self.reports()
            behind = [w for w in range(1, self.settings.workers + 1)
                      if w not in reports or reports[w]["generation"] < generation or not alive(reports[w]["pid"])]
            if not behind:
                return reports
            if time.monotonic() > deadline:
                raise ChangeTimeout(f"worker(s) {', '.join(map(str, behind))} did not confirm generation {generation} "
                                    f"of the served models within {timeout_s:g} s (NNSERVE_CHANGE_TIMEOUT_S); "
                                    "they apply it when they come back")
            time.sleep(0.05)


def alive(pid: int) -> bool:
    """Whether process ``pid`` exists."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def load_failures(reports: dict[int, dict], state: LiveState) -> list[str]:
    """What each worker could not serve of ``state``: "worker 2: lenet5 version abc: <reason>"."""
    failures = []
    for worker, report in sorted(reports.items()):
        for model in state.models:
            for version in model.versions or ("(none)",):
                status = report["models"].get(model.name, {}).get(version)
                if status is None or status["state"] != "READY":
                    reason = status["reason"] if status else "not served"
                    failures.append(f"worker {worker}: {model.name} version {version}: {reason}")
    return failures

