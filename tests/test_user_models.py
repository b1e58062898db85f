"""Users' own networks through the export pipeline (issue 14): networks from other projects
(efficientnet_pytorch, transformers), a PyTorch-examples-style word LM, an ONNX file made elsewhere; and every
mistake a user can make answered with a message naming the fix, nothing registered."""

from __future__ import annotations

import io
import json
import re
import shutil
from pathlib import Path

import bentoml
import numpy as np
import onnx
import pytest
import torch

from export.__main__ import main as export_main
from export.graph import op_counts
from export.pipeline import Options, export_artifact
from models.card import CardError, read_card, validate_card
from models.kinds.base import cpu_session

pytest.importorskip("efficientnet_pytorch")
pytest.importorskip("transformers")


def store_versions(name: str) -> list[str]:
    try:
        return [str(m.tag) for m in bentoml.models.list(name)]
    except bentoml.exceptions.NotFound:
        return []


def edited(src: Path, dst: Path, name: str, change=None) -> Path:
    """A copy of an artifact under another name, its card changed by ``change(card)``."""
    shutil.copytree(src, dst)
    card = json.loads((dst / "card.json").read_text())
    card["name"] = name
    card.pop("weights_sha256", None)
    if change:
        change(card)
    (dst / "card.json").write_text(json.dumps(card))
    return dst


# ---- what export makes of them ------------------------------------------------------------------------------

def test_library_classifier_is_exported_with_its_bn_folded_and_parity_proven(user_store):
    model = bentoml.models.get(user_store["effnet_digits"])
    meta = model.info.metadata
    assert meta["kind"] == "image_classifier" and meta["roles"] == {"image": "input", "scores": "logits"}
    assert meta["inputs"][0]["shape"] == [-1, 3, 32, 32] and meta["labels"] == [str(i) for i in range(10)]
    assert meta["parity"]["passed"] and meta["parity"]["top1_agreement"] == 1.0
    assert "eval.npz" in meta["parity"]["samples"], "parity ran on the user's evaluation images"
    ops = op_counts(onnx.load(model.path_of("model.onnx")))
    assert ops.get("BatchNormalization", 0) == 0 and ops.get("Dropout", 0) == 0, ops
    report = json.loads(Path(model.path_of("export_report.json")).read_text())
    folding = report["folding"]
    assert folding["batchnorm_scale_shift"] == [], "every BN of EfficientNet follows a conv"
    assert len(folding["batchnorm_folded"]) + folding["batchnorm_folded_by_exporter"] == 49
    assert folding["dropout_removed"] == ["_dropout"]


def test_transformers_model_with_an_output_object_becomes_a_feature_extractor(user_store):
    meta = bentoml.models.get(user_store["resnet_digits"]).info.metadata
    assert meta["kind"] == "image_feature_extractor"
    assert meta["roles"] == {"image": "input", "scores": "logits", "features": "features"}
    assert meta["feature_dim"] == 32 and meta["outputs"][1] == {"name": "features", "dtype": "float32",
                                                                 "shape": [-1, 32]}
    assert meta["parity"]["passed"] and meta["parity"]["worst"]["output"] in ("logits", "features")


def test_users_word_level_gru_keeps_its_vocabulary_and_passes_greedy_parity(user_store, user_artifacts):
    meta = bentoml.models.get(user_store["word_gru"]).info.metadata
    card = read_card(user_artifacts["word_gru"])
    assert meta["kind"] == "sequence_lm" and meta["vocab"] == card["vocab"] and meta["separator"] == " "
    assert meta["rnn"] == {"cell": "gru", "num_layers": 2, "hidden_size": 32, "h_size": 32}
    assert meta["roles"] == {"tokens": "tokens", "scores": "logits", "state": [["h", "h_out"]]}
    assert meta["inputs"][0]["shape"] == [-1, -1], "the graph is batch-first whatever the module's layout"
    assert meta["parity"]["greedy_identical"] and meta["parity"]["passed"]


