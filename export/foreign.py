"""Verify an ONNX file made elsewhere (another framework or team) before nnserve serves it.

There is no eager PyTorch module to compare against, so the certificate says exactly what was checked:
the ONNX checker and strict shape inference, that this onnxruntime loads it, the declared inputs and
outputs (names, side, dtype, rank), that batching rows gives the rows' own results (batch 1 vs batch N),
and, only when the user supplies one, parity with reference outputs from an ``.npz`` file.

What nnserve changes in the graph, each change verified against the original graph's outputs: dims
written as ``-1`` (PaddlePaddle, some converters: "unknown") become symbolic; a fixed batch becomes dynamic
when asked (``--make-batch-dynamic``); BatchNormalization nodes fold into the Conv/Gemm before them
(export/fold.py's graph pass), the others become Mul+Add. A graph needing none is copied byte for byte.

``declared`` maps graph tensor names to what the model card promises, e.g.::

    {"pixel_values": {"side": "input", "dtype": "float32", "rank": 4, "batch_axis": 0},
     "logits": {"side": "output", "dtype": "float32", "rank": 2, "batch_axis": 0}}

``batch_axis`` may be omitted (or None) for a tensor without one; ``shape`` (optional, None for any size) is
what the card feeds, checked against the graph's fixed sizes (``shape_from`` names the card fields that make
it). Every graph input must be declared (the service feeds each one); undeclared outputs are allowed and not
compared.

Only self-contained files are accepted: weights in external data files would not travel with the copy.
"""

from __future__ import annotations

import copy
import shutil
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
from onnx import external_data_helper

from export.graph import ONNX_DTYPES, io_specs
from export.parity import cpu_session

SERVED_DTYPES = tuple(ONNX_DTYPES.values())  # float32, int64, float16, int32
BATCH_DIM = "batch"
NO_REFERENCE = "none (ONNX file made elsewhere)"


class ForeignGraphError(ValueError):
    """The foreign graph cannot be served as declared; the message says what is wrong and what to do."""


# --- describing the graph in messages ---------------------------------------------------------------

def dtype_name(elem_type: int) -> str:
    return ONNX_DTYPES.get(elem_type) or onnx.TensorProto.DataType.Name(elem_type).lower()


def dims(value: onnx.ValueInfoProto) -> list[int | str] | None:
    """The shape with symbolic dims by name; None when the graph gives no shape at all."""
    tensor = value.type.tensor_type
    if not tensor.HasField("shape"):
        return None
    return [d.dim_value if d.HasField("dim_value") else (d.dim_param or "?") for d in tensor.shape.dim]


def graph_io(model: onnx.ModelProto) -> tuple[dict[str, onnx.ValueInfoProto], dict[str, onnx.ValueInfoProto]]:
    """Graph inputs (initializers excluded: old exporters list weights as inputs) and outputs by name."""
    initializers = {i.name for i in model.graph.initializer}
    return ({v.name: v for v in model.graph.input if v.name not in initializers},
            {v.name: v for v in model.graph.output})


def describe_io(model: onnx.ModelProto) -> str:
    inputs, outputs = graph_io(model)

    def line(values: dict[str, onnx.ValueInfoProto]) -> str:
        return ", ".join(f"{n} {dtype_name(v.type.tensor_type.elem_type)} {dims(v)}" for n, v in values.items())

    return f"graph inputs: {line(inputs) or 'none'}; graph outputs: {line(outputs) or 'none'}"


def reexport_hint(declared: dict[str, dict]) -> str:
    axes = {name: {spec["batch_axis"]: BATCH_DIM} for name, spec in declared.items()
            if spec.get("batch_axis") is not None}
    inputs = [name for name, spec in declared.items() if spec.get("side") == "input"]
    return (f"re-export with a dynamic batch axis: torch.onnx.export(..., dynamic_axes={axes}) "
            f"(or dynamic_shapes=... with the dynamo exporter), or tf2onnx --inputs "
            f"{','.join(f'{n}[-1,...]' for n in inputs)}")


# --- the checks ---------------------------------------------------------------------------------------

