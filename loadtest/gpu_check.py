"""``make gpu-check``: the GPU path proven on a GPU host, in one command, in under 10 minutes.

Steps, each recorded in docs/gpu.md as soon as it ends (so a run cut short still leaves its report):

1. the GPU, driver, CUDA, cuDNN and TensorRT versions (a host without an NVIDIA GPU stops here, saying why,
   before anything is installed or written);
2. the ``gpu`` extra installed (onnxruntime-gpu and TensorRT in place of onnxruntime; ``GPU_WHEELS=dir``
   installs from a folder of wheels on a host without the package registry);
3. the default models and a user's network (docs/your-model.md's EfficientNet-B0, 224x224) exported with
   ``--tensorrt`` (fp32, then fp16 for the image models) into the check's own model store;
4. the ``gpu``-marked tests;
5. nnserve served on the CPU, CUDA and TensorRT providers (fp32 and, where its engine was verified, fp16),
   ``/classify`` and ``/v2`` (binary tensors) measured at 1 and 32 clients on lenet5 and the EfficientNet.

The load comes from Python threads on keep-alive connections (wrk needs a Debian package a GPU host may not
reach); each figure is requests/s over a fixed window, with p50/p95 latency and the count of non-2xx answers.
Every step has a share of the time budget (``--budget-s``, default 540) and is skipped, saying so, when the
budget is spent.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import threading
import time
import tomllib
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
DOC = REPO_ROOT / "docs" / "gpu.md"
RESULTS = REPO_ROOT / "loadtest" / "results" / "gpu-check.json"
WORK = REPO_ROOT / ".nnserve" / "gpu-check"
DEFAULT_MODELS = ("lenet5", "vgg_fc7", "char_lstm", "char_gru")
IMAGE_MODELS = ("lenet5", "vgg_fc7")
USER_MODEL = "effnet_b0"
MEASURED = ("lenet5", USER_MODEL)
CLIENTS = (1, 32)
TRT_FIRST = "TensorrtExecutionProvider,CUDAExecutionProvider,CPUExecutionProvider"
PROVIDER_SETS = {  # label -> (NNSERVE_PROVIDERS, which export's tags to serve)
    "CPU": ("CPUExecutionProvider", "fp32"),
    "CUDA": ("CUDAExecutionProvider,CPUExecutionProvider", "fp32"),
    "TensorRT fp32": (TRT_FIRST, "fp32"),
    "TensorRT fp16": (TRT_FIRST, "fp16"),
}


# ---- 1. the host ------------------------------------------------------------------------------------------

def nvidia_smi(*query: str) -> list[str] | None:
    """nvidia-smi's CSV answer for ``query`` fields of GPU 0, or None where there is no GPU to ask."""
    if shutil.which("nvidia-smi") is None:
        return None
    try:
        out = subprocess.run(["nvidia-smi", "--id=0", f"--query-gpu={','.join(query)}", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return [part.strip() for part in out.split(",")] if out else None


def no_gpu_reason() -> str | None:
    """Why this host cannot run the check, or None when it has an NVIDIA GPU the driver answers for."""
    if shutil.which("nvidia-smi") is None:
        return "no NVIDIA GPU: nvidia-smi is not on PATH (no NVIDIA driver on this host)"
    if nvidia_smi("name") is None:
        return "no NVIDIA GPU: nvidia-smi lists none (or the driver does not answer)"
    return None


def package_version(*names: str) -> str | None:
    from importlib import metadata

    for name in names:
        try:
            return f"{metadata.version(name)} ({name})"
        except metadata.PackageNotFoundError:
            continue
    return None


def host_facts() -> dict:
    """GPU, driver and CUDA as the driver reports them, the libraries ONNX Runtime will load as installed."""
    name, driver, memory = nvidia_smi("name", "driver_version", "memory.total") or ("?", "?", "?")
    header = subprocess.run(["nvidia-smi"], capture_output=True, text=True, timeout=20).stdout
    cuda_driver = next((line.split("CUDA Version:")[1].strip(" |") for line in header.splitlines()
                        if "CUDA Version:" in line), "?")
    return {"gpu": name, "gpu_memory": memory, "driver": driver, "cuda_driver_api": cuda_driver,
            "cuda_runtime": package_version("nvidia-cuda-runtime-cu12", "nvidia-cuda-runtime-cu13") or "system",
            "cudnn": package_version("nvidia-cudnn-cu12", "nvidia-cudnn-cu13") or "system (not from a wheel)",
            "tensorrt": package_version("tensorrt-cu12-libs", "tensorrt-cu12", "tensorrt"),
            "onnxruntime": package_version("onnxruntime-gpu", "onnxruntime"),
            "cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
            "python": platform.python_version()}


# ---- the report: rewritten after every step ---------------------------------------------------------------

@dataclass
class Report:
    started: str = field(default_factory=lambda: datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"))
    command: str = "make gpu-check"
    facts: dict = field(default_factory=dict)
    steps: list[dict] = field(default_factory=list)  # {"step", "status", "seconds", "detail"}
    exports: list[dict] = field(default_factory=list)
    runs: list[dict] = field(default_factory=list)
    finished: bool = False

    def step(self, name: str, status: str, seconds: float, detail: str = "") -> None:
        self.steps.append({"step": name, "status": status, "seconds": round(seconds, 1), "detail": detail})
        print(f"[gpu-check] {name}: {status} ({seconds:.0f} s) {detail}", flush=True)
        self.save()

    def save(self) -> None:
        for path, text in ((RESULTS, json.dumps(vars(self), indent=2) + "\n"), (DOC, self.markdown())):
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(path.suffix + ".tmp")
            tmp.write_text(text)
            tmp.replace(path)  # a reader never sees half a report

    def markdown(self) -> str:
        state = "complete" if self.finished else "**INCOMPLETE: the run stopped before its last step**"
        lines = ["# The GPU path, measured on a GPU host", "",
                 f"Written by `{self.command}` (loadtest/gpu_check.py), started {self.started}; {state}.", "",
                 "## Host", "", "| fact | value |", "|---|---|"]
        lines += [f"| {k} | {v} |" for k, v in self.facts.items()]
        lines += ["", "## Steps", "", "| step | status | seconds | detail |", "|---|---|---|---|"]
        lines += [f"| {s['step']} | {s['status']} | {s['seconds']} | {s['detail']} |" for s in self.steps]
        if self.exports:
            lines += ["", "## Exports with `--tensorrt`", "",
                      "| model | precision | store tag | TensorRT engine | parity max rel (tolerance) | seconds |",
                      "|---|---|---|---|---|---|"]
            lines += [f"| {e['model']} | {e['precision']} | {e['tag']} | {e['engine']} | {e['parity']} | "
                      f"{e['seconds']} |" for e in self.exports]
        if self.runs:
            lines += ["", "## Serving: requests/s and latency", "",
                      "Each row one window of load from Python threads on keep-alive connections; non-2xx answers do "
                      "not count as served.", "",
                      "| providers | model | endpoint | clients | served on | req/s (2xx) | p50 ms | p95 ms "
                      "| non-2xx |",
                      "|---|---|---|---|---|---|---|---|---|"]
            lines += [f"| {r['providers']} | {r['model']} | {r['endpoint']} | {r['clients']} | {r['served_on']} | "
                      f"{r['rps']:.1f} | {r['p50_ms']:.2f} | {r['p95_ms']:.2f} | {r['errors']} |" for r in self.runs]
        return "\n".join(lines) + "\n"


# ---- 2. the gpu extra -------------------------------------------------------------------------------------

def gpu_requirements() -> list[str]:
    """pyproject.toml's ``gpu`` extra: the one place its pins are written."""
    project = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]
    return list(project["optional-dependencies"]["gpu"])


def install_gpu_extra() -> str:
    """onnxruntime-gpu replaces onnxruntime (both install the ``onnxruntime`` package: the CPU one goes first)."""
    pip = [sys.executable, "-m", "pip", "install", "--quiet"]
    wheels = os.environ.get("GPU_WHEELS")
    if wheels:
        pip += ["--no-index", "--find-links", wheels]
    subprocess.run([sys.executable, "-m", "pip", "uninstall", "--quiet", "-y", "onnxruntime"], check=False)
    subprocess.run([*pip, *gpu_requirements()], check=True, timeout=400)
    return ", ".join(gpu_requirements()) + (f" from {wheels}" if wheels else "")


# ---- 3. exports -------------------------------------------------------------------------------------------

def artifact(name: str, deadline: float) -> Path:
    """artifacts/<name> as `make train` left it, else a short training run made for this check only
    (the GPU path's speed and parity do not depend on how well a network is trained)."""
    path = REPO_ROOT / "artifacts" / name
    if (path / "card.json").is_file():
        return path
    out = WORK / "artifacts" / name
    if (out / "card.json").is_file():
        return out
    if name == USER_MODEL:
        from loadtest.bench.user_model import finetune_command

        command = finetune_command(out)
    elif name in IMAGE_MODELS:
        command = [sys.executable, "-m", "models.train", name, "--epochs", "1", "--limit", "2000", "--out", str(out)]
    else:
        command = [sys.executable, "-m", "models.train", name, "--steps", "20", "--out", str(out)]
    subprocess.run(command, check=True, cwd=REPO_ROOT, timeout=max(30.0, deadline - time.monotonic()))
    return out


def export(path: Path, fp16: bool, report: Report) -> str | None:
    """One ``python -m export --tensorrt`` into the check's store; the fp32/fp16 tag, or None if it failed."""
    from export.pipeline import Options, export_artifact

    start = time.monotonic()
    precision = "fp16" if fp16 else "fp32"
    try:
        result = export_artifact(path, Options(tensorrt=True, fp16=fp16, bench_runs=3, report_dir=WORK / "exported"))
    except Exception as e:  # recorded and the check goes on: one model's failure is a result too
        report.exports.append({"model": path.name, "precision": precision, "tag": "-", "engine": f"FAILED: {e}",
                               "parity": "-", "seconds": round(time.monotonic() - start, 1)})
        report.save()
        return None
    trt = json.loads((WORK / "exported" / f"{path.name}.json").read_text()).get("tensorrt", {})
    parity = trt.get("parity", {})
    engine = ("verified, kept" if parity.get("passed") else f"NOT kept: {trt.get('skipped') or 'parity failed'}")
    report.exports.append({"model": path.name, "precision": precision, "tag": result.tags["fp32"], "engine": engine,
                           "parity": f"{parity.get('max_rel', float('nan')):.3g} ({parity.get('tolerance_max_rel')})"
                           if parity else "-", "seconds": round(time.monotonic() - start, 1)})
    report.save()
    return result.tags["fp32"] if parity.get("passed") or not fp16 else None


# ---- 5. serving -------------------------------------------------------------------------------------------

def request_bodies(url: str, model: str) -> dict[str, tuple[str, bytes, dict[str, str]]]:
    """endpoint -> (path, body, headers): a held-out digit as a PNG upload and as a preprocessed v2 tensor
    (binary tensor extension, as tritonclient.http sends it), sized from the model's served metadata."""
    import numpy as np
    import tritonclient.http as triton

    from harness.data import held_out_digits
    from loadtest.bench.user_model import upscaled_png
    from loadtest.bench.wrk import multipart_body

    described = json.loads(urlopen_text(f"{url}/v2/models/{model}"))
    spec = described["inputs"][0]
    shape = [1 if d == -1 else d for d in spec["shape"]]
    png = upscaled_png(held_out_digits()[0][0], size=shape[-1])
    form, content_type = multipart_body(png, {"model": model})
    tensor = triton.InferInput(spec["name"], shape, spec["datatype"])
    tensor.set_data_from_numpy(np.random.default_rng(0).standard_normal(shape).astype(np.float32), binary_data=True)
    body, json_size = triton.InferenceServerClient.generate_request_body([tensor])
    v2_headers = {"Content-Type": "application/octet-stream", "Inference-Header-Content-Length": str(json_size)}
    return {"/classify": ("/classify", form, {"Content-Type": content_type}),
            "/v2": (f"/v2/models/{model}/infer", body, v2_headers)}


def urlopen_text(url: str) -> str:
    import urllib.request

    with urllib.request.urlopen(url, timeout=30) as response:
        return response.read().decode()


def load(url: str, path: str, body: bytes, headers: dict[str, str], clients: int, seconds: float) -> dict:
    """``clients`` threads, each one keep-alive connection sending ``body`` back to back for ``seconds``."""
    host, port = url.removeprefix("http://").split(":")
    latencies: list[float] = []
    errors = [0]
    lock = threading.Lock()
    stop_at = time.monotonic() + seconds

    def client() -> None:
        connection = http.client.HTTPConnection(host, int(port), timeout=30)
        mine, failed = [], 0
        while time.monotonic() < stop_at:
            start = time.perf_counter()
            try:
                connection.request("POST", path, body, headers)
                response = connection.getresponse()
                response.read()
                ok = 200 <= response.status < 300
            except (OSError, http.client.HTTPException):
                connection.close()
                connection = http.client.HTTPConnection(host, int(port), timeout=30)
                ok = False
            if ok:
                mine.append(time.perf_counter() - start)
            else:
                failed += 1
        with lock:
            latencies.extend(mine)
            errors[0] += failed

    threads = [threading.Thread(target=client) for _ in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    ordered = sorted(latencies) or [float("nan")]
    return {"rps": len(latencies) / seconds, "p50_ms": 1000 * statistics.median(ordered),
            "p95_ms": 1000 * ordered[int(0.95 * (len(ordered) - 1))], "errors": errors[0]}


def serve_and_measure(label: str, providers: str, tags: dict[str, str], seconds: float, report: Report) -> None:
    from harness.server import running_server

    config = WORK / f"models-{label.replace(' ', '-')}.yaml"
    config.write_text(json.dumps({"models": {name: {"tag": tag} for name, tag in tags.items()}}) + "\n")
    env = {"BENTOML_HOME": os.environ["BENTOML_HOME"], "NNSERVE_MODELS_CONFIG": str(config),
           "NNSERVE_PROVIDERS": providers}
    with running_server(WORK / f"server-{label.replace(' ', '-')}.log", env) as server:
        models = {m["name"]: m for m in json.loads(urlopen_text(f"{server.http_url}/models"))["models"]}
        for name in tags:
            engine = models[name].get("engine", {})
            served_on = f"{models[name].get('provider')} ({engine.get('served')}: {engine.get('reason') or 'verified'})"
            for endpoint, (path, body, headers) in request_bodies(server.http_url, name).items():
                load(server.http_url, path, body, headers, 4, 2.0)  # warm-up: every batch shape the load makes
                for clients in CLIENTS:
                    result = load(server.http_url, path, body, headers, clients, seconds)
                    report.runs.append({"providers": label, "model": name, "endpoint": endpoint, "clients": clients,
                                        "served_on": served_on, **result})
                    report.save()


# ---- the steps, under one budget --------------------------------------------------------------------------

def after_install(budget_s: float, seconds: float, report: Report) -> None:
    """Steps 3-5, in a fresh interpreter (onnxruntime-gpu is imported for the first time here)."""
    start = time.monotonic()
    deadline = start + budget_s

    def left() -> float:
        return deadline - time.monotonic()

    tags: dict[str, dict[str, str]] = {"fp32": {}, "fp16": {}}
    t0 = time.monotonic()
    for name in (*DEFAULT_MODELS, USER_MODEL):
        if left() < 120:  # keep time to serve and measure what was exported
            report.step(f"export {name}", "skipped", 0, "time budget spent")
            continue
        path = artifact(name, deadline - 120)
        tag = export(path, False, report)
        if tag:
            tags["fp32"][name] = tag
        if name in (*IMAGE_MODELS, USER_MODEL) and left() > 150:
            tag16 = export(path, True, report)
            if tag16:
                tags["fp16"][name] = tag16
    report.step("export --tensorrt", "done", time.monotonic() - t0, f"{len(report.exports)} exports")

    t0 = time.monotonic()
    tests = subprocess.run([sys.executable, "-m", "pytest", "-q", "-m", "gpu", "tests/"], cwd=REPO_ROOT,
                           capture_output=True, text=True, timeout=max(30.0, min(180.0, left() - 60)))
    summary = (tests.stdout.strip().splitlines() or ["(no output)"])[-1]
    report.step("gpu-marked tests", "passed" if tests.returncode == 0 else "FAILED", time.monotonic() - t0, summary)

    for label, (providers, precision) in PROVIDER_SETS.items():
        served = {name: tags[precision][name] for name in MEASURED if name in tags[precision]}
        if not served:
            report.step(f"serve on {label}", "skipped", 0, f"no {precision} export with a verified engine")
            continue
        needed = len(served) * len(CLIENTS) * 2 * (seconds + 1) + 40
        if left() < needed:
            report.step(f"serve on {label}", "skipped", 0,
                        f"time budget spent ({left():.0f} s left, {needed:.0f} needed)")
            continue
        t0 = time.monotonic()
        serve_and_measure(label, providers, served, seconds, report)
        report.step(f"serve on {label}", "measured", time.monotonic() - t0, ", ".join(served))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--budget-s", type=float, default=540.0, help="time for the whole check (default 540)")
    p.add_argument("--seconds", type=float, default=5.0, help="load window per row")
    p.add_argument("--preflight", action="store_true", help="only say whether this host can run the check")
    p.add_argument("--after-install", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    reason = no_gpu_reason()
    if reason is not None:
        print(f"make gpu-check: {reason}. This check needs an NVIDIA GPU host; nothing was installed or written.",
              file=sys.stderr)
        return 2
    if args.preflight:
        print(f"make gpu-check: GPU found: {', '.join(nvidia_smi('name', 'driver_version') or [])}")
        return 0
    os.environ["BENTOML_HOME"] = str(WORK / "bentoml")  # the check's own store: the user's stays as it was
    if args.after_install:
        report = Report(**json.loads(RESULTS.read_text()))
        try:
            after_install(args.budget_s, args.seconds, report)
            report.finished = True
        finally:
            report.save()
        return 0

    start = time.monotonic()
    report = Report(facts=host_facts())
    report.step("host", "found", time.monotonic() - start, report.facts["gpu"])
    t0 = time.monotonic()
    report.step("install gpu extra", "done", time.monotonic() - t0, install_gpu_extra())
    import importlib

    importlib.invalidate_caches()
    report.facts = host_facts()  # now with onnxruntime-gpu and TensorRT
    report.save()
    left = args.budget_s - (time.monotonic() - start)
    return subprocess.run([sys.executable, "-m", "loadtest.gpu_check", "--after-install", "--budget-s", str(left),
                           "--seconds", str(args.seconds)], cwd=REPO_ROOT).returncode


if __name__ == "__main__":
    sys.exit(main())