def test_onnx_made_elsewhere_is_made_batch_dynamic_and_checked_against_its_reference(user_store):
    model = bentoml.models.get(user_store["elsewhere_cnn"])
    meta = model.info.metadata
    assert meta["roles"] == {"image": "pixels", "scores": "class_scores"}, "the graph keeps its own names"
    assert meta["inputs"][0]["shape"][0] == -1 and meta["exporter"] == "ONNX file made elsewhere"
    assert meta["parity"]["batch_made_dynamic"] and meta["parity"]["reference"].startswith("reference outputs from")
    cert = json.loads(Path(model.path_of("export_report.json")).read_text())["parity"]
    checked = " ".join(json.dumps(c) for c in cert["checks"])
    assert "batch" in checked and "reference" in checked


def test_int8_of_a_user_model_is_gated_on_the_users_evaluation_images(user_artifacts, tmp_path):
    path = user_artifacts["resnet_digits"]
    result = export_artifact(path, Options(int8=True, register=False, bench_runs=3, report_dir=tmp_path,
                                           eval_data=path / "eval.npz", int8_max_drop=100))
    report = result.report["int8"]
    assert report["passed"] and report["parity"]["eval_samples"] == 450 and "eval.npz" in report["verdict"]
    without = export_artifact(path, Options(int8=True, register=False, bench_runs=3, report_dir=tmp_path))
    assert not without.report["int8"]["passed"] and "--eval-data" in without.report["int8"]["verdict"]


# ---- every mistake named, nothing registered ----------------------------------------------------------------

def bad_factory(card):
    card["config"]["factory"] = "my_resnett:build"


def wrong_sizes(card):
    card["config"]["kwargs"]["num_labels"] = 7


def few_labels(card):
    card["labels"] = card["labels"][:9]


def gray_for_rgb(card):
    card["preprocessing"].update(channels=1, mean=[0.5], std=[0.25])


def no_preprocessing(card):
    del card["preprocessing"]


def typo(card):
    card["labeles"] = card.pop("labels")


def labels_not_a_list(card):
    card["labels"] = "0123456789"


def crop_without_size(card):
    card["preprocessing"]["resize"] = 32


def missing_feature_module(card):
    card["features"]["module"] = "resnet.poolr"


@pytest.mark.parametrize(("change", "message"), [
    (bad_factory, "cannot import module 'my_resnett'"),
    (wrong_sizes, "weights do not fit the network.*shape mismatch: .*classifier.1.weight model \\(7, 32\\)"),
    (few_labels, "the card has 9 labels but the network's scores have 10 columns"),
    (gray_for_rgb, "preprocessing.channels is 1 but the network's first convolution takes 3 channels"),
    (no_preprocessing, "\\$: 'preprocessing' is a required property"),
    (typo, "unknown field\\(s\\) 'labeles' \\(did you mean 'labels'\\?\\)"),
    (labels_not_a_list, "\\$.labels: '0123456789' is not of type 'array'"),
    (crop_without_size, "resize.*crop"),
    (missing_feature_module, "features.module 'resnet.poolr' is not a module of the network; close: "
                             "\\['resnet.pooler'"),
])
def test_card_mistakes_are_named_and_nothing_is_registered(user_artifacts, tmp_path, caplog, change, message):
    name = f"bad-{change.__name__.replace('_', '-')}"
    artifact = edited(user_artifacts["resnet_digits"], tmp_path / name, name, change)
    assert export_main([str(artifact), "--bench-runs", "3", "--report-dir", str(tmp_path / "r")]) == 1
    assert re.search(message, caplog.text), caplog.text[-2000:]
    assert store_versions(name) == []


def test_state_dict_keys_missing_and_unexpected_are_listed(user_artifacts, tmp_path, caplog):
    artifact = edited(user_artifacts["word_gru"], tmp_path / "keys", "bad-keys")
    state = torch.load(artifact / "weights.pt", weights_only=True)
    state["module.extra"] = state.pop("decoder.bias")
    torch.save(state, artifact / "weights.pt")
    assert export_main([str(artifact), "--report-dir", str(tmp_path / "r")]) == 1
    assert "1 missing: ['decoder.bias']; 1 unexpected: ['module.extra']" in caplog.text


