"""Write an MLServer model repository serving the store's lenet5 ONNX file, for the bench's /v2 peer.

MLServer 1.7.1 pins fastapi < 0.116, which conflicts with the ``bench`` extra, so it lives in its own
virtual environment and is started by hand (docs/bench.md, "MLServer"):

    python -m venv /tmp/mlserver-venv && /tmp/mlserver-venv/bin/pip install mlserver==1.7.1 onnxruntime
    .venv/bin/python -m loadtest.baselines.mlserver /tmp/mlserver-models      # uses BENTOML_HOME's lenet5
    /tmp/mlserver-venv/bin/mlserver start /tmp/mlserver-models &               # HTTP on :8090
    .venv/bin/python -m loadtest.bench --mlserver-url http://127.0.0.1:8090 ...

``parallel_workers`` is 0 (inference in the server process): with 1 or more, MLServer 1.7.1's worker
crashed here at start ("There is no current event loop in thread").
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("folder", type=Path, help="the model repository to write (MLServer's argument)")
    parser.add_argument("--tag", default="lenet5:latest", help="store tag of the model to serve as lenet5")
    parser.add_argument("--port", type=int, default=8090)
    args = parser.parse_args(argv)
    import bentoml

    model = bentoml.models.get(args.tag)
    (args.folder / "lenet5").mkdir(parents=True, exist_ok=True)
    shutil.copy(Path(__file__).with_name("onnx_runtime.py"), args.folder / "onnx_runtime.py")
    settings = {"http_port": args.port, "grpc_port": args.port + 1, "metrics_port": args.port + 2,
                "parallel_workers": 0}
    (args.folder / "settings.json").write_text(json.dumps(settings))
    (args.folder / "lenet5" / "model-settings.json").write_text(json.dumps(
        {"name": "lenet5", "implementation": "onnx_runtime.OnnxModel",
         "parameters": {"uri": model.path_of(model.info.metadata["onnx_file"]), "version": str(model.tag.version)}}))
    print(f"MLServer repository for {model.tag} in {args.folder}: mlserver start {args.folder}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
