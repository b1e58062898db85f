"""Image kinds: ``image_classifier`` (image -> class scores) and ``image_feature_extractor`` (image -> an
embedding, plus class scores when the card has labels).

Tensor roles: ``image`` [B, C, H, W] float32 in; ``scores`` [B, classes] and ``features`` [B, D] out; every
tensor is batched along axis 0. The scores are logits, probabilities or log-probabilities as the card says
(``scores``): the service applies softmax to logits only, never twice.

Export wraps the user's module so the graph has named outputs whatever ``forward`` returns (a tensor, a
tuple, or a dict-like output object such as transformers' ``ImageClassifierOutput``); a feature layer is
taken by module path with a forward hook, or by name from ``forward``'s result.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import numpy as np

from models.kinds.base import FrontEnd, Kind, KindError, errors, summarize
from models.preprocess import input_hw

BATCH_SIZES = (1, 7, 64)
EVAL_IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"}


@dataclass
class ImageSamples:
    x_eval: np.ndarray  # float32 [N, C, H, W], preprocessed as the card says
    y_eval: np.ndarray | None  # int64 [N] class indices, None when only random inputs exist
    x_calibration: np.ndarray | None  # float32, for INT8 calibration
    source: str  # where the images came from, for the certificate


class ImageClassifier(Kind):
    name = "image_classifier"
    endpoints: ClassVar[tuple[str, ...]] = ("/classify",)
    feature_output = False  # graphs of this kind expose an embedding output

    # ---- serving --------------------------------------------------------------------------------------

    # Encoded image files, one per batch row ([N, 1], or [N]): /classify's decode and preprocessing, then the
    # network, in the same dynamic batches as its float input.
    front_end: ClassVar[FrontEnd | None] = FrontEnd(
        suffix="image", role="image", input="image", input_shape=(-1, 1), batched=True,
        description="encoded image files (PNG, JPEG, ...), one per batch row: decoded and preprocessed as the "
                    "model card says, then run through the network")

    def input_layout(self, metadata: dict, tensor: str) -> str | None:
        if tensor != metadata["roles"].get("image"):
            return None
        return "NHWC" if metadata["preprocessing"].get("layout") == "NHWC" else "NCHW"

    def output_labels(self, metadata: dict, output: str) -> list[str] | None:
        return metadata.get("labels") if output == metadata["roles"].get("scores") else None

    def describe(self, metadata: dict) -> dict:
        out = {"labels": metadata.get("labels"), "scores": metadata.get("scores"),
               "preprocessing": metadata["preprocessing"]}
        if "features" in metadata["roles"]:
            out["feature_dim"] = metadata.get("feature_dim")
        return out

    # ---- card and network -------------------------------------------------------------------------------

    def check_card(self, card: dict) -> None:
        from models.preprocess import PreprocessingError, validate_spec

        try:
            validate_spec(card["preprocessing"])
        except PreprocessingError as e:
            raise KindError(f"card preprocessing: {e}") from e

    def input_shape(self, card: dict, batch: int) -> tuple[int, ...]:
        """The model's input shape for ``batch`` images, in the spec's layout (NCHW, or NHWC)."""
        spec = card["preprocessing"]
        height, width = input_hw(spec)
        channels = spec["channels"]
        return (batch, height, width, channels) if spec.get("layout") == "NHWC" else (batch, channels, height, width)

    def export_wrapper(self, model, card: dict):
        """The user's module with named outputs: ``scores`` (+ the feature output)."""
        import torch
        from torch import nn

        scores_name = card.get("scores", "logits")  # the graph output is named after what it holds
        features = card.get("features")
        has_scores = "labels" in card
        select = card.get("output")

        class ImageWrapper(nn.Module):
            input_names = ["input"]
            scores_output = scores_name if has_scores else None
            output_names = ([scores_name] if has_scores else []) + ([features.get("name", "features")]
                                                                    if features else [])

            def __init__(self, inner: nn.Module) -> None:
                super().__init__()
                self.model = inner
                self._captured: list[torch.Tensor] = []
                if features and "module" in features:
                    layer = module_at(inner, features["module"])
                    layer.register_forward_hook(lambda _m, _i, out: self._captured.append(out))

            def forward(self, x: torch.Tensor):
                self._captured.clear()
                result = self.model(x)
                outs = []
                if has_scores:
                    outs.append(pick_output(result, select, "output"))
                if features:
                    if "module" in features:
                        if not self._captured:
                            raise KindError(f"features.module {features['module']!r} did not run in forward()")
                        feature = self._captured[-1]
                    else:
                        feature = pick_output(result, features["output"], "features.output")
                    outs.append(torch.flatten(feature, 1))
                return outs[0] if len(outs) == 1 else tuple(outs)

        return ImageWrapper(model).eval()

    def example_inputs(self, wrapper, card: dict, batch: int = 2) -> tuple:
        import torch

        return (torch.zeros(self.input_shape(card, batch)),)

    def dynamic_axes(self, wrapper) -> dict:
        return {name: {0: "batch"} for name in wrapper.input_names + wrapper.output_names}

    def probe(self, wrapper, card: dict) -> dict:
        """Run the eager module once: the preprocessing must fit its input, the labels its scores. Returns
        the output widths."""
        import torch

        first_conv = next((m for m in wrapper.modules() if isinstance(m, torch.nn.Conv2d)), None)
        channels = card["preprocessing"]["channels"]
        if first_conv is not None and first_conv.in_channels != channels:
            raise KindError(f"preprocessing.channels is {channels} but the network's first convolution takes "
                            f"{first_conv.in_channels} channels: set preprocessing.channels (and mean/std) to match")
        shape = self.input_shape(card, 2)
        try:
            with torch.no_grad():
                outs = wrapper(*self.example_inputs(wrapper, card))
        except KindError:
            raise
        except Exception as e:
            raise KindError(f"the network cannot take the input the preprocessing makes, {list(shape)} "
                            f"(channels x height x width from the card): {type(e).__name__}: "
                            f"{str(e).splitlines()[0][:300]}; fix preprocessing (channels, resize/crop, "
                            "input_size)") from e
        outs = outs if isinstance(outs, tuple) else (outs,)
        widths = {}
        for name, out in zip(wrapper.output_names, outs, strict=True):
            if out.dim() != 2 or out.shape[0] != 2:
                raise KindError(f"output {name!r} has shape {list(out.shape)} for a batch of 2; expected [2, N]")
            widths[name] = int(out.shape[1])
        if "labels" in card and widths[wrapper.output_names[0]] != len(card["labels"]):
            raise KindError(f"the card has {len(card['labels'])} labels but the network's scores have "
                            f"{widths[wrapper.output_names[0]]} columns: give one label per class, in class "
                            "index order")
        if card.get("scores") == "probabilities":
            p = outs[0].double()
            if (p < -1e-6).any() or not torch.allclose(p.sum(1), torch.ones(2, dtype=p.dtype), atol=1e-3):
                raise KindError("the card says scores are probabilities but the network's rows do not sum to 1: "
                                "set \"scores\": \"logits\" (the service then applies softmax)")
        return widths

    # ---- store metadata -------------------------------------------------------------------------------

    def roles_for(self, output_names: list[str], input_names: list[str], card: dict) -> dict:
        roles = {"image": input_names[0]}
        if "labels" in card:
            roles["scores"] = output_names[0]
        if card.get("features"):
            roles["features"] = output_names[-1]
        return roles

    def store_metadata(self, card: dict, roles: dict, outputs: list[dict] | None = None, model=None) -> dict:
        meta = {"roles": roles, "preprocessing": card["preprocessing"], "scores": card.get("scores", "logits")}
        if "labels" in card:
            meta["labels"] = card["labels"]
        if "features" in roles and outputs:
            meta["feature_dim"] = next(o["shape"][-1] for o in outputs if o["name"] == roles["features"])
        return meta

    # ---- ONNX files made elsewhere -------------------------------------------------------------------------

    def foreign_io(self, card: dict, path: Path) -> tuple[dict, dict]:
        """(declared tensors for export/foreign.py, roles): from the card's ``onnx.inputs`` / ``onnx.outputs``
        (role -> graph name); a graph with one input (one output) needs no naming."""
        import onnx

        graph = onnx.load(str(path), load_external_data=False).graph
        initializers = {i.name for i in graph.initializer}
        graph_inputs = [i.name for i in graph.input if i.name not in initializers]
        graph_outputs = [o.name for o in graph.output]
        named_in, named_out = card["onnx"].get("inputs", {}), card["onnx"].get("outputs", {})
        wanted_out = (["scores"] if "labels" in card else []) + (["features"] if self.feature_output else [])
        unknown = sorted(set(named_in) - {"image"}) + sorted(set(named_out) - set(wanted_out))
        if unknown:
            raise KindError(f"card onnx roles {unknown} are not roles of a {self.name}: inputs take 'image', "
                            f"outputs {wanted_out}")
        roles = {"image": named_in.get("image") or (graph_inputs[0] if len(graph_inputs) == 1 else None)}
        for role in wanted_out:
            roles[role] = named_out.get(role) or (graph_outputs[0] if len(graph_outputs) == 1 else None)
        missing = [r for r, n in roles.items() if n is None]
        if missing:
            raise KindError(f"the graph has inputs {graph_inputs} and outputs {graph_outputs}: name which is which "
                            f"in the card, e.g. \"onnx\": {{\"inputs\": {{\"image\": ...}}, \"outputs\": "
                            f"{{\"scores\": ...}}}} (missing roles: {missing})")
        # A graph whose height or width is dynamic (PaddleOCR's [-1, 3, 48, -1]) gets the card's fixed size.
        declared = {roles["image"]: {"side": "input", "dtype": "float32", "rank": 4, "batch_axis": 0,
                                     "shape": [None, *self.input_shape(card, 1)[1:]],
                                     "shape_from": "preprocessing: channels, resize/crop/pad, layout"}}
        declared.update({roles[r]: {"side": "output", "dtype": "float32", "rank": 2, "batch_axis": 0}
                         for r in wanted_out})
        return declared, roles

    def foreign_feeds(self, card: dict, declared: dict, batch: int) -> dict[str, np.ndarray]:
        image = next(n for n, d in declared.items() if d["side"] == "input")
        return {image: np.random.default_rng(0).standard_normal(self.input_shape(card, batch)).astype(np.float32)}

    def foreign_quality(self, path: Path, roles: dict, samples: ImageSamples) -> dict:
        """With labelled evaluation images: the graph's top-1 accuracy on them (no eager model to compare)."""
        if samples.y_eval is None or "scores" not in roles:
            return {}
        acc, _ = accuracy(path, {"roles": roles}, samples)
        return {"onnx_accuracy": acc, "eval_samples": len(samples.y_eval), "samples": samples.source}

    # ---- samples, parity and INT8 ------------------------------------------------------------------------

    def load_samples(self, card: dict, artifact_dir: Path, eval_data: Path | None) -> ImageSamples:
        """The user's evaluation images (a folder per label, or an .npz), else our own dataset's held-out
        split when the card names it, else random inputs only (said so in the certificate)."""
        from models import data
        from models.preprocess import preprocess_uint8

        spec = card["preprocessing"]
        if eval_data is not None:
            x, y = read_eval_images(eval_data, card)
            return ImageSamples(x, y, x, f"evaluation data {eval_data} ({len(x)} images)")
        if card.get("dataset", {}).get("source") == data.MNIST_SOURCE:
            split = data.load_mnist(seed=card.get("seed", 0), limit=card.get("training", {}).get("limit"))
            return ImageSamples(preprocess_uint8(split.x_test, spec), split.y_test,
                                preprocess_uint8(split.x_train, spec), f"held-out split of {data.MNIST_SOURCE}")
        rng = np.random.default_rng(0)
        return ImageSamples(rng.standard_normal(self.input_shape(card, 64)).astype(np.float32), None, None,
                            "random inputs only (no evaluation data given: --eval-data)")

    def certify(self, wrapper, session, samples: ImageSamples, max_abs_error: float) -> dict:
        """Evaluation and random inputs at batch 1, 7, 64; then top-1 agreement on every evaluation image."""
        from models.kinds.torch_utils import run_torch

        names, rng = wrapper.output_names, np.random.default_rng(0)
        input_name = session.get_inputs()[0].name
        checks = []
        for batch in BATCH_SIZES:
            shape = (batch, *samples.x_eval.shape[1:])
            for label, x in (("evaluation", np.resize(samples.x_eval, shape)),
                             ("random", rng.standard_normal(shape).astype(np.float32))):
                x = np.ascontiguousarray(x)
                checks.append({"batch": batch, "inputs": label, "errors": errors(
                    run_torch(wrapper, [x]), session.run(None, {input_name: x}), names)})
        summary = summarize(checks, names, max_abs_error)
        cert = {"tolerance_max_abs": max_abs_error, "tolerance_rule": "max_abs_error x max(1, max |output|)",
                "max_abs": summary["max_abs"], "max_rel": summary["max_rel"], "worst": summary["worst"],
                "samples": samples.source, "checks": checks, "passed": summary["within_tolerance"]}
        if wrapper.scores_output:
            chunks = [samples.x_eval[i:i + 64] for i in range(0, len(samples.x_eval), 64)]
            torch_pred = np.concatenate([run_torch(wrapper, [c])[0].argmax(1) for c in chunks])
            onnx_pred = np.concatenate([session.run(None, {input_name: c})[0].argmax(1) for c in chunks])
            agreement = float((torch_pred == onnx_pred).mean())
            cert.update(eval_samples=len(samples.x_eval), top1_agreement=agreement)
            if samples.y_eval is not None:
                cert.update(torch_accuracy=float((torch_pred == samples.y_eval).mean()),
                            onnx_accuracy=float((onnx_pred == samples.y_eval).mean()))
                cert["passed"] = cert["passed"] and agreement == 1.0
        return cert

    def summary_line(self, cert: dict) -> str:
        if "top1_agreement" not in cert:
            return f"on {cert['samples']}"
        return f"top-1 agreement {cert['top1_agreement']:.4f} on {cert['eval_samples']} images ({cert['samples']})"

    def int8_recipe(self, metadata: dict) -> dict:
        return {"mode": "static"}

    def int8_quality(self, fp32_path: Path, int8_path: Path, metadata: dict, samples: ImageSamples, opts) -> dict:
        """Top-1 accuracy on the evaluation images, fp32 vs INT8 graph; gated on the drop in points."""
        if samples.y_eval is None:
            raise KindError("INT8 needs labelled evaluation images to measure its accuracy: pass --eval-data")
        fp32_acc, fp32_pred = accuracy(fp32_path, metadata, samples)
        int8_acc, int8_pred = accuracy(int8_path, metadata, samples)
        drop = 100 * (fp32_acc - int8_acc)
        passed = drop <= opts.int8_max_drop
        return {"passed": passed,
                "verdict": f"top-1 {100 * fp32_acc:.2f}% -> {100 * int8_acc:.2f}% ({-drop:+.2f} points, allowed "
                           f"-{opts.int8_max_drop:g}) on {samples.source}",
                "metrics": {"int8_test_accuracy": int8_acc, "fp32_onnx_test_accuracy": fp32_acc},
                "parity": {"reference": "fp32 ONNX graph", "eval_samples": len(samples.y_eval),
                           "fp32_accuracy": fp32_acc, "int8_accuracy": int8_acc, "top1_drop_points": drop,
                           "top1_agreement_with_fp32": float((fp32_pred == int8_pred).mean()), "passed": passed}}


