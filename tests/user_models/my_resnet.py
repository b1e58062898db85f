"""A user's factory file, as docs/your-model.md shows: a transformers ResNet built from its config object
(a card's kwargs are JSON, so a few lines turn them into the config the class wants)."""

from transformers import ResNetConfig, ResNetForImageClassification


def build(num_labels: int = 10, hidden_sizes: tuple[int, ...] = (16, 32), depths: tuple[int, ...] = (1, 1),
          num_channels: int = 3):
    config = ResNetConfig(num_channels=num_channels, embedding_size=16, hidden_sizes=list(hidden_sizes),
                          depths=list(depths), num_labels=num_labels)
    return ResNetForImageClassification(config)
