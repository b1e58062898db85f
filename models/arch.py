"""Model architectures: LeNet-5 (BN + dropout), a VGG-style net with an FC7 feature layer, char LSTM/GRU.

Every model is built from its card alone: ``config = {"factory": "models.arch:LeNet5", "kwargs": {...}}``,
the same contract as a user's own network (models/card.py).
"""

from __future__ import annotations

import torch
from torch import nn

RNNState = torch.Tensor | tuple[torch.Tensor, torch.Tensor]


def he_init(module: nn.Module) -> None:
    """He (Kaiming) initialisation for ReLU networks; BN starts as identity."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d | nn.Linear):
            nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d | nn.BatchNorm1d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


def conv_bn_relu(cin: int, cout: int, kernel: int, padding: int = 0) -> list[nn.Module]:
    # Conv keeps its bias (LeNet-5's parameter count); export folds BN into weight and bias.
    return [nn.Conv2d(cin, cout, kernel, padding=padding), nn.BatchNorm2d(cout), nn.ReLU()]


class LeNet5(nn.Module):
    """CONV(6@5x5)-POOL-CONV(16@5x5)-POOL-FC(120)-FC(84)-FC(classes), BN after each conv."""

    def __init__(self, in_channels: int = 1, input_size: int = 32, num_classes: int = 10,
                 dropout: float = 0.25) -> None:
        super().__init__()
        self.features = nn.Sequential(
            *conv_bn_relu(in_channels, 6, 5), nn.MaxPool2d(2),
            *conv_bn_relu(6, 16, 5), nn.MaxPool2d(2),
        )
        side = ((input_size - 4) // 2 - 4) // 2
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Dropout(dropout), nn.Linear(16 * side * side, 120), nn.ReLU(),
            nn.Dropout(dropout), nn.Linear(120, 84), nn.ReLU(),
            nn.Dropout(dropout), nn.Linear(84, num_classes),
        )
        he_init(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


class VGGFC7(nn.Module):
    """VGG-style: blocks of (3x3 conv + BN + ReLU) x n and 2x2 max pooling, channels doubling per block,
    then FC6 -> FC7 (Linear + ReLU + Dropout) -> FC8. FC7 (post-ReLU) is the feature vector."""

    def __init__(self, in_channels: int = 1, input_size: int = 32, num_classes: int = 10,
                 base_width: int = 32, blocks: int = 3, convs_per_block: int = 1,
                 fc_width: int = 4096, dropout: float = 0.5) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        cin, width = in_channels, base_width
        for _ in range(blocks):
            for i in range(convs_per_block):
                layers += conv_bn_relu(cin if i == 0 else width, width, 3, padding=1)
            layers.append(nn.MaxPool2d(2))
            cin, width = width, width * 2
        self.features = nn.Sequential(*layers)
        side = input_size // 2**blocks
        self.fc6 = nn.Sequential(nn.Flatten(), nn.Linear(cin * side * side, fc_width), nn.ReLU(),
                                 nn.Dropout(dropout))
        self.fc7 = nn.Sequential(nn.Linear(fc_width, fc_width), nn.ReLU())
        self.fc7_dropout = nn.Dropout(dropout)
        self.fc8 = nn.Linear(fc_width, num_classes)
        he_init(self)

    def forward_with_fc7(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        fc7 = self.fc7(self.fc6(self.features(x)))
        return self.fc8(self.fc7_dropout(fc7)), fc7

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_with_fc7(x)[0]


class CharRNN(nn.Module):
    """Embedding -> multi-layer LSTM/GRU (dropout between layers) -> Linear to vocabulary logits.

    ``forward(tokens[B,T], state) -> (logits[B,T,V], new_state)``: T>1 prefills a prompt, T=1 decodes
    a step. The state is ``(h, c)`` for LSTM and ``h`` for GRU, each ``[layers, B, hidden]``.

    ``tie_weights``: the head's weight is the embedding matrix (Press & Wolf 2017; needs embed_dim ==
    hidden_size): fewer parameters to learn from little data, and a character's input and output vectors
    agree. ``dropout`` also applies to the RNN's output before the head (it is the only dropout of one layer).
    """

    def __init__(self, cell: str, vocab_size: int, embed_dim: int = 64, hidden_size: int = 256,
                 num_layers: int = 2, dropout: float = 0.2, tie_weights: bool = False) -> None:
        super().__init__()
        if cell not in ("lstm", "gru"):
            raise ValueError(f"cell must be 'lstm' or 'gru', got {cell!r}")
        if tie_weights and embed_dim != hidden_size:
            raise ValueError(f"tie_weights needs embed_dim == hidden_size, got {embed_dim} and {hidden_size}")
        self.cell, self.num_layers, self.hidden_size = cell, num_layers, hidden_size
        rnn_cls = nn.LSTM if cell == "lstm" else nn.GRU
        self.embed = nn.Embedding(vocab_size, embed_dim)
        self.rnn = rnn_cls(embed_dim, hidden_size, num_layers, batch_first=True,
                           dropout=dropout if num_layers > 1 else 0.0)
        self.drop = nn.Dropout(dropout)
        self.head = nn.Linear(hidden_size, vocab_size)
        if tie_weights:
            self.head.weight = self.embed.weight  # one Parameter: both names in state_dict, one tensor

    def init_state(self, batch: int) -> RNNState:
        h = torch.zeros(self.num_layers, batch, self.hidden_size)
        return (h, h.clone()) if self.cell == "lstm" else h

    def forward(self, tokens: torch.Tensor, state: RNNState | None = None) -> tuple[torch.Tensor, RNNState]:
        if state is None:
            state = self.init_state(tokens.shape[0])
        out, new_state = self.rnn(self.embed(tokens), state)
        return self.head(self.drop(out)), new_state


# The card's config.factory for each of our networks (models/card.py builds any factory the same way).
FACTORIES = {"lenet5": "models.arch:LeNet5", "vgg_fc7": "models.arch:VGGFC7", "char_lstm": "models.arch:CharRNN",
             "char_gru": "models.arch:CharRNN"}
