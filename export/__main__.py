"""Export training artifacts to ONNX, verify, optimize, and register them in the BentoML model store.

    python -m export artifacts/lenet5 artifacts/vgg_fc7 artifacts/char_lstm artifacts/char_gru [--int8]
    python -m export path/to/your_model --eval-data path/to/eval_images --int8     (docs/your-model.md)

Exit status: 0 all good; 1 an artifact failed (nothing of it registered); 3 fp32 registered but a
requested extra (INT8 accuracy gate) did not pass. See docs/export.md.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from export.fold import FoldError
from export.foreign import ForeignGraphError
from export.graph import GraphError
from export.parity import ParityError
from export.pipeline import Options, export_artifact
from export.store import StoreError
from models.card import CardError
from models.kinds import KindError

log = logging.getLogger("nnserve.export")

EXPECTED_ERRORS = (CardError, KindError, FoldError, ForeignGraphError, GraphError, ParityError, StoreError)


def parse_args(argv: list[str] | None = None) -> tuple[list[Path], Options]:
    p = argparse.ArgumentParser(prog="python -m export", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    defaults = Options()
    p.add_argument("artifacts", nargs="+", type=Path,
                   help="artifact directories: card.json + weights, or card.json + an ONNX file")
    p.add_argument("--eval-data", type=Path, default=None,
                   help="evaluation data for parity and the INT8 gate: images in one folder per label, or an .npz "
                        "(images, labels); text models: a UTF-8 text file")
    p.add_argument("--strict-fold", action="store_true",
                   help="a BatchNorm with no conv/linear to fold into is an error (default: a scale-and-shift)")
    p.add_argument("--make-batch-dynamic", action="store_true",
                   help="ONNX files made elsewhere: rewrite a fixed batch (1 or N) to a dynamic axis, then verify it")
    p.add_argument("--int8", action="store_true", help="also quantize to INT8 and register NAME-int8")
    p.add_argument("--int8-max-drop", type=float, default=defaults.int8_max_drop,
                   help="image models: largest top-1 drop (points) for which NAME-int8 is registered (default 1.0)")
    p.add_argument("--int8-max-bpc-increase", type=float, default=defaults.int8_max_bpc_increase,
                   help="language models: largest held-out bits/token increase for which NAME-int8 is registered")
    p.add_argument("--tensorrt", action="store_true", help="build a TensorRT engine if TensorRT and a CUDA GPU exist")
    p.add_argument("--fp16", action="store_true", help="TensorRT: allow FP16 kernels")
    p.add_argument("--max-batch", type=int, default=defaults.max_batch,
                   help="TensorRT optimization profile: batch 1..N")
    p.add_argument("--if-missing", action="store_true",
                   help="skip a model whose store already holds a version exported from the same artifact")
    p.add_argument("--max-abs-error", type=float, default=defaults.max_abs_error,
                   help="parity tolerance, scaled by an output's magnitude past 1 (default 1e-4)")
    p.add_argument("--bench-runs", type=int, default=defaults.bench_runs,
                   help="latency runs per batch size (median reported)")
    p.add_argument("--report-dir", type=Path, default=defaults.report_dir,
                   help="where NAME.json reports go (default: exported/ in the current directory)")
    p.add_argument("--no-register", action="store_true", help="verify and report only; leave the store alone")
    args = p.parse_args(argv)
    opts = Options(int8=args.int8, tensorrt=args.tensorrt, fp16=args.fp16, if_missing=args.if_missing,
                   max_abs_error=args.max_abs_error, int8_max_drop=args.int8_max_drop,
                   int8_max_bpc_increase=args.int8_max_bpc_increase,
                   bench_runs=args.bench_runs, max_batch=args.max_batch, report_dir=args.report_dir,
                   register=not args.no_register, eval_data=args.eval_data, strict_fold=args.strict_fold,
                   make_batch_dynamic=args.make_batch_dynamic)
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