def test_a_pickled_whole_model_is_refused_unread(user_artifacts, tmp_path, caplog):
    from tests.user_models.word_lm import RNNModel

    artifact = edited(user_artifacts["word_gru"], tmp_path / "pickled", "bad-pickle")
    torch.save(RNNModel("GRU", 3, 4, 4, 1), artifact / "weights.pt")  # the object, not its state_dict
    assert export_main([str(artifact), "--report-dir", str(tmp_path / "r")]) == 1
    assert "torch.load(weights_only=True) refused it" in caplog.text and "state_dict" in caplog.text


@pytest.mark.parametrize(("change", "message"), [
    (lambda c: c.update(vocab=c["vocab"] + [c["vocab"][0]]), "vocab has 1 duplicate token"),
    (lambda c: c.update(vocab=c["vocab"] + ["zebra"]), "the card's vocab has (\\d+) tokens but the network's "
                                                        "embedding has (\\d+) rows"),
    (lambda c: c["lm"].update(batch_first=True), "set lm.batch_first to false"),
])
def test_language_model_card_mistakes(user_artifacts, tmp_path, caplog, change, message):
    artifact = edited(user_artifacts["word_gru"], tmp_path / "vocab", "bad-vocab", change)
    assert export_main([str(artifact), "--report-dir", str(tmp_path / "r")]) == 1
    assert re.search(message, caplog.text), caplog.text[-2000:]
    assert store_versions("bad-vocab") == []


def test_an_operation_the_exporter_cannot_express_is_named(tmp_path, caplog):
    (tmp_path / "fft").mkdir()
    (tmp_path / "fft" / "fft_net.py").write_text(
        "import torch\n\nclass Net(torch.nn.Module):\n    def __init__(self):\n        super().__init__()\n"
        "        self.fc = torch.nn.Linear(3, 2)\n\n    def forward(self, x):\n"
        "        return self.fc(torch.fft.rfft(x, dim=-1).abs().mean((2, 3)))\n")
    from safetensors.torch import save_file

    sys_path = str(tmp_path / "fft")
    import sys

    sys.path.insert(0, sys_path)
    try:
        import fft_net

        save_file(fft_net.Net().state_dict(), str(tmp_path / "fft" / "weights.safetensors"))
    finally:
        sys.path.remove(sys_path)
    card = {"format": "nnserve.artifact/2", "name": "bad-fft", "kind": "image_classifier",
            "config": {"factory": "fft_net:Net"}, "labels": ["a", "b"],
            "preprocessing": {"channels": 3, "resize": [8, 8], "mean": [0.5] * 3, "std": [0.5] * 3}}
    (tmp_path / "fft" / "card.json").write_text(json.dumps(card))
    assert export_main([str(tmp_path / "fft"), "--report-dir", str(tmp_path / "r")]) == 1
    assert "ONNX export failed" in caplog.text and "aten::fft_rfft" in caplog.text


def test_parity_failure_shows_the_worst_output_and_batch(user_artifacts, tmp_path, caplog):
    artifact = edited(user_artifacts["effnet_digits"], tmp_path / "strict", "bad-parity")
    assert export_main([str(artifact), "--max-abs-error", "1e-30", "--eval-data", str(artifact / "eval.npz"),
                        "--report-dir", str(tmp_path / "r")]) == 1
    assert "parity FAILED" in caplog.text and "worst: output 'logits'" in caplog.text and "batch" in caplog.text
    assert store_versions("bad-parity") == []


@pytest.mark.parametrize(("change", "message"), [
    (lambda c: c["onnx"].pop("make_batch_dynamic"), "fixed batch of 1 on input .?pixels.*--make-batch-dynamic"),
    (lambda c: c["onnx"]["outputs"].update(scores="probs"), "probs"),
])
def test_onnx_file_mistakes(user_artifacts, tmp_path, caplog, change, message):
    artifact = edited(user_artifacts["elsewhere_cnn"], tmp_path / "onnx", "bad-onnx", change)
    assert export_main([str(artifact), "--report-dir", str(tmp_path / "r")]) == 1
    assert re.search(message, caplog.text), caplog.text[-2000:]
    assert store_versions("bad-onnx") == []


