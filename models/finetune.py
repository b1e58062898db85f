"""Fine-tune any image network on UCI digits and write an nnserve artifact (the tutorial's step 1).

    python -m models.finetune --factory efficientnet_pytorch:EfficientNet.from_name \\
        --kwargs '{"model_name": "efficientnet-b0", "num_classes": 10, "image_size": 32}' \\
        --name effnet_digits --size 32 --channels 3 --seconds 60

The network comes from ``--factory`` (``package.module:callable``, as in a card); ``--code my_net.py`` copies
a file of your own beside the card so export can import it. The digits (scikit-learn's UCI 8x8 set, no
download) are resized to ``--size`` and standardized with ImageNet's mean/std (what library networks
expect). The artifact gets ``card.json``, ``weights.safetensors`` and ``eval.npz`` (held-out digits and
labels) to pass to ``python -m export ... --eval-data`` (docs/your-model.md).
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from tqdm import tqdm

from models.artifact import save_artifact
from models.card import build_module
from models.data import UCI_SOURCE, load_uci_digits
from models.kinds.image import pick_output
from models.preprocess import image_to_uint8, preprocess_upload_pixels

IMAGENET_MEAN, IMAGENET_STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m models.finetune", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--factory", required=True, help="package.module:callable building the network")
    p.add_argument("--kwargs", default="{}", help="JSON keyword arguments for the factory")
    p.add_argument("--name", required=True, help="model name (lowercase letters, digits, . _ -)")
    p.add_argument("--out", type=Path, help="artifact directory (default artifacts/NAME)")
    p.add_argument("--code", type=Path, nargs="*", default=[], help="your own .py files to copy beside the card")
    p.add_argument("--size", type=int, default=32, help="input height and width")
    p.add_argument("--channels", type=int, choices=(1, 3), default=3)
    p.add_argument("--output", help="card 'output': the part of forward()'s result with the logits")
    p.add_argument("--features-module", help="also an image_feature_extractor: the embedding's module path")
    p.add_argument("--seconds", type=float, default=60.0, help="training time budget")
    p.add_argument("--max-steps", type=int, default=10_000)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def digits_split(seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    from sklearn.model_selection import train_test_split

    images, labels = load_uci_digits()
    return train_test_split(images, labels, test_size=0.25, stratify=labels, random_state=seed)


def preprocess(images: np.ndarray, spec: dict) -> torch.Tensor:
    """uint8 digits -> the network's input, by the very functions the service runs on an upload."""
    return torch.from_numpy(np.stack([preprocess_upload_pixels(image_to_uint8(Image.fromarray(img), spec), spec)
                                      for img in images]))


def main(argv: list[str] | None = None) -> Path:
    args = parse_args(argv)
    torch.manual_seed(args.seed)
    spec = {"channels": args.channels, "resize": [args.size, args.size], "resample": "bilinear",
            "mean": IMAGENET_MEAN[:args.channels] if args.channels == 3 else [0.5],
            "std": IMAGENET_STD[:args.channels] if args.channels == 3 else [0.25]}
    card = {"format": "nnserve.artifact/2", "name": args.name,
            "kind": "image_feature_extractor" if args.features_module else "image_classifier",
            "config": {"factory": args.factory, "kwargs": json.loads(args.kwargs)},
            "labels": [str(i) for i in range(10)], "scores": "logits", "preprocessing": spec,
            **({"output": args.output} if args.output else {}),
            **({"features": {"module": args.features_module}} if args.features_module else {})}
    staging = Path(args.out or f"artifacts/{args.name}")
    for file in args.code:  # the factory's own module must be importable while building
        staging.mkdir(parents=True, exist_ok=True)
        shutil.copy2(file, staging / file.name)
    model = build_module(card, staging)
    x_train, x_test, y_train, y_test = digits_split(args.seed)
    xt, yt = preprocess(x_train, spec), torch.from_numpy(y_train)
    opt = torch.optim.Adam(model.parameters(), lr=args.lr)
    start, step = time.perf_counter(), 0
    bar = tqdm(total=args.max_steps, desc=f"{args.name} fine-tune", unit="step")
    model.train()
    while step < args.max_steps and time.perf_counter() - start < args.seconds:
        idx = torch.randint(0, len(xt), (args.batch_size,))
        loss = F.cross_entropy(pick_output(model(xt[idx]), args.output, "output"), yt[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
        step += 1
        bar.update()
        bar.set_postfix(loss=f"{loss.item():.3f}")
    bar.close()
    model.eval()
    with torch.no_grad():
        pred = pick_output(model(preprocess(x_test, spec)), args.output, "output").argmax(1).numpy()
    accuracy = float((pred == y_test).mean())
    card.update(dataset={"source": UCI_SOURCE, "split": {"train": len(y_train), "test": len(y_test)}},
                metrics={"test_accuracy": accuracy, "steps": step}, seed=args.seed,
                train_seconds=round(time.perf_counter() - start, 1))
    code = list(args.code)

    def extras(tmp: Path) -> None:
        np.savez(tmp / "eval.npz", images=x_test, labels=y_test)
        for file in code:
            shutil.copy2(file, tmp / file.name)

    out = save_artifact(staging, model, card, extra_files=extras)
    print(f"{args.name}: {step} steps in {card['train_seconds']} s, held-out accuracy {accuracy:.4f}; wrote {out}",
          flush=True)
    return out


if __name__ == "__main__":
    main()