class ImageFeatureExtractor(ImageClassifier):
    name = "image_feature_extractor"
    endpoints = ("/classify", "/features")
    feature_output = True


def class_probabilities(scores: str, row: np.ndarray) -> np.ndarray:
    """One row of the scores output as probabilities: softmax of logits, exp of log-probabilities, and
    probabilities as they are (never a softmax applied twice)."""
    row = row.astype(np.float64)
    if scores == "probabilities":
        return row
    if scores == "log_probabilities":
        return np.exp(row)
    z = np.exp(row - row.max())
    return z / z.sum()


def module_at(model, path: str):
    """``model.get_submodule(path)`` with the closest module paths suggested when it does not exist."""
    try:
        return model.get_submodule(path)
    except AttributeError as e:
        names = [n for n, _ in model.named_modules() if n]
        close = difflib.get_close_matches(path, names, 5)
        raise KindError(f"features.module {path!r} is not a module of the network"
                        + (f"; close: {close}" if close else f"; modules: {names[:20]}")) from e


def pick_output(result, select, field: str):
    """The tensor in ``forward``'s result: itself, or by key / attribute / index (``select``). A dict-like
    output with a ``logits`` field gives that field when nothing is selected."""
    import torch

    if select is None:
        if isinstance(result, torch.Tensor):
            return result
        if hasattr(result, "logits") or (isinstance(result, dict) and "logits" in result):
            select = "logits"
        else:
            raise KindError(f"forward() returns a {type(result).__name__}, not a tensor; set {field!r} in the card "
                            f"to the part holding the scores ({describe_result(result)})")
    try:
        if isinstance(select, int):
            picked = result[select]
        elif isinstance(result, dict) or hasattr(result, "keys"):
            picked = result[select]
        else:
            picked = getattr(result, select)
    except (KeyError, IndexError, AttributeError, TypeError) as e:
        raise KindError(f"card {field!r} is {select!r} but forward() returns a {type(result).__name__} without it "
                        f"({describe_result(result)})") from e
    if not isinstance(picked, torch.Tensor):
        raise KindError(f"card {field!r} = {select!r} selects a {type(picked).__name__}, not a tensor")
    return picked


