"""docs/your-model.md cannot drift (issue 28): every message its error table quotes is produced, here, by the
mistake it describes, and its field tables list exactly the fields of models/card_schema.json.

Each producer below makes the smallest artifact-shaped input that commits the mistake and returns the error
text nnserve gives; a message added to the table without a producer, or a producer whose message left the
table, fails ``test_every_quoted_message_has_a_producer``.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper
from torch import nn

DOC = Path(__file__).resolve().parent.parent / "docs" / "your-model.md"
IMAGE_CARD = {"format": "nnserve.artifact/2", "name": "x", "kind": "image_classifier", "config": {"factory": "a:b"},
              "labels": [str(i) for i in range(10)],
              "preprocessing": {"channels": 3, "resize": [8, 8], "mean": [0.5] * 3, "std": [0.5] * 3}}


def table(heading: str) -> list[list[str]]:
    """The rows (cells) of the first table after ``heading`` (a markdown heading's text)."""
    text = DOC.read_text()
    section = text[text.index(heading):]
    rows = []
    for line in section.splitlines()[1:]:
        if line.startswith("|"):
            rows.append([c.strip() for c in line.strip().strip("|").split(" | ")])
        elif rows:
            break
    return rows[2:]  # header and its --- line


def quoted_messages() -> list[str]:
    return [m for row in table("## What export checks, and the errors it answers") for m in
            re.findall(r"`([^`]+)`", row[1])]


def error_text(call: Callable[[], object], error: type[BaseException] = Exception) -> str:
    with pytest.raises(error) as info:
        call()
    return str(info.value)


# ---- the producers --------------------------------------------------------------------------------------

def card_error(card: dict) -> str:
    from models.card import CardError, validate_card

    return error_text(lambda: validate_card(card), CardError)


class TinyNet(nn.Module):
    def __init__(self, classes: int = 10, softmax: bool = False) -> None:
        super().__init__()
        self.conv, self.classifier = nn.Conv2d(3, 32, 3), nn.Sequential(nn.Dropout(), nn.Linear(32, classes))
        self.softmax = softmax

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.classifier(self.conv(x).mean((2, 3)))
        return out.exp() if self.softmax else out  # exp: positive, but rows not summing to 1


def probe_error(card: dict, net: nn.Module | None = None) -> str:
    from models.kinds import KindError, get_kind

    kind = get_kind(card["kind"])
    net = (net or TinyNet()).eval()
    return error_text(lambda: kind.probe(kind.export_wrapper(net, card), card), KindError)


def lm_error(vocab_size: int, batch_first: bool) -> str:
    from tests.user_models.word_lm import RNNModel

    torch.manual_seed(0)
    card = {"kind": "sequence_lm", "vocab": [f"w{i}" for i in range(vocab_size)],
            "lm": {"batch_first": batch_first, "separator": " "}, "scores": "log_probabilities"}
    return probe_error(card, RNNModel("GRU", 12, 8, 8, 1))


def foreign_graph(path: Path, batch: int | str = "batch") -> Path:
    """pixels [batch, 1, 8, 8] -> Conv -> Relu -> BatchNormalization -> pool -> class_scores [batch, 2]."""
    rng = np.random.default_rng(0)
    init = [numpy_helper.from_array(rng.standard_normal(s).astype(np.float32), n) for n, s in
            (("w", (2, 1, 3, 3)), ("bn.scale", (2,)), ("bn.bias", (2,)), ("bn.mean", (2,)))]
    init.append(numpy_helper.from_array(np.ones(2, np.float32), "bn.var"))
    nodes = [helper.make_node("Conv", ["pixels", "w"], ["conv"], pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["conv"], ["relu"], name="relu"),
             helper.make_node("BatchNormalization", ["relu", "bn.scale", "bn.bias", "bn.mean", "bn.var"], ["bn"],
                              name="bn"),
             helper.make_node("GlobalAveragePool", ["bn"], ["pooled"]),
             helper.make_node("Flatten", ["pooled"], ["class_scores"], axis=1)]
    graph = helper.make_graph(nodes, "g",
                              [helper.make_tensor_value_info("pixels", TensorProto.FLOAT, [batch, 1, 8, 8])],
                              [helper.make_tensor_value_info("class_scores", TensorProto.FLOAT, [batch, 2])],
                              initializer=init)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8), str(path))
    return path


