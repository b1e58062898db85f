"""Export training artifacts to ONNX, verify, optimize, and register them in the BentoML model store.

    python -m export artifacts/lenet5 artifacts/vgg_fc7 artifacts/char_lstm artifacts/char_gru [--int8]

Exit status: 0 all good; 1 an artifact failed (nothing of it registered); 3 fp32 registered but a
requested extra (INT8 accuracy gate) did not pass. See docs/export.md.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from export.fold import FoldError
from export.graph import GraphError
from export.parity import ParityError
from export.pipeline import Options, export_artifact
from export.samples import SampleError
from export.store import StoreError
from models.artifact import ArtifactError

log = logging.getLogger("nnserve.export")

EXPECTED_ERRORS = (ArtifactError, FoldError, GraphError, ParityError, SampleError, StoreError)


def parse_args(argv: list[str] | None = None) -> tuple[list[Path], Options]:
    p = argparse.ArgumentParser(prog="python -m export", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("artifacts", nargs="+", type=Path, help="training artifact directories (card.json + weights)")
    p.add_argument("--int8", action="store_true", help="also quantize to INT8 and register NAME-int8")
    p.add_argument("--int8-max-drop", type=float, default=1.0,
                   help="CNNs: largest top-1 drop (points) for which NAME-int8 is registered (default 1.0)")
    p.add_argument("--int8-max-bpc-increase", type=float, default=0.05,
                   help="char LMs: largest held-out bits/char increase for which NAME-int8 is registered")
    p.add_argument("--tensorrt", action="store_true", help="build a TensorRT engine if TensorRT and a CUDA GPU exist")
    p.add_argument("--fp16", action="store_true", help="TensorRT: allow FP16 kernels")
    p.add_argument("--max-batch", type=int, default=64, help="TensorRT optimization profile: batch 1..N")
    p.add_argument("--if-missing", action="store_true",
                   help="skip a model whose store already holds a version exported from the same artifact")
    p.add_argument("--max-abs-error", type=float, default=1e-4, help="parity tolerance (default 1e-4)")
    p.add_argument("--bench-runs", type=int, default=100, help="latency runs per batch size (median reported)")
    p.add_argument("--report-dir", type=Path, default=Path("exported"), help="where NAME.json reports go")
    p.add_argument("--no-register", action="store_true", help="verify and report only; leave the store alone")
    args = p.parse_args(argv)
    opts = Options(int8=args.int8, tensorrt=args.tensorrt, fp16=args.fp16, if_missing=args.if_missing,
                   max_abs_error=args.max_abs_error, int8_max_drop=args.int8_max_drop,
                   int8_max_bpc_increase=args.int8_max_bpc_increase,
                   bench_runs=args.bench_runs, max_batch=args.max_batch, report_dir=args.report_dir,
                   register=not args.no_register)
    return args.artifacts, opts


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S")
    artifacts, opts = parse_args(argv)
    status = 0
    for artifact in artifacts:
        try:
            result = export_artifact(artifact, opts)
        except EXPECTED_ERRORS as e:  # one bad artifact must not stop the others; the message names the problem
            log.error("%s: export FAILED, nothing registered: %s: %s", artifact, type(e).__name__, e)
            status = 1
            continue
        except Exception:  # a bug, not a bad artifact: keep the traceback
            log.exception("%s: export FAILED, nothing registered", artifact)
            status = 1
            continue
        for problem in result.problems:
            log.warning(problem)
            status = max(status, 3)
        for variant, tag in result.tags.items():
            print(f"{result.name} {variant}: {tag}", flush=True)
        for variant, why in result.skipped.items():
            print(f"{result.name} {variant}: skipped, {why}", flush=True)
    return status


if __name__ == "__main__":
    sys.exit(main())