def describe_result(result) -> str:
    if hasattr(result, "keys"):
        return f"fields: {list(result.keys())}"
    if isinstance(result, tuple | list):
        return f"a {type(result).__name__} of {len(result)}: select an index"
    return "no fields"


def read_eval_images(path: Path, card: dict) -> tuple[np.ndarray, np.ndarray]:
    """Evaluation images, preprocessed as the service will: a folder with one subfolder per label (named as
    the card's labels) of image files, or an .npz with ``images`` (uint8 [N, H, W(, C)] decoded pictures, or
    float32 [N, C, H, W] already preprocessed) and ``labels`` (int [N] class indices)."""
    from PIL import Image

    from models.preprocess import image_to_uint8, preprocess_upload_pixels

    spec, labels = card["preprocessing"], card.get("labels")
    if path.suffix == ".npz":
        with np.load(path, allow_pickle=False) as npz:
            if "images" not in npz or "labels" not in npz:
                raise KindError(f"{path}: an evaluation .npz needs arrays 'images' and 'labels', has "
                                f"{list(npz.keys())}")
            images, y = npz["images"], npz["labels"].astype(np.int64)
        if images.dtype == np.uint8:
            x = np.stack([preprocess_upload_pixels(image_to_uint8(Image.fromarray(img), spec), spec) for img in images])
        else:
            x = images.astype(np.float32)
        expected = ImageClassifier().input_shape(card, len(x))[1:]
        if x.shape[1:] != expected:
            raise KindError(f"{path}: images preprocess to {list(x.shape[1:])}, the card's input is {list(expected)}")
        if labels and (y.min() < 0 or y.max() >= len(labels)):
            raise KindError(f"{path}: labels must be class indices in [0, {len(labels)})")
        return x, y
    if not path.is_dir():
        raise KindError(f"--eval-data {path}: not a folder of <label>/<image> files or an .npz")
    folders = sorted(p for p in path.iterdir() if p.is_dir())
    if labels is None:
        raise KindError("evaluation folders need the card's labels to map folder names to classes")
    unknown = [f.name for f in folders if f.name not in labels]
    if unknown or not folders:
        raise KindError(f"{path}: subfolders must be named after the card's labels {labels[:10]}; "
                        f"found {unknown or 'none'}")
    xs, ys = [], []
    for folder in folders:
        for file in sorted(folder.iterdir()):
            if file.suffix.lower() in EVAL_IMAGE_SUFFIXES:
                with Image.open(file) as img:
                    xs.append(preprocess_upload_pixels(image_to_uint8(img, spec), spec))
                ys.append(labels.index(folder.name))
    if not xs:
        raise KindError(f"{path}: no image files ({', '.join(sorted(EVAL_IMAGE_SUFFIXES))}) in its label folders")
    return np.stack(xs), np.array(ys, dtype=np.int64)


def accuracy(path: Path, metadata: dict, samples: ImageSamples) -> tuple[float, np.ndarray]:
    from models.kinds.base import cpu_session

    session = cpu_session(path)
    roles = metadata["roles"]
    preds = np.concatenate([session.run([roles["scores"]], {roles["image"]: samples.x_eval[i:i + 64]})[0].argmax(1)
                            for i in range(0, len(samples.x_eval), 64)])
    return float((preds == samples.y_eval).mean()), preds