def test_a_name_keeps_its_kind_in_the_store(user_store, user_artifacts, tmp_path, caplog):
    # resnet_digits is an image_feature_extractor; a classifier card under that name is refused.
    artifact = edited(user_artifacts["effnet_digits"], tmp_path / "same-name", "resnet_digits")
    before = store_versions("resnet_digits")
    assert export_main([str(artifact), "--report-dir", str(tmp_path / "r")]) == 1
    assert "already holds 'resnet_digits' as a image_feature_extractor" in caplog.text
    assert store_versions("resnet_digits") == before


def test_the_schema_is_what_docs_publish():
    from models.card import SCHEMA_PATH

    documented = (Path(__file__).resolve().parent.parent / "docs" / "your-model.md").read_text()
    assert "models/card_schema.json" in documented
    with pytest.raises(CardError, match="\\$.kind"):
        validate_card({"format": "nnserve.artifact/2", "name": "x", "kind": "regressor", "config": {"factory": "a:b"}})
    assert json.loads(SCHEMA_PATH.read_text())["$id"] == "nnserve.artifact/2"


def test_eval_images_in_a_folder_per_label_are_read_like_uploads(user_artifacts, tmp_path):
    from PIL import Image

    from models.kinds.image import read_eval_images

    card = read_card(user_artifacts["resnet_digits"])
    with np.load(user_artifacts["resnet_digits"] / "eval.npz") as npz:
        images, labels = npz["images"][:6], npz["labels"][:6]
    for i, (img, label) in enumerate(zip(images, labels, strict=True)):
        folder = tmp_path / "eval" / str(label)
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(img).save(folder / f"{i}.png")
    x_dir, y_dir = read_eval_images(tmp_path / "eval", card)
    np.savez(tmp_path / "six.npz", images=images, labels=labels)
    x_npz, y_npz = read_eval_images(tmp_path / "six.npz", card)
    order = np.argsort(y_npz, kind="stable")
    assert np.array_equal(np.sort(y_dir), np.sort(y_npz)) and x_dir.shape == (6, 3, 32, 32)
    assert np.allclose(np.sort(x_dir.reshape(6, -1), axis=0), np.sort(x_npz[order].reshape(6, -1), axis=0))


# ---- served with no code change ---------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def user_server(own_server, user_store, session_dir):
    """A real server whose models.yaml lists only the users' models."""
    import yaml

    config = session_dir / "user-models.yaml"
    config.write_text(yaml.safe_dump({"models": {name: {"tag": tag} for name, tag in user_store.items()}},
                                     sort_keys=False))
    env = {"NNSERVE_MODELS_CONFIG": str(config), "NNSERVE_WORKERS": "1", "NNSERVE_QUEUE_TIMEOUT_MS": "60000"}
    with own_server("user-models", env) as server:
        yield server


def probe_pngs(artifact: Path, count: int = 12) -> tuple[list[bytes], np.ndarray]:
    """Held-out digits as PNG uploads, and the eager model's top-1 on exactly those files."""
    from PIL import Image

    from models.artifact import load_artifact
    from models.kinds import get_kind
    from models.preprocess import image_to_uint8, preprocess_upload_pixels

    with np.load(artifact / "eval.npz") as npz:
        images = npz["images"][:count]
    pngs = []
    for img in images:
        buffer = io.BytesIO()
        Image.fromarray(img).save(buffer, format="PNG")
        pngs.append(buffer.getvalue())
    model, card = load_artifact(artifact)
    wrapper = get_kind(card["kind"]).export_wrapper(model, card)
    x = np.stack([preprocess_upload_pixels(image_to_uint8(Image.open(io.BytesIO(p)), card["preprocessing"]),
                                           card["preprocessing"]) for p in pngs])
    with torch.no_grad():
        out = wrapper(torch.from_numpy(x))
    scores = out[0] if isinstance(out, tuple) else out
    return pngs, scores.argmax(1).numpy()