def foreign_card(**preprocessing) -> dict:
    return {"kind": "image_classifier", "labels": ["a", "b"], "onnx": {"file": "g.onnx"},
            "preprocessing": {"channels": 1, "resize": [8, 8], "mean": [0.5], "std": [0.5], **preprocessing}}


def foreign_check_error(tmp: Path, card: dict, batch: int | str = "batch", outputs: dict | None = None) -> str:
    from export.foreign import ForeignGraphError, prepare_foreign
    from models.kinds import get_kind

    kind, path = get_kind("image_classifier"), foreign_graph(tmp / "g.onnx", batch)
    card = {**card, "onnx": {**card["onnx"], **({"outputs": outputs} if outputs else {})}}
    try:
        declared, _ = kind.foreign_io(card, path)
    except Exception as e:
        return str(e)
    return error_text(lambda: prepare_foreign(path, tmp / "out.onnx", declared,
                                              lambda n: kind.foreign_feeds(card, declared, n), make_dynamic=False,
                                              reference_npz=None), ForeignGraphError)


def typo_card() -> dict:
    card = dict(IMAGE_CARD)
    card["labeles"] = card.pop("labels")
    return card


def factory_error(factory: str) -> str:
    from models.card import CardError, import_factory

    return error_text(lambda: import_factory(factory), CardError)


def unfit_weights() -> str:
    from models.card import CardError, load_state

    return error_text(lambda: load_state(TinyNet(7), TinyNet(10).state_dict(), "weights.safetensors"), CardError)


def pickled_weights(tmp: Path) -> str:
    from models.card import CardError, read_state_dict

    torch.save(TinyNet(), tmp / "weights.pt")
    return error_text(lambda: read_state_dict(tmp / "weights.pt"), CardError)


