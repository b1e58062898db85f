"""Part 8: a user's library network on ``/classify``: does nnserve's dynamic batching pay on a real-size model?

EfficientNet-B0 (efficientnet_pytorch, 224x224 RGB, 10 classes) made the way a user makes it
(docs/your-model.md): ``python -m models.finetune`` for a few steps (untrained weights cost the same time as
trained ones), ``python -m export`` (fp32) into the bench's BentoML store. Then, both up at once:

- nnserve serving only that model (its own models.yaml: the tag, nothing else, so the batching is the
  defaults or what ``--server-env`` sets), its batch sizes from ``/metrics``;
- plain FastAPI + ORT (``loadtest/baselines/fastapi_app.py``: uvicorn, 2 workers, one ORT call per request)
  on the SAME store entry, so the same ONNX file and the same decode + preprocessing code.

Both get the same bytes: a held-out digit upscaled to 224x224 RGB as a PNG upload, with ``model=<name>``
(FastAPI ignores the field). wrk at each ``--connections`` level, as the main rows, but in several rounds
with the two servers' rows alternating (both servers up) and medians judged. Last, with no server up,
the model's ORT cost per item at batch 1, 8 and 32 in process: the most batching can save on this CPU.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from loadtest.bench.common import REPO_ROOT, log
from loadtest.bench.stacks import CLASSIFY, StackRun, measure
from loadtest.bench.wrk import RequestFiles

NAME = "effnet_b0"
SIZE = 224
FACTORY = "efficientnet_pytorch:EfficientNet.from_name"
KWARGS = {"model_name": "efficientnet-b0", "num_classes": 10, "image_size": SIZE}
# Weights do not change the speed: a few small steps make a valid artifact in the least time.
FINETUNE_STEPS, FINETUNE_BATCH = 3, 8
EXPORT_BENCH_RUNS = 3  # export's own latency comparison (fp32 vs optimized graph), runs per batch size
COST_BATCHES = (1, 8, 32)  # batch sizes of the in-process cost per item: what batching can save at most
NNSERVE, FASTAPI = "nnserve", "fastapi"  # server names of this part's runs
LABELS = {NNSERVE: "nnserve (dynamic batching)", FASTAPI: "FastAPI + ORT, 2 workers"}


@dataclass
class UserModelResult:
    tag: str  # the store entry both servers ran
    runs: list[StackRun] = field(default_factory=list)
    answers: dict[str, str] = field(default_factory=dict)  # server -> the checked request's answer
    batching: str = ""  # nnserve's batching settings for the model, as GET /models reports them
    made: str = ""  # how the store entry was made (or that it was reused), with the time it took
    png_bytes: int = 0
    threads: int = 0  # ORT intra-op threads of one worker (both servers: cores / 2 workers)
    item_ms: dict[int, float] = field(default_factory=dict)  # batch size -> median ORT ms per item, in process


def finetune_command(out: Path) -> list[str]:
    return [sys.executable, "-m", "models.finetune", "--factory", FACTORY, "--kwargs", json.dumps(KWARGS),
            "--name", NAME, "--size", str(SIZE), "--max-steps", str(FINETUNE_STEPS),
            "--batch-size", str(FINETUNE_BATCH), "--out", str(out)]


def export_command(artifact: Path, report_dir: Path) -> list[str]:
    # No --eval-data: parity on the 450 held-out images at 224x224 takes minutes on a small CPU, and these
    # weights are untrained; export still checks the graph against PyTorch on random inputs.
    return [sys.executable, "-m", "export", str(artifact), "--bench-runs", str(EXPORT_BENCH_RUNS),
            "--report-dir", str(report_dir)]


def models_config(name: str, tag: str) -> dict:
    """A models.yaml serving only ``name`` (pinned to ``tag``): no batching keys, so the server's defaults
    (or the NNSERVE_* globals the bench passes) decide them."""
    return {"models": {name: {"tag": tag}}}


def write_models_config(path: Path, name: str, tag: str) -> Path:
    path.write_text(json.dumps(models_config(name, tag), indent=2) + "\n")  # JSON is YAML
    return path


def baseline_env(name: str, tag: str) -> dict[str, str]:
    """The FastAPI baseline's environment: ``name`` on /classify pinned to ``tag``, no /features model."""
    from loadtest.baselines.common import tag_variable

    return {"BASELINE_CLASSIFY_MODEL": name, "BASELINE_FEATURES_MODEL": "", tag_variable(name): tag}