def inspect_graph(path: Path) -> onnx.ModelProto:
    """Full checker, strict type-checked shape inference, and an ORT CPU session; returns the inferred graph."""
    path = Path(path)
    if not path.is_file():
        raise ForeignGraphError(f"{path}: no such file: pass the path of the .onnx file to serve")
    try:
        onnx.checker.check_model(str(path), full_check=True)
    except onnx.checker.ValidationError as e:
        raise ForeignGraphError(f"{path.name}: the ONNX checker rejects it: {e}. Fix the graph at its source "
                                "and re-export it; nnserve serves only graphs that pass the checker") from e
    model = onnx.load(str(path), load_external_data=False)
    external = [t.name for t in model.graph.initializer if external_data_helper.uses_external_data(t)]
    if external:
        raise ForeignGraphError(f"{path.name}: {len(external)} weights (e.g. {external[0]!r}) live in external "
                                "data files, which would not travel with it: re-save it as one file with "
                                "onnx.save(onnx.load(path), path, save_as_external_data=False)")
    try:
        model = onnx.shape_inference.infer_shapes(model, check_type=True, strict_mode=True)
    except onnx.shape_inference.InferenceError as e:
        raise ForeignGraphError(f"{path.name}: strict shape inference fails: {e}. The graph's declared types or "
                                "shapes contradict its ops: fix them at the source and re-export") from e
    try:
        cpu_session(path)
    except Exception as e:  # ORT raises its own Fail/InvalidGraph/NotImplemented types; all mean "cannot load"
        opsets = {o.domain or "ai.onnx": o.version for o in model.opset_import}
        raise ForeignGraphError(f"{path.name}: onnxruntime {ort.__version__} cannot load it (IR version "
                                f"{model.ir_version}, opsets {opsets}): {e}. Re-export with an opset and IR "
                                "version this onnxruntime supports (nnserve's own exports use opset 17), using "
                                "only standard ONNX ops") from e
    return model


def check_io(model: onnx.ModelProto, declared: dict[str, dict]) -> dict:
    """Check the graph against ``declared``; returns {"inputs": [...], "outputs": [...]} as io_specs does."""
    inputs, outputs = graph_io(model)
    unsupported = [f"{n} ({dtype_name(v.type.tensor_type.elem_type)})" for n, v in {**inputs, **outputs}.items()
                   if v.type.tensor_type.elem_type not in ONNX_DTYPES]
    if unsupported:
        raise ForeignGraphError(f"unsupported tensor dtypes: {', '.join(unsupported)}; nnserve serves "
                                f"{', '.join(SERVED_DTYPES)}: cast them in the graph (e.g. re-export with "
                                "float32 instead of float64)")
    problems = []
    for name, spec in declared.items():
        side, want = spec.get("side"), spec.get("dtype")
        if side not in ("input", "output") or want not in SERVED_DTYPES or not isinstance(spec.get("rank"), int):
            problems.append(f"{name}: the declaration {spec} needs side 'input' or 'output', dtype one of "
                            f"{', '.join(SERVED_DTYPES)} and an integer rank: fix the card")
            continue
        value = (inputs if side == "input" else outputs).get(name)
        if value is None:
            if name in inputs or name in outputs:
                actual = "input" if name in inputs else "output"
                problems.append(f"{name}: declared as an {side} but the graph has it as an {actual}: fix its side "
                                "in the card")
            else:
                problems.append(f"{name}: declared {side} not in the graph: use the graph's names in the card")
            continue
        got = dtype_name(value.type.tensor_type.elem_type)
        if got != want:
            problems.append(f"{name}: declared {want} but the graph's {side} is {got}: fix the card's dtype "
                            "(or cast in the graph and re-export)")
        shape, axis = dims(value), spec.get("batch_axis")
        if shape is None:
            problems.append(f"{name}: the graph gives no shape for this {side}: re-export with shapes declared")
        elif len(shape) != spec["rank"]:
            problems.append(f"{name}: declared rank {spec['rank']} but the graph's {side} has rank {len(shape)} "
                            f"{shape}: fix the card's rank")
        elif axis is not None and not 0 <= axis < len(shape):
            problems.append(f"{name}: batch_axis {axis} is outside rank {len(shape)}: fix the card")
        elif len(spec.get("shape") or shape) == len(shape) and any(
                isinstance(have, int) and have > 0 and want is not None and have != want
                for have, want in zip(shape, spec.get("shape") or shape, strict=True)):
            problems.append(f"{name}: the graph's {side} is {shape} but the card makes "
                            f"{['N' if want is None else want for want in spec['shape']]}: fix the card "
                            f"({spec.get('shape_from', 'its sizes')}) to the graph's fixed sizes")
    undeclared = [n for n in inputs if n not in declared]
    if undeclared:
        problems.append(f"graph inputs {undeclared} are not declared: the service must feed every input, so "
                        "declare them in the card (or remove them from the graph)")
    if problems:
        raise ForeignGraphError("the graph does not match its declared inputs/outputs:\n  " +
                                "\n  ".join(problems) + f"\n{describe_io(model)}")
    specs_in, specs_out = io_specs(model)
    return {"inputs": specs_in, "outputs": specs_out}