def fft_export(tmp: Path) -> str:
    from export.graph import GraphError, export_onnx
    from models.kinds import get_kind

    class FFTNet(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(3, 10)

        def forward(self, x):
            return self.fc(torch.fft.rfft(x, dim=-1).abs().mean((2, 3)))

    kind = get_kind("image_classifier")
    wrapper = kind.export_wrapper(FFTNet().eval(), IMAGE_CARD)
    return error_text(lambda: export_onnx(wrapper, kind, IMAGE_CARD, tmp / "fft.onnx"), GraphError)


def missing_feature_module() -> str:
    from models.kinds import KindError
    from models.kinds.image import module_at

    net = nn.Module()
    net.resnet = nn.Module()
    net.resnet.pooler = nn.AdaptiveAvgPool2d(1)
    return error_text(lambda: module_at(net, "resnet.poolr"), KindError)


def spec_error(spec: dict) -> str:
    from models.preprocess import PreprocessingError, validate_spec

    return error_text(lambda: validate_spec(spec), PreprocessingError)


def strict_fold(tmp: Path) -> str:
    from export.fold import FoldError, fold_batchnorm_onnx

    model = onnx.load(str(foreign_graph(tmp / "g.onnx")))
    return error_text(lambda: fold_batchnorm_onnx(model, strict_fold=True), FoldError)


IMAGENET = {"channels": 3, "resize": 256, "crop": [224, 224], "mean": [0.5] * 3, "std": [0.5] * 3}
PRODUCERS: dict[str, Callable[[Path], str]] = {
    "$.labels: '0123' is not of type 'array'": lambda tmp: card_error({**IMAGE_CARD, "labels": "0123"}),
    "$: unknown field(s) 'labeles' (did you mean 'labels'?)": lambda tmp: card_error(typo_card()),
    "$: 'preprocessing' is a required property": lambda tmp: card_error(
        {k: v for k, v in IMAGE_CARD.items() if k != "preprocessing"}),
    "cannot import module 'my_resnett'": lambda tmp: factory_error("my_resnett:build"),
    "shape mismatch: ...classifier.1.weight model (7, 32) vs weights (10, 32)": lambda tmp: unfit_weights(),
    "torch.load(weights_only=True) refused it": pickled_weights,
    "the card has 9 labels but the network's scores have 10 columns": lambda tmp: probe_error(
        {**IMAGE_CARD, "labels": [str(i) for i in range(9)]}),
    "preprocessing.channels is 1 but the network's first convolution takes 3 channels": lambda tmp: probe_error(
        {**IMAGE_CARD, "preprocessing": {"channels": 1, "resize": [8, 8], "mean": [0.5], "std": [0.5]}}),
    "'crop' [300, 200] is larger than 'resize' [256, 256]": lambda tmp: spec_error(
        {**IMAGENET, "resize": [256, 256], "crop": [300, 200]}),
    "'channel_order' BGR needs 'channels': 3": lambda tmp: spec_error(
        {"channels": 1, "channel_order": "BGR", "resize": [8, 8], "mean": [0.5], "std": [0.5]}),
    'set "scores": "logits"': lambda tmp: probe_error({**IMAGE_CARD, "scores": "probabilities"},
                                                      TinyNet(softmax=True)),
    "ONNX export failed: ...aten::fft_rfft...": fft_export,
    "features.module 'resnet.poolr' is not a module of the network; close: ['resnet.pooler', ...]":
        lambda tmp: missing_feature_module(),
    "the card's vocab has 13 tokens but the network's embedding has 12 rows": lambda tmp: lm_error(13, False),
    "set lm.batch_first to false": lambda tmp: lm_error(12, True),
    "the graph has a fixed batch of 1 on input pixels": lambda tmp: foreign_check_error(tmp, foreign_card(), 1),
    "pass --make-batch-dynamic (or set \"make_batch_dynamic\": true in the card's \"onnx\")":
        lambda tmp: foreign_check_error(tmp, foreign_card(), 1),
    "probs: declared output not in the graph": lambda tmp: foreign_check_error(tmp, foreign_card(),
                                                                               outputs={"scores": "probs"}),
    "the graph's input is ['batch', 1, 8, 8] but the card makes ['N', 1, 16, 16]": lambda tmp: foreign_check_error(
        tmp, foreign_card(resize=[16, 16])),
    "cannot be folded: its input comes from Relu node 'relu'": strict_fold,
}


def test_every_quoted_message_has_a_producer():
    quoted = quoted_messages()
    assert len(quoted) == len(set(quoted)) and len(quoted) >= 15, quoted
    assert sorted(quoted) == sorted(PRODUCERS), (set(quoted) ^ set(PRODUCERS))


@pytest.mark.parametrize("message", list(PRODUCERS))
def test_the_quoted_message_is_what_a_user_gets(message, tmp_path):
    got = PRODUCERS[message](tmp_path)
    pattern = ".*".join(re.escape(part) for part in message.split("..."))
    assert re.search(pattern, got, re.S), f"docs/your-model.md quotes {message!r}; nnserve says {got!r}"


# ---- the field tables are the schema ---------------------------------------------------------------------

def schema_fields(properties: dict, prefix: str = "") -> tuple[set[str], set[str]]:
    """(every field path, the leaves): an object with its own properties is a parent of dotted children."""
    every, leaves = set(), set()
    for name, sub in properties.items():
        path = prefix + name
        every.add(path)
        if "properties" in sub:
            child_every, child_leaves = schema_fields(sub["properties"], path + ".")
            every |= child_every
            leaves |= child_leaves
        else:
            leaves.add(path)
    return every, leaves


def test_every_schema_field_is_documented_and_every_documented_field_is_in_the_schema():
    from models.card import schema

    documented = {name for heading in ("## The artifact: a card and weights", "### Preprocessing")
                  for row in table(heading) for name in re.findall(r"`([^`]+)`", row[0])}
    every, leaves = schema_fields(schema()["properties"])
    assert leaves <= documented, f"schema fields missing from docs/your-model.md: {sorted(leaves - documented)}"
    assert documented <= every, f"documented fields not in the schema: {sorted(documented - every)}"
    assert {"preprocessing.layout", "preprocessing.content_size", "preprocessing.input_size",
            "preprocessing.channel_order", "preprocessing.pad_value"} <= leaves


def test_the_docs_card_schema_is_the_schema():
    docs_copy = DOC.parent / "card.schema.json"
    from models.card import SCHEMA_PATH

    assert json.loads(docs_copy.read_text()) == json.loads(SCHEMA_PATH.read_text())


def test_a_misspelled_required_field_is_named_with_the_fix_before_what_it_leaves_missing():
    from models.card import CardError, validate_card

    with pytest.raises(CardError) as info:
        validate_card(typo_card())
    message = str(info.value)
    assert "$: unknown field(s) 'labeles' (did you mean 'labels'?)" in message
    assert "required property" not in message, "the typo explains the missing 'labels'"
    both = typo_card()
    del both["preprocessing"]
    assert "; also missing: 'preprocessing'" in card_error(both)