def upscaled_png(digit: np.ndarray, size: int = SIZE) -> bytes:
    """A uint8 [H, W] digit as a ``size`` x ``size`` RGB PNG: what a client of a 224x224 RGB model uploads
    (the server decodes and resizes it either way)."""
    import io

    from PIL import Image

    image = Image.fromarray(digit).convert("RGB").resize((size, size), Image.Resampling.BILINEAR)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def run_logged(cmd: list[str], log_path: Path, what: str) -> float:
    """Run ``cmd`` in the repository (its output to ``log_path``); seconds taken. RuntimeError on failure."""
    started = time.perf_counter()
    with open(log_path, "wb") as out:
        done = subprocess.run(cmd, cwd=REPO_ROOT, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    if done.returncode != 0:
        tail = log_path.read_text(errors="replace")[-3000:]
        raise RuntimeError(f"{what} failed ({done.returncode}): {' '.join(cmd)}; log {log_path}:\n{tail}")
    return time.perf_counter() - started


def make_store_entry(workdir: Path) -> tuple[str, str]:
    """Fine-tune + export into the store (BENTOML_HOME); (the new store tag, how it was made)."""
    import bentoml

    artifact = workdir / NAME
    log(f"user model: python -m models.finetune ({NAME}, {SIZE}x{SIZE}, {FINETUNE_STEPS} steps)")
    finetune_s = run_logged(finetune_command(artifact), workdir / "finetune.log", "models.finetune")
    log(f"user model: python -m export {artifact.name} (fp32)")
    export_s = run_logged(export_command(artifact, workdir / "export-reports"), workdir / "export.log",
                          "python -m export")
    tag = str(bentoml.models.get(f"{NAME}:latest").tag)  # export just registered it: the newest version
    return tag, (f"made by this run: `models.finetune` ({FINETUNE_STEPS} steps of batch {FINETUNE_BATCH}, "
                 f"{finetune_s:.0f} s) and `export` (fp32, {export_s:.0f} s)")


def served_batching(url: str, name: str) -> str:
    from loadtest.bench.server_info import get_json

    model: dict[str, Any] = next((m for m in get_json(url + "/models")["models"] if m.get("name") == name), {})
    return json.dumps(model.get("batching", "not reported"))


def per_item_ms(tag: str, png: bytes, threads: int, sizes: tuple[int, ...] = COST_BATCHES,
                passes: int = 3) -> dict[int, float]:
    """Median ORT milliseconds per item at each batch size, in process (no server up), the request's image
    preprocessed as the servers do, ``threads`` intra-op threads as one server worker has: batching can make
    a server at most item_ms[1] / item_ms[N] times faster at batch N, whatever its queue does."""
    from loadtest.baselines.common import StoreModel
    from loadtest.bench.inprocess import time_calls

    model = StoreModel.load(tag.split(":")[0], threads, tag=tag)
    batches = {n: np.repeat(model.decode(png)[None], n, axis=0) for n in sizes}
    times: dict[int, list[float]] = {n: [] for n in sizes}
    # The sizes take turns, pass after pass: other work on a shared machine then slows every size alike
    # instead of whichever was being timed. Few calls per pass: a batch of 32 takes about a second.
    for i in range(passes):
        for n, batch in batches.items():
            times[n] += time_calls(lambda b=batch: model.run(b), runs=10, max_seconds=0.5, warmup=1 if i else 2)
    return {n: float(np.median(t)) / n for n, t in times.items()}


def round_order(i: int) -> tuple[str, str]:
    """Which server goes first in round ``i``: alternating, so neither always runs on the warmer machine."""
    return (NNSERVE, FASTAPI) if i % 2 == 0 else (FASTAPI, NNSERVE)


def bench_user_model(args: argparse.Namespace, env: dict[str, str], workdir: Path) -> UserModelResult:
    """Make (or reuse, ``--user-model-tag``) the store entry, then ``--user-model-rounds`` rounds of wrk rows,
    nnserve's and FastAPI's alternating, at each ``--connections`` level."""
    from harness.data import held_out_digits
    from harness.server import running_server
    from loadtest.baselines.common import ort_threads
    from loadtest.baselines.launch import running_baseline

    if args.user_model_tag:
        tag, made = args.user_model_tag, "reused (`--user-model-tag`), not made by this run"
    else:
        tag, made = make_store_entry(workdir)
    name = tag.split(":")[0]
    digits, labels = held_out_digits()
    png = workdir / "digit-224-rgb.png"
    png.write_bytes(upscaled_png(digits[0]))
    files = RequestFiles(png, str(labels[0]), classify_fields={"model": name})
    result = UserModelResult(tag, made=made, png_bytes=png.stat().st_size)

    config = write_models_config(workdir / "models-user.yaml", name, tag)
    log(f"user model: nnserve serving only {tag}, and FastAPI + ORT on it")
    # Both up at once (an idle server takes no CPU: ORT does not spin) so the rows can alternate: on a shared
    # machine other work comes and goes, and back-to-back blocks per server would measure it, not the servers.
    with (running_server(workdir / "nnserve-user.log", {**env, "NNSERVE_MODELS_CONFIG": str(config)}) as nnserve,
          running_baseline("fastapi", workdir / "fastapi-user.log", baseline_env(name, tag)) as fastapi):
        result.batching = served_batching(nnserve.http_url, name)
        urls = {NNSERVE: nnserve.http_url, FASTAPI: fastapi.http_url}
        for i in range(args.user_model_rounds):
            for c in args.connections:
                for server in round_order(i):
                    runs, answers = measure(server, urls[server], (CLASSIFY,), files, [c], args.duration,
                                            metrics=server == NNSERVE, model=name)
                    for run in runs:
                        run.round_no = i + 1
                    result.runs += runs
                    result.answers[server] = answers[CLASSIFY]
    result.threads = ort_threads(2)
    log(f"user model: ORT cost per item at batch {', '.join(map(str, COST_BATCHES))} ({result.threads} threads, "
        "in process)")
    result.item_ms = per_item_ms(tag, png.read_bytes(), result.threads)
    log("  " + ", ".join(f"batch {n}: {ms:.1f} ms/item" for n, ms in result.item_ms.items()))
    return result
