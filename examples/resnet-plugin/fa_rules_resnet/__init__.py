"""Example plugin: a user's own models, registered as plain factories.

`my_resnet` returns an ordinary `nn.Sequential` whose items are the blocks: a stem, residual units
(any module from tensor to tensor) and a pooled Linear readout. fa-rules sees each item as one
block; the feedback-alignment family reaches every Linear and Conv2d inside them, batch norm trains
by its true gradient and keeps its running statistics (the engine carries them). Keyword arguments
with defaults are the model's options:

    pip install ./examples/resnet-plugin
    fa-rules train --rule sign_symmetry --model my_resnet --model-opt width=32 --model-opt units=3 \\
        --dataset digits --epochs 3

`plugin_resnet18` returns torchvision's ResNet-18 exactly as torchvision builds it: fa-rules cuts it
at its top-level children for the block-level rules and feeds grey images to its 3-channel stem:

    fa-rules train --rule dfa --model plugin_resnet18 --dataset fashion_mnist --epochs 1
"""

import torch
from torch import nn

from fa_rules.core import hookimpl


def batch_norm(channels: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(channels)


class Residual(nn.Module):
    """`relu(x + bn(conv(relu(bn(conv(x))))))`, channels and size unchanged."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(channels, channels, 3, padding=1, bias=False), batch_norm(channels)
        self.conv2, self.bn2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False), batch_norm(channels)

    def forward(self, x):
        return torch.relu(x + self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x))))))


def my_resnet(in_shape, out_shape, width: int = 16, units: int = 2) -> nn.Sequential:
    """A small residual network: conv stem, `units` residual units of `width` channels, pooled readout."""
    stem = nn.Sequential(nn.Conv2d(in_shape[0], width, 3, padding=1, bias=False), batch_norm(width), nn.ReLU())
    readout = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(width, out_shape[0]))
    return nn.Sequential(stem, *(Residual(width) for _ in range(units)), readout)


def plugin_resnet18(in_shape, out_shape) -> nn.Module:
    """torchvision's ResNet-18 as it is (weights=None), registered by a plugin."""
    import torchvision

    return torchvision.models.resnet18(weights=None, num_classes=out_shape[0])


@hookimpl
def register_models(register):
    register(my_resnet)
    register(plugin_resnet18)