def negative_dims(model: onnx.ModelProto) -> list[tuple[str, int]]:
    """Graph input/output dims written as a negative size, [(name, axis)]: PaddlePaddle (and some converters)
    write an unknown size, the dynamic batch included, as ``dim_value: -1``; onnxruntime reads it as dynamic."""
    inputs, outputs = graph_io(model)
    return [(name, axis) for name, value in {**inputs, **outputs}.items()
            for axis, d in enumerate(value.type.tensor_type.shape.dim) if d.HasField("dim_value") and d.dim_value < 0]


def symbolic_dims(model: onnx.ModelProto, declared: dict[str, dict]) -> onnx.ModelProto:
    """A copy whose ``-1`` dims are symbolic: ``batch`` on declared batch axes, ``<tensor>_<axis>`` elsewhere."""
    model = copy.deepcopy(model)
    values = {v.name: v for v in [*model.graph.input, *model.graph.output]}
    for name, axis in negative_dims(model):
        batch = declared.get(name, {}).get("batch_axis") == axis
        values[name].type.tensor_type.shape.dim[axis].dim_param = BATCH_DIM if batch else f"{name}_{axis}"
    del model.graph.value_info[:]  # inferred from the -1 signature; inferred again below
    try:
        onnx.checker.check_model(model, full_check=True)
        return onnx.shape_inference.infer_shapes(model, check_type=True, strict_mode=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as e:
        raise ForeignGraphError(f"with its -1 dims made symbolic the graph no longer checks: {e}. Re-export it "
                                "with named dynamic dims") from e


def fixed_batch_inputs(model: onnx.ModelProto, declared: dict[str, dict]) -> list[tuple[str, int, int]]:
    """Declared tensors (inputs and outputs) whose batch axis is a fixed size: [(name, axis, size)]. A dim that is
    symbolic, unnamed or written as -1 is dynamic."""
    inputs, outputs = graph_io(model)
    fixed = []
    for name, spec in declared.items():
        value, axis = {**inputs, **outputs}.get(name), spec.get("batch_axis")
        if value is None or axis is None:
            continue
        shape = value.type.tensor_type.shape.dim
        # check_io reports a bad axis
        if 0 <= axis < len(shape) and shape[axis].HasField("dim_value") and shape[axis].dim_value > 0:
            fixed.append((name, axis, shape[axis].dim_value))
    return fixed


def make_batch_dynamic(model: onnx.ModelProto, declared: dict[str, dict]) -> onnx.ModelProto:
    """A copy with every fixed declared batch dim made symbolic ("batch"), checked again.

    Only the graph's signature changes; whether its ops agree is what :func:`batch_consistency` verifies.
    """
    model = copy.deepcopy(model)
    values = {v.name: v for v in [*model.graph.input, *model.graph.output]}
    for name, axis, _ in fixed_batch_inputs(model, declared):
        values[name].type.tensor_type.shape.dim[axis].dim_param = BATCH_DIM  # clears dim_value (a oneof)
    # Intermediate shapes were inferred for the fixed batch; stale ones would contradict the new signature.
    del model.graph.value_info[:]
    try:
        onnx.checker.check_model(model, full_check=True)
        model = onnx.shape_inference.infer_shapes(model, check_type=True, strict_mode=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as e:
        raise ForeignGraphError(f"with a dynamic batch axis the graph no longer checks: {e}. The batch size is "
                                f"baked into the graph's ops; {reexport_hint(declared)}") from e
    # Inference merges what the ops compute into the outputs: a batch still fixed there comes from the ops.
    still_fixed = fixed_batch_inputs(model, declared)
    if still_fixed:
        raise ForeignGraphError(baked_message(still_fixed, declared))
    return model


def baked_message(fixed: list[tuple[str, int, int]], declared: dict[str, dict]) -> str:
    name, axis, size = fixed[0]
    return (f"shape inference gives output {name} a fixed batch of {size} (axis {axis}) from dynamic-batch inputs: "
            f"the batch size of {size} is baked into the graph's ops (e.g. a Reshape to a constant shape), so no "
            f"rewrite of its signature can fix it; {reexport_hint(declared)}")


def batch_consistency(path: Path, declared: dict[str, dict], feeds_for_batch: Callable[[int], dict[str, np.ndarray]],
                      batch: int = 5, tolerance: float = 1e-4) -> dict:
    """Run ``feeds_for_batch(batch)`` row by row (batch 1) and all at once (batch N) in ORT CPU; every
    declared output with a batch axis must agree row for row within ``tolerance`` (max abs error)."""
    session = cpu_session(path)
    feeds = feeds_for_batch(batch)
    names = [i.name for i in session.get_inputs()]
    if set(feeds) != set(names):
        raise ForeignGraphError(f"feeds_for_batch gives {sorted(feeds)} but the graph's inputs are {names}: "
                                "return exactly one array per graph input")
    axis_of = {name: spec.get("batch_axis") for name, spec in declared.items()}
    for name, array in feeds.items():
        axis = axis_of.get(name)
        if axis is not None and array.shape[axis] != batch:
            raise ForeignGraphError(f"feeds_for_batch({batch}) gives {name} of shape {array.shape}: its batch "
                                    f"axis {axis} must have size {batch}")

    def row(name: str, array: np.ndarray, i: int) -> np.ndarray:
        axis = axis_of.get(name)
        return array if axis is None else np.ascontiguousarray(np.take(array, [i], axis=axis))

    out_names = [o.name for o in session.get_outputs()]
    try:
        rows = [session.run(None, {n: row(n, a, i) for n, a in feeds.items()}) for i in range(batch)]
    except Exception as e:  # ORT's own exception types
        raise ForeignGraphError(f"{Path(path).name} fails at batch 1 on rows of feeds_for_batch({batch}): {e}. "
                                "Check the feeds' dtypes and shapes against the graph's inputs") from e
    try:
        together = session.run(None, feeds)
    except Exception as e:
        raise ForeignGraphError(f"{Path(path).name} runs at batch 1 but fails at batch {batch}: {e}. The batch "
                                f"size of 1 is baked into the graph's ops (e.g. a Reshape to [1, ...]); "
                                f"{reexport_hint(declared)}") from e
    compared = {}
    for k, name in enumerate(out_names):
        axis = axis_of.get(name)
        if declared.get(name, {}).get("side") != "output" or axis is None:
            continue  # undeclared outputs are not served; without a batch axis there are no rows
        alone = np.concatenate([r[k] for r in rows], axis=axis)
        if alone.shape != together[k].shape:
            raise ForeignGraphError(f"output {name}: {batch} rows run alone give shape {alone.shape} but batch "
                                    f"{batch} gives {together[k].shape}: the batch size of 1 is baked into the "
                                    f"graph's ops; {reexport_hint(declared)}")
        diff = np.abs(together[k].astype(np.float64) - alone)
        worst = np.unravel_index(int(np.argmax(diff)), diff.shape)
        compared[name] = {"max_abs": float(diff.max()), "max_rel": float(diff.max()) / max(float(np.abs(alone).max()),
                                                                                           1e-12),
                          "worst_row": int(worst[axis])}
    if not compared:
        raise ForeignGraphError("no declared output has a batch_axis, so batching cannot be verified: declare "
                                "the outputs the service reads, with their batch_axis")
    name, err = max(compared.items(), key=lambda item: item[1]["max_abs"])
    if not err["max_abs"] <= tolerance:  # "not <=" so NaN fails too
        raise ForeignGraphError(f"output {name} row {err['worst_row']} differs by {err['max_abs']:.3g} (tolerance "
                                f"{tolerance:g}) between running it alone and in a batch of {batch}: the batch "
                                f"size of 1 is baked into the graph's ops; {reexport_hint(declared)}")
    return {"check": f"batch consistency: {batch} rows alone (batch 1) vs together (batch {batch}), ORT CPU",
            "batch": batch, "tolerance_max_abs": tolerance, "outputs": compared, "passed": True}


def fold_batchnorm(model: onnx.ModelProto, strict_fold: bool = False) -> tuple[onnx.ModelProto, dict]:
    """export/fold.py's graph pass on a foreign graph: each BatchNormalization after a Conv/Gemm (whose output
    feeds nothing else, with constant weights) folds into it; any other becomes Mul+Add (a FoldError with
    ``strict_fold``). Returns the graph and what was done, by node; BNs inside subgraphs (If/Loop) stay."""
    from export.fold import fold_batchnorm_onnx

    count = sum(n.op_type == "BatchNormalization" for n in model.graph.node)
    if not count:
        return model, {"batchnorm_nodes": 0}
    reasons: dict[str, str] = {}
    folded_model, folded, scale_shift = fold_batchnorm_onnx(model, strict_fold, reasons)
    try:
        onnx.checker.check_model(folded_model, full_check=True)
        folded_model = onnx.shape_inference.infer_shapes(folded_model, check_type=True, strict_mode=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as e:  # a bug of ours, said so
        raise ForeignGraphError(f"folding BatchNormalization made a graph that fails the checker ({e}); rerun "
                                "with --strict-fold to see which node, and report it") from e
    return folded_model, {"batchnorm_nodes": count, "batchnorm_folded": folded, "batchnorm_scale_shift": scale_shift,
                          "not_folded_because": reasons}


def rewrite_parity(original: Path, rewritten: Path, declared: dict[str, dict], feeds: dict[str, np.ndarray],
                   tolerance: float) -> dict:
    """The rewritten graph against the user's original on the same inputs (ORT CPU): every declared output within
    ``tolerance`` x max(1, max |output|) (folding reorders float arithmetic; float32 spacing grows with size)."""
    def run(path: Path) -> dict[str, np.ndarray]:
        session = cpu_session(path)
        return dict(zip([o.name for o in session.get_outputs()], session.run(None, feeds), strict=True))

    want, got = run(original), run(rewritten)
    compared = {}
    for name, spec in declared.items():
        if spec.get("side") != "output":
            continue
        diff = float(np.abs(got[name].astype(np.float64) - want[name]).max()) if want[name].size else 0.0
        bound = tolerance * max(1.0, float(np.abs(want[name]).max()) if want[name].size else 0.0)
        compared[name] = {"max_abs": diff, "bound": bound}
        if not diff <= bound:
            raise ForeignGraphError(f"after nnserve's rewrite (BatchNorm folding, dims) output {name} differs from "
                                    f"the original graph's by {diff:.3g} (bound {bound:.3g}): nothing registered; "
                                    "rerun with --strict-fold to see the nodes involved, and report it")
    return {"check": "rewritten graph vs the original graph, same inputs, ORT CPU",
            "batch": next(iter(feeds.values())).shape[0] if feeds else None, "outputs": compared, "passed": True}


def load_reference(path: Path) -> dict[str, np.ndarray]:
    try:
        with np.load(path, allow_pickle=False) as data:  # never unpickle a user's file
            return {key: data[key] for key in data.files}
    except (OSError, ValueError, zipfile.BadZipFile, AttributeError) as e:
        # AttributeError: np.load of a plain .npy (no .files); ValueError: object arrays that need pickle.
        raise ForeignGraphError(f"{path}: not a readable .npz of plain numeric arrays ({e}): save it with "
                                "np.savez(path, **{name: array}) using graph input and output names") from e


def reference_parity(path: Path, reference_npz: Path, declared: dict[str, dict], tolerance: float = 1e-4) -> dict:
    """Run the npz's inputs and compare every output it holds.

    The npz convention: keys are graph tensor names; every graph input must be present, and each other key
    must be a graph output (the expected values). Errors: max abs, and max rel = max abs / max |reference|.
    """
    reference = load_reference(Path(reference_npz))
    session = cpu_session(path)
    inputs, outputs = [i.name for i in session.get_inputs()], [o.name for o in session.get_outputs()]
    graph_names = f"graph inputs {inputs}, outputs {outputs}"
    unknown = [k for k in reference if k not in inputs + outputs]
    missing = [n for n in inputs if n not in reference]
    expected = [n for n in outputs if n in reference]
    if unknown or missing or not expected:
        what = (f"names unknown tensors {unknown}" if unknown else f"lacks inputs {missing}" if missing
                else "holds no graph output to compare")
        raise ForeignGraphError(f"{Path(reference_npz).name} {what}: its keys must be the {graph_names}, "
                                "with every input and at least one output")
    try:
        got = dict(zip(outputs, session.run(None, {n: reference[n] for n in inputs}), strict=True))
    except Exception as e:  # ORT's own exception types
        specs = {i.name: (i.type, i.shape) for i in session.get_inputs()}
        raise ForeignGraphError(f"the graph fails on the inputs of {Path(reference_npz).name}: {e}. Save them with "
                                f"the graph's input types and shapes: {specs}") from e
    compared: dict[str, dict[str, Any]] = {}
    for name in expected:
        ref = reference[name]
        if ref.shape != got[name].shape:
            raise ForeignGraphError(f"output {name}: reference shape {ref.shape} but the graph gives "
                                    f"{got[name].shape} for the npz's inputs: regenerate the reference")
        diff = np.abs(got[name].astype(np.float64) - ref)
        worst = np.unravel_index(int(np.argmax(diff)), diff.shape) if diff.size else ()
        axis = declared.get(name, {}).get("batch_axis")
        max_abs = float(diff.max()) if diff.size else 0.0
        compared[name] = {"max_abs": max_abs,
                          "max_rel": max_abs / max(float(np.abs(ref).max()) if ref.size else 0.0, 1e-12),
                          "worst_row": int(worst[axis]) if axis is not None and worst else None,
                          "worst_element": [int(i) for i in worst]}
    name, err = max(compared.items(), key=lambda item: item[1]["max_abs"])
    summary = {"worst_output": name, "max_abs": err["max_abs"], "max_rel": max(e["max_rel"] for e in compared.values())}
    if not err["max_abs"] <= tolerance:
        raise ForeignGraphError(f"reference parity FAILED: output {name} max abs error {err['max_abs']:.3g} "
                                f"(tolerance {tolerance:g}), max rel error {err['max_rel']:.3g}, at batch row "
                                f"{err['worst_row']}, element {tuple(err['worst_element'])}: the graph does not "
                                f"reproduce {Path(reference_npz).name}; check that both come from the same model "
                                "and preprocessing")
    return {"check": f"reference parity with {Path(reference_npz).name}, ORT CPU", "tolerance_max_abs": tolerance,
            **summary, "outputs": compared, "passed": True}


# --- the whole flow -----------------------------------------------------------------------------------

def prepare_foreign(src: Path, dst: Path, declared: dict[str, dict],
                    feeds_for_batch: Callable[[int], dict[str, np.ndarray]], make_dynamic: bool,
                    reference_npz: Path | None, tolerance: float = 1e-4, strict_fold: bool = False) -> dict:
    """Verify ``src``, write it (``-1`` dims made symbolic, batch axis made dynamic if asked and needed,
    BatchNorm folded) to ``dst``; returns the certificate.

    Everything is verified on the temp file that is then renamed to ``dst``, so ``dst`` is only ever the
    checked graph. Raises :class:`ForeignGraphError` on the first failed check.
    """
    src, dst = Path(src), Path(dst)
    model = inspect_graph(src)
    opsets = {o.domain or "ai.onnx": o.version for o in model.opset_import}
    checks = [{"check": "onnx.checker full_check + strict type-checked shape inference", "passed": True,
               "ir_version": model.ir_version, "opsets": opsets, "nodes": len(model.graph.node)},
              {"check": f"loads in onnxruntime {ort.__version__} CPU", "passed": True}]
    io = check_io(model, declared)
    checks.append({"check": "declared inputs/outputs: names, side, dtype, rank; every input declared",
                   "declared": sorted(declared), "passed": True})
    negative = negative_dims(model)
    if negative:  # -1 means "unknown" to onnxruntime: the batch written so is dynamic, not a batch of -1
        model = symbolic_dims(model, declared)
        checks.append({"check": "dims written as -1 made symbolic (dynamic)", "dims": [list(d) for d in negative],
                       "passed": True})
    fixed = fixed_batch_inputs(model, declared)  # on the inferred graph: outputs show what the ops compute
    fixed_inputs = [f for f in fixed if declared[f[0]]["side"] == "input"]
    if fixed and not fixed_inputs:
        raise ForeignGraphError(baked_message(fixed, declared))
    if fixed and not make_dynamic:
        name, axis, size = fixed_inputs[0]
        raise ForeignGraphError(f"the graph has a fixed batch of {size} on input {name} (axis {axis}; all fixed: "
                                f"{fixed}); nnserve batches requests, so it needs a dynamic batch axis. Either "
                                "pass --make-batch-dynamic (or set \"make_batch_dynamic\": true in the card's "
                                "\"onnx\") to let nnserve rewrite the batch axis and verify the rewrite (batch 1 vs "
                                f"batch N); or {reexport_hint(declared)}")
    checks.append({"check": "batch axes dynamic", "fixed_batch_axes": [list(f) for f in fixed],
                   "made_dynamic": bool(fixed), "passed": True})
    if fixed:
        model = make_batch_dynamic(model, declared)
    model, folding = fold_batchnorm(model, strict_fold)
    rewritten = bool(negative or fixed or folding.get("batchnorm_folded") or folding.get("batchnorm_scale_shift"))

    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(f".{dst.name}.tmp")  # same filesystem as dst, so the rename is atomic
    try:
        if rewritten:
            onnx.save(model, str(tmp))
            io = check_io(model, declared)  # the served signature: batch dims now -1
            # The original runs at its own batch (a fixed one, or 2 rows); the rewrite must give its outputs.
            feeds = feeds_for_batch(fixed_inputs[0][2] if fixed_inputs else 2)
            checks.append(rewrite_parity(src, tmp, declared, feeds, tolerance))
        else:
            shutil.copyfile(src, tmp)  # byte for byte: nothing of ours added to their graph
        checks.append(batch_consistency(tmp, declared, feeds_for_batch, tolerance=tolerance))
        if reference_npz is not None:
            checks.append(reference_parity(tmp, Path(reference_npz), declared, tolerance))
        else:
            checks.append({"check": "reference parity", "skipped": "no reference .npz supplied: outputs are "
                           "verified consistent across batch sizes, not correct", "passed": None})
        tmp.replace(dst)
    finally:
        tmp.unlink(missing_ok=True)
    return {"source": str(src),
            "reference": f"reference outputs from {reference_npz}" if reference_npz is not None else NO_REFERENCE,
            "runtime": f"onnxruntime {ort.__version__} CPU", "checks": checks, "io": io,
            "batch_made_dynamic": bool(fixed), "unknown_dims_made_symbolic": [list(d) for d in negative],
            "folding": folding, "passed": True}