@pytest.mark.integration
def test_user_classifiers_answer_as_their_eager_models(user_server, user_artifacts):
    import requests

    for name in ("effnet_digits", "resnet_digits"):
        pngs, eager_top1 = probe_pngs(user_artifacts[name])
        served = []
        for png in pngs:
            r = requests.post(f"{user_server.http_url}/classify", files={"image": png}, data={"model": name},
                              timeout=60)
            assert r.status_code == 200, r.text
            served.append(int(r.json()["predictions"][0]["label"]))
        assert served == eager_top1.tolist(), (name, served, eager_top1)


@pytest.mark.integration
def test_user_models_over_rest_and_triton_clients(user_server, user_artifacts):
    import requests
    import tritonclient.grpc as grpcclient
    import tritonclient.http as httpclient

    url = user_server.http_url
    models = {m["name"]: m for m in requests.get(f"{url}/models", timeout=30).json()["models"]}
    assert set(models) == {"effnet_digits", "resnet_digits", "word_gru", "elsewhere_cnn"}, user_server.log()
    assert all(m["state"] == "ready" for m in models.values()), models
    png = probe_pngs(user_artifacts["resnet_digits"], 1)[0][0]
    features = requests.post(f"{url}/features", files={"image": png}, timeout=60).json()
    assert features["model"].startswith("resnet_digits:") and features["dim"] == 32 == len(features["features"])
    text = requests.post(f"{url}/generate", json={"prompt": "the cat", "max_new_chars": 6, "seed": 3},
                         timeout=60).json()
    vocab = set(read_card(user_artifacts["word_gru"])["vocab"])
    words = text["text"].split(" ")
    assert words[0] == "" and len(words) == 7 and set(words[1:]) <= vocab, text
    shapes = requests.post(f"{url}/classify", files={"image": png}, data={"model": "elsewhere_cnn", "top_k": "3"},
                          timeout=60).json()
    assert {p["label"] for p in shapes["predictions"]} == {"circle", "square", "triangle"}, shapes
    x = np.random.default_rng(0).standard_normal((3, 3, 32, 32)).astype(np.float32)
    http = httpclient.InferenceServerClient(url.removeprefix("http://"))
    inp = httpclient.InferInput("input", list(x.shape), "FP32")
    inp.set_data_from_numpy(x)
    logits = http.infer("effnet_digits", [inp]).as_numpy("logits")
    grpc = grpcclient.InferenceServerClient(f"127.0.0.1:{user_server.grpc_port}")
    ginp = grpcclient.InferInput("input", list(x.shape), "FP32")
    ginp.set_data_from_numpy(x)
    assert np.allclose(grpc.infer("effnet_digits", [ginp]).as_numpy("logits"), logits, atol=1e-5)
    # Image bytes to a graph made elsewhere, whose float input has its own name ("pixels"), with top-2 classes,
    # through its image front end.
    image = httpclient.InferInput("image", [1], "BYTES")
    image.set_data_from_numpy(np.array([png], dtype=object))
    top2 = http.infer("elsewhere_cnn.image", [image], outputs=[httpclient.InferRequestedOutput("class_scores",
                                                                                         class_count=2)])
    labels = [row.decode().split(":")[2] for row in top2.as_numpy("class_scores").ravel()]
    assert labels == [p["label"] for p in shapes["predictions"][:2]], (labels, shapes)
    served_graph = bentoml.models.get(models["effnet_digits"]["store_tag"]).path_of("model.onnx")
    onnx_logits = cpu_session(served_graph).run(None, {"input": x})[0]
    assert logits.shape == (3, 10) and np.allclose(logits, onnx_logits, atol=1e-4)


