"""Example plugin: a user's own residual network, registered as a plain factory.

The factory returns an ordinary `nn.Sequential` whose items are the blocks: a stem, residual units
(any module from tensor to tensor) and a pooled Linear readout. fa-rules sees each item as one
block; the feedback-alignment family reaches every Linear and Conv2d inside them, batch norm trains
by its true gradient. Keyword arguments with defaults are the model's options:

    pip install ./examples/resnet-plugin
    fa-rules train --rule sign_symmetry --model my_resnet --model-opt width=32 --model-opt units=3 \\
        --dataset digits --epochs 3
"""

import torch
from torch import nn

from fa_rules.core import hookimpl


def batch_norm(channels: int) -> nn.BatchNorm2d:
    # batch statistics only: the network stays a pure function of its parameters
    return nn.BatchNorm2d(channels, track_running_stats=False)


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


@hookimpl
def register_models(register):
    register(my_resnet)
