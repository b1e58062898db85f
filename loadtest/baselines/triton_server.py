"""Baseline: Triton Inference Server itself, as the ``nvidia-pytriton`` wheel ships it (Triton 2.51.0,
``pytriton/tritonserver/bin/tritonserver``), serving store models over KServe v2 HTTP (binary tensor
extension, as Triton's clients send) and gRPC, on CPU.

Configured as Triton's docs advise for throughput (model configuration guide, "Dynamic Batcher" and
"Instance Groups"; what Model Analyzer sweeps): ``max_batch_size`` 32, ``dynamic_batching`` with
``max_queue_delay_microseconds`` swept (off = Triton's default scheduler, one request per execution),
``instance_group`` of 1 or 2 ``KIND_CPU`` instances, and per instance cores / instances ORT intra-op
threads, passed as the model's ``parameters`` under the names Triton's ORT backend takes. Triton's own
HTTP (libevhtp) and gRPC front ends, its scheduler and batcher; the model runs in its Python backend
(``triton_model.py``: ONNX Runtime on the store entry's model.onnx), because the wheel does not ship the
native ONNX Runtime backend.

It runs from its own venv, ``.venv-triton`` (``ensure_triton`` creates it: ``nvidia-pytriton==0.7.0`` and
nnserve's onnxruntime), because the wheel's Python-backend stub is built against numpy 1.x and nnserve
pins numpy 2 (with numpy 2 every output tensor comes back empty). By hand:

    .venv/bin/python -m loadtest.baselines.triton_server /tmp/triton-repo --model lenet5 --instances 2 --wait-ms 1
    # creates .venv-triton when missing, writes the repository, prints the tritonserver command line

Three things the wheel's Python backend needs that PyTriton itself sets up: the stub for this Python
version next to ``libtriton_python.so`` (copied into the repository's ``backends/python``) with the wheel's
bundled libraries on ``LD_LIBRARY_PATH``; the interpreter's own libpython first on ``LD_LIBRARY_PATH`` (the
stub links ``libpython3.X.so.1.0``: with the system's found first, the stub mixes two Python runtimes and
dies in ``multiprocessing.resource_tracker``); and the venv's ``bin`` first on ``PATH``: the stub's
embedded interpreter takes its ``sys.executable``, and so its site-packages, from ``PATH`` (it ignores
``PYTHONPATH``).
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import sysconfig
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from harness.server import REPO_ROOT

MAX_BATCH = 32
# Triton Inference Server 2.51.0 in the nvidia-pytriton wheel. Its Python-backend stub is built against
# numpy 1.x (the wheel pins numpy<2; with numpy 2 every output tensor comes back empty) and nnserve pins
# numpy 2, so Triton runs from its own venv, as MLServer does, with the ORT nnserve runs.
TRITON_VENV = REPO_ROOT / ".venv-triton"
TRITON_PINS = ("nvidia-pytriton==0.7.0", "onnxruntime==1.32.0")
MODELS_VARIABLE = "BASELINE_TRITON_MODELS"  # comma-separated store names the peer serves (default lenet5)
HTTP_STACK = "Triton's own C++ front ends (HTTP: libevhtp; gRPC), the model in its Python backend"
DTYPES = {"float32": "TYPE_FP32", "float16": "TYPE_FP16", "int64": "TYPE_INT64", "int32": "TYPE_INT32"}
PY_VERSION = f"{sys.version_info.major}.{sys.version_info.minor}"


def triton_home(venv: Path = TRITON_VENV) -> Path | None:
    """The wheel's ``tritonserver`` folder in Triton's venv, or None when it is not installed there."""
    home = venv / "lib" / f"python{PY_VERSION}" / "site-packages" / "pytriton" / "tritonserver"
    return home if (home / "bin" / "tritonserver").exists() else None


def stub_path(home: Path) -> Path:
    return home / "python_backend_stubs" / PY_VERSION / "triton_python_backend_stub"


def libpython_dir() -> str | None:
    """This interpreter's shared libpython's folder (the venvs share the base interpreter), or None."""
    libdir = sysconfig.get_config_var("LIBDIR") or ""
    return libdir if (Path(libdir) / str(sysconfig.get_config_var("INSTSONAME") or "")).exists() else None


def ensure_triton(venv: Path = TRITON_VENV) -> str | None:
    """Create Triton's venv (TRITON_PINS) if it is missing or stale; None when the peer can run, else why not."""
    from loadtest.baselines.venvs import own_venv

    if libpython_dir() is None:
        return (f"this interpreter has no shared libpython in {sysconfig.get_config_var('LIBDIR')!r}, which "
                "Triton's Python-backend stub links: use a Python built with --enable-shared")
    problem = own_venv(venv, TRITON_PINS, triton_home(venv) is not None)
    if problem is not None:
        return problem
    home = triton_home(venv)
    if home is None:
        return f"{venv}: no pytriton/tritonserver/bin/tritonserver after pip install {' '.join(TRITON_PINS)}"
    if not stub_path(home).exists():
        return f"{TRITON_PINS[0]} has no Python-backend stub for Python {PY_VERSION}"
    return None


@dataclass(frozen=True)
class ModelSpec:
    """What config.pbtxt needs of one store entry: its name, ONNX file and tensors (store metadata)."""

    name: str
    onnx_file: str
    inputs: list[dict]
    outputs: list[dict]

    @classmethod
    def from_store(cls, name: str, tag: str) -> ModelSpec:
        import bentoml

        entry = bentoml.models.get(tag)
        meta: dict[str, Any] = entry.info.metadata
        return cls(name, entry.path_of(meta["onnx_file"]), meta["inputs"], meta["outputs"])