def test_tied_weights_are_saved_once_and_load_back(tmp_path):
    """An LM whose head shares the embedding's tensor (weight tying): safetensors stores it once, and the
    network its factory builds (tied again) gets it under both names."""
    from safetensors.torch import load_file

    from models.artifact import load_artifact, save_artifact
    from tests.user_models.word_lm import RNNModel

    kwargs = {"rnn_type": "LSTM", "ntoken": 12, "ninp": 8, "nhid": 8, "nlayers": 1, "tie_weights": True}
    model = RNNModel(**kwargs).eval()
    card = {"name": "tied", "kind": "sequence_lm", "vocab": "abcdefghijkl", "lm": {"batch_first": False},
            "config": {"factory": "tests.user_models.word_lm:RNNModel", "kwargs": kwargs}}
    out = save_artifact(tmp_path / "tied", model, card)
    assert len(load_file(str(out / "weights.safetensors"))) == len(model.state_dict()) - 1
    loaded, _ = load_artifact(out)
    assert loaded.decoder.weight is loaded.encoder.weight
    tokens = torch.randint(0, 12, (5, 2))
    state = (torch.zeros(1, 2, 8), torch.zeros(1, 2, 8))
    with torch.no_grad():
        assert torch.equal(loaded(tokens, state)[0], model(tokens, state)[0])


def test_a_channels_last_onnx_file_is_fed_in_its_own_layout(tmp_path):
    """TensorFlow/Keras graphs take NHWC images: "layout": "NHWC" makes every upload [H, W, C]."""
    from PIL import Image

    from service.images import preprocess_upload

    class KerasLike(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv, self.head = torch.nn.Conv2d(3, 4, 3), torch.nn.Linear(4, 3)

        def forward(self, x):  # x: [N, H, W, C]
            return self.head(self.conv(x.permute(0, 3, 1, 2)).mean((2, 3)))

    torch.manual_seed(0)
    net = KerasLike().eval()
    folder = tmp_path / "keras_like"
    folder.mkdir()
    torch.onnx.export(net, (torch.randn(2, 12, 10, 3),), str(folder / "model.onnx"), dynamo=False, opset_version=17,
                      input_names=["input_1"], output_names=["dense"],
                      dynamic_axes={"input_1": {0: "n"}, "dense": {0: "n"}})
    spec = {"channels": 3, "resize": [12, 10], "mean": [0.5] * 3, "std": [0.25] * 3, "layout": "NHWC"}
    card = {"format": "nnserve.artifact/2", "name": "keras_like", "kind": "image_classifier",
            "onnx": {"file": "model.onnx"}, "labels": ["x", "y", "z"], "preprocessing": spec}
    (folder / "card.json").write_text(json.dumps(card))
    result = export_artifact(folder, Options(register=False, bench_runs=3, report_dir=tmp_path))
    inputs = result.report["parity"]["io"]["inputs"]
    assert inputs == [{"name": "input_1", "dtype": "float32", "shape": [-1, 12, 10, 3]}]
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(1).integers(0, 255, (30, 25, 3), dtype=np.uint8)).save(buffer, format="PNG")
    x = preprocess_upload(buffer.getvalue(), spec)
    assert x.shape == (12, 10, 3)
    served = cpu_session(folder / "model.onnx").run(None, {"input_1": x[None]})[0]
    with torch.no_grad():
        eager = net(torch.from_numpy(x[None])).numpy()
    assert np.allclose(served, eager, atol=1e-5)


def test_a_dataparallel_checkpoint_loads_without_its_module_prefix(user_artifacts, tmp_path):
    artifact = edited(user_artifacts["word_gru"], tmp_path / "dp", "dp-checkpoint")
    state = torch.load(artifact / "weights.pt", weights_only=True)
    torch.save({"epoch": 3, "state_dict": {f"module.{k}": v for k, v in state.items()}}, artifact / "weights.pt")
    result = export_artifact(artifact, Options(register=False, bench_runs=3, report_dir=tmp_path))
    assert result.report["parity"]["passed"]


def test_a_language_model_onnx_file_is_refused_with_the_reason(tmp_path):
    card = {"format": "nnserve.artifact/2", "name": "lm", "kind": "sequence_lm", "onnx": {"file": "lm.onnx"},
            "vocab": "abc"}
    with pytest.raises(CardError, match="a sequence_lm is exported from its PyTorch module"):
        validate_card(card)
