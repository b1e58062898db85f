"""Transfer check for the FC7 features: ``python -m models.transfer artifacts/vgg_fc7``.

A VGG trained on MNIST only; its FC7 activations of the (different) UCI 8x8 digits, resized to the
network's input, train a logistic regression on 20% and classify the other 80%.
"""

from __future__ import annotations

import argparse
from typing import Any

import numpy as np
import torch

from models.data import load_uci_digits
from models.preprocess import preprocess_uint8


@torch.no_grad()
def fc7_features(model: Any, images_uint8: np.ndarray, spec: dict, batch: int = 256) -> np.ndarray:
    model.eval()
    x = torch.from_numpy(preprocess_uint8(images_uint8, spec))
    return torch.cat([model.forward_with_fc7(x[i:i + batch])[1] for i in range(0, len(x), batch)]).numpy()


def transfer_accuracy(model: torch.nn.Module, spec: dict, seed: int = 0, train_fraction: float = 0.2) -> float:
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import train_test_split
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    images, labels = load_uci_digits(content_size=spec["content_size"])
    features = fc7_features(model, images, spec)
    f_train, f_test, y_train, y_test = train_test_split(
        features, labels, train_size=train_fraction, stratify=labels, random_state=seed)
    clf = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000))
    clf.fit(f_train, y_train)
    return float(clf.score(f_test, y_test))


def main() -> None:
    from models.artifact import load_artifact

    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("artifact")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    model, card = load_artifact(args.artifact)
    acc = transfer_accuracy(model, card["preprocessing"], seed=args.seed)
    print(f"UCI 8x8 digits, logistic regression on FC7 (20% train / 80% test): accuracy {acc:.4f}")


if __name__ == "__main__":
    main()