def tensor_block(tensors: list[dict]) -> str:
    """config.pbtxt tensors: the batch axis left out (``max_batch_size`` > 0 makes it implicit)."""
    return ",\n".join(f'  {{ name: "{t["name"]}", data_type: {DTYPES[t["dtype"]]}, '
                      f'dims: [ {", ".join(str(d) for d in t["shape"][1:])} ] }}' for t in tensors)


def model_config(spec: ModelSpec, instances: int, max_batch: int, wait_ms: float, threads: int) -> str:
    """config.pbtxt: ``max_batch`` 0 = batching off (Triton's default scheduler, still batch-shaped tensors)."""
    batching = "" if not max_batch else (
        f"dynamic_batching {{ max_queue_delay_microseconds: {round(wait_ms * 1000)} }}\n")
    parameters = {"onnx_file": spec.onnx_file, "intra_op_thread_count": str(threads),
                  "inter_op_thread_count": "1"}
    return (f'name: "{spec.name}"\nbackend: "python"\nmax_batch_size: {MAX_BATCH}\n'
            f"input [\n{tensor_block(spec.inputs)}\n]\noutput [\n{tensor_block(spec.outputs)}\n]\n"
            f"{batching}instance_group [ {{ count: {instances}, kind: KIND_CPU }} ]\n"
            + "".join(f'parameters: {{ key: "{k}", value: {{ string_value: "{v}" }} }}\n'
                      for k, v in parameters.items()))


def installed_home() -> Path:
    home = triton_home()
    if home is None:
        raise RuntimeError(f"Triton is not installed in {TRITON_VENV}: loadtest.baselines.triton_server.ensure_triton "
                           "creates it (the bench does)")
    return home


def write_repository(folder: Path, specs: list[ModelSpec], instances: int, max_batch: int, wait_ms: float,
                     threads: int) -> None:
    """The model repository (one folder per model, version 1) and the Python backend beside it."""
    home = installed_home()
    backend = folder / "backends" / "python"
    backend.mkdir(parents=True, exist_ok=True)
    for name in ("libtriton_python.so", "triton_python_backend_utils.py"):
        shutil.copy2(home / "backends" / "python" / name, backend / name)
    shutil.copy2(stub_path(home), backend / "triton_python_backend_stub")
    for spec in specs:
        version = folder / "models" / spec.name / "1"
        version.mkdir(parents=True, exist_ok=True)
        shutil.copy2(Path(__file__).with_name("triton_model.py"), version / "model.py")
        (version.parent / "config.pbtxt").write_text(model_config(spec, instances, max_batch, wait_ms, threads))


def served_specs(environ: dict[str, str] | os._Environ[str]) -> list[ModelSpec]:
    """The models ``BASELINE_TRITON_MODELS`` names (default lenet5), each at its ``BASELINE_<NAME>_TAG``."""
    from loadtest.baselines.common import tag_variable

    names = [n.strip() for n in environ.get(MODELS_VARIABLE, "lenet5").split(",") if n.strip()]
    return [ModelSpec.from_store(n, environ.get(tag_variable(n), f"{n}:latest")) for n in names]


def command(folder: Path, http_port: int, grpc_port: int) -> list[str]:
    home = installed_home()
    return [str(home / "bin" / "tritonserver"), f"--model-repository={folder / 'models'}",
            f"--backend-directory={folder / 'backends'}", f"--cache-directory={home / 'caches'}",
            f"--http-port={http_port}", f"--grpc-port={grpc_port}", "--grpc-address=127.0.0.1",
            "--http-address=127.0.0.1", "--allow-metrics=false", "--log-verbose=0", "--exit-on-error=true",
            "--model-control-mode=none", "--strict-readiness=true", "--disable-auto-complete-config"]


def environment(base: dict[str, str] | None = None) -> dict[str, str]:
    """LD_LIBRARY_PATH with this interpreter's libpython dir first, then the wheel's bundled libraries; this
    venv's bin first on PATH (as PyTriton runs it)."""
    base = dict(os.environ if base is None else base)
    # The wheel's bundled libraries: the stub finds them through an RPATH relative to where the wheel put it,
    # which its copy in the repository loses (PyTriton puts them on the path too).
    bundled = str(installed_home().parents[1] / "nvidia_pytriton.libs")
    return {"LD_LIBRARY_PATH": os.pathsep.join(filter(None, (libpython_dir(), bundled,
                                                             base.get("LD_LIBRARY_PATH", "")))),
            "PATH": os.pathsep.join((str(TRITON_VENV / "bin"), base.get("PATH", "")))}


def main(argv: list[str] | None = None) -> int:
    from loadtest.baselines.common import tag_variable

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("folder", type=Path, help="where to write the repository (models/, backends/)")
    parser.add_argument("--model", action="append", default=[], help="store name to serve (repeatable)")
    parser.add_argument("--instances", type=int, default=1, help="instance_group count (KIND_CPU)")
    parser.add_argument("--max-batch", type=int, default=MAX_BATCH, help="dynamic batching (0: off)")
    parser.add_argument("--wait-ms", type=float, default=1.0, help="max_queue_delay in ms")
    parser.add_argument("--threads", type=int, default=0, help="ORT intra-op threads (0: cores / instances)")
    args = parser.parse_args(argv)
    why = ensure_triton()
    if why:
        parser.error(why)
    names = args.model or ["lenet5"]
    specs = [ModelSpec.from_store(n, os.environ.get(tag_variable(n), f"{n}:latest")) for n in names]
    threads = args.threads or max(1, (os.cpu_count() or 1) // args.instances)
    write_repository(args.folder, specs, args.instances, args.max_batch, args.wait_ms, threads)
    env = " ".join(f"{k}={v}" for k, v in environment().items())
    print(f"{env} {' '.join(command(args.folder, 8000, 8001))}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
