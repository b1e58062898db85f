"""Write an MLServer model repository serving the store's lenet5 ONNX file, for the bench's /v2 peer.

MLServer 1.7.1 pins fastapi < 0.116, which conflicts with the ``bench`` extra, so it runs from its own
virtual environment, ``.venv-mlserver``, which the bench creates itself (``launch.ensure_mlserver``) and
starts like every other peer, alone. By hand:

    python -m venv .venv-mlserver && .venv-mlserver/bin/pip install mlserver==1.7.1 onnxruntime==1.32.0 uvloop==0.21.0
    .venv/bin/python -m loadtest.baselines.mlserver /tmp/mlserver-models --workers 2 --max-batch 32 --wait-ms 1
    .venv-mlserver/bin/mlserver start /tmp/mlserver-models &               # HTTP on :8090

As MLServer's docs describe: ``parallel_workers`` inference processes (its default 1; one per core
swept), adaptive batching through the model's ``max_batch_size`` / ``max_batch_time``, ``debug`` off (no
access log lines, as nnserve ships).
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path
from typing import Any


def write_repository(folder: Path, tag: str, port: int, config) -> None:
    """The repository for ``config`` (launch.Config: workers = parallel_workers, max_batch, wait_ms)."""
    import bentoml

    model = bentoml.models.get(tag)
    metadata: dict[str, Any] = model.info.metadata
    (folder / "lenet5").mkdir(parents=True, exist_ok=True)
    shutil.copy(Path(__file__).with_name("onnx_runtime.py"), folder / "onnx_runtime.py")
    settings = {"http_port": port, "grpc_port": 0, "metrics_port": 0, "metrics_endpoint": None,
                "parallel_workers": config.workers, "debug": False, "host": "127.0.0.1"}
    (folder / "settings.json").write_text(json.dumps(settings))
    model_settings = {"name": "lenet5", "implementation": "onnx_runtime.OnnxModel",
                      "parameters": {"uri": model.path_of(metadata["onnx_file"]),
                                     "version": str(model.tag.version)}}
    if config.max_batch > 1:
        model_settings.update(max_batch_size=config.max_batch, max_batch_time=config.wait_ms / 1000)
    (folder / "lenet5" / "model-settings.json").write_text(json.dumps(model_settings))


def main(argv: list[str] | None = None) -> int:
    from loadtest.baselines.launch import Config

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("folder", type=Path, help="the model repository to write (MLServer's argument)")
    parser.add_argument("--tag", default="lenet5:latest", help="store tag of the model to serve as lenet5")
    parser.add_argument("--port", type=int, default=8090)
    parser.add_argument("--workers", type=int, default=1, help="parallel_workers")
    parser.add_argument("--max-batch", type=int, default=0, help="adaptive batching: max_batch_size (0: off)")
    parser.add_argument("--wait-ms", type=float, default=1.0, help="adaptive batching: max_batch_time in ms")
    args = parser.parse_args(argv)
    write_repository(args.folder, args.tag, args.port, Config("mlserver", args.workers, args.max_batch, args.wait_ms))
    print(f"MLServer repository for {args.tag} in {args.folder}: mlserver start {args.folder}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
