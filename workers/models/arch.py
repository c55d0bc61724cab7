"""Architectures a model card can name, in plain PyTorch.

Cards refer to an architecture by name and pass ``architecture_params``; the weights
file must hold exactly that module's state dict.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from torch import Tensor, nn

from workers.models.densenet import densenet121
from workers.models.resnet import resnet18, resnet50


def _conv_block(c_in: int, c_out: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, 3, padding=1, bias=False),
        nn.BatchNorm2d(c_out),
        nn.ReLU(inplace=True),
        nn.Conv2d(c_out, c_out, 3, padding=1, bias=False),
        nn.BatchNorm2d(c_out),
        nn.ReLU(inplace=True),
        nn.MaxPool2d(2),
    )


class SmallCNN(nn.Module):
    """A compact VGG-style classifier: strided stem, conv blocks, global pooling, linear head."""

    def __init__(self, in_channels: int, num_classes: int, widths: Sequence[int] = (16, 32, 64, 128)) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(in_channels, widths[0], 5, stride=2, padding=2, bias=False),
            nn.BatchNorm2d(widths[0]),
            nn.ReLU(inplace=True),
        )
        self.features = nn.Sequential(
            *(_conv_block(a, b) for a, b in zip(widths[:-1], widths[1:], strict=True))
        )
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(widths[-1], num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.features(self.stem(x))
        return self.classifier(self.pool(x).flatten(1))


ArchitectureFactory = Callable[..., nn.Module]

ARCHITECTURES: dict[str, ArchitectureFactory] = {
    "radq-smallcnn": SmallCNN,
    "densenet121": densenet121,
    "resnet18": resnet18,
    "resnet50": resnet50,
}
"""Architecture name (as written in a card) to a factory taking
``in_channels``, ``num_classes`` and the card's ``architecture_params``."""
