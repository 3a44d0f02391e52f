"""The model zoo: network builders, all producing the block view of `fa_rules.core.network`.

Every builder has the signature `build(in_shape, out_shape, heads=None, **options) -> Network`.
`out_shape` is `(num_classes,)` for a classifier, `(latent_dim,)` for an encoder and `(C, H, W)`
for a generator. With `heads` (name -> width) the body ends in a hidden block and each head is a
linear map from it.

The paper networks follow the appendix of "Feature alignment as a generative process" (Tables
7-12): 3x3 convolutions, stride 1 / 2 instead of pooling, LeakyReLU. Each takes a
`width_multiplier` (default 1.0, the paper's sizes) that scales every convolution's channel count
and the hidden Linear width (rounded, at least 1), and nothing else: kernel sizes, strides,
padding, the number of layers, batch norm, the image channels in and out, the latent size and the
heads stay as the tables give them. At 0.25 a network has about 1/16 of the paper's parameters
(most weights connect two scaled widths).

The residual networks are He, Zhang, Ren & Sun 2016 ("Deep residual learning for image
recognition", CVPR, Sec. 4.2): a 3x3 conv of 16 channels, three stages of `n` basic residual
units (16, 32, 64 channels, the last two starting with stride 2), global average pooling and a
Linear output: `6n + 2` layers (ResNet-20: n = 3, -32: 5, -56: 9). Shortcuts where the shape
changes: option A (identity, subsampled by the stride and zero-padded to the new channels,
parameter-free; the paper's CIFAR choice) or B (a 1x1 convolution with batch norm). Each residual
unit is one block of the network view; batch norm uses batch statistics, at test time too (no
running buffers: the network is a pure function of its parameters), and trains by its true local
gradient under every rule; `running_stats=True` keeps running statistics as torch does instead
(the engine carries them and evaluation uses them). `vgg` is a small VGG-style net (Simonyan & Zisserman 2015): three stages of two 3x3
conv blocks (relu, batch norm), each stage ending in 2x2 max pooling, then a Linear output.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from fa_rules.core.errors import UserError
from fa_rules.core.network import Block, Network, flat_size, make_activation


# Declared upper bounds of the size options: beyond them a model is refused at once. Building a
# network runs Python for every layer (on the meta device too), so the memory check of `ModelSpec`
# would take minutes to count an absurd depth; widths past these only overflow torch's sizes.
MAX_MLP_DEPTH = 1000
MAX_MLP_WIDTH = 1 << 20
MAX_RESNET_DEPTH = 1202  # He et al.'s deepest CIFAR ResNet (n = 200)
MAX_RESNET_WIDTH = 1024
MAX_VGG_WIDTH = 4096
MAX_WIDTH_MULTIPLIER = 64.0


def _at_most(model: str, option: str, value, limit) -> None:
    """Refuse `option` above its declared bound, in one line saying what to choose instead."""
    if value > limit:
        raise UserError(f"{model} {option}={value} is more than the {limit} it allows; choose {option} <= {limit}")


def _heads(width: int, heads: dict[str, int] | None) -> dict[str, Block]:
    return {name: Block(nn.Linear(width, n)) for name, n in (heads or {}).items()}


def _shape_after(blocks: Sequence[Block], in_shape: Sequence[int]) -> tuple[int, ...]:
    """The output shape of `blocks`, from zeros run in evaluation mode (a training-mode pass would
    move running statistics before training starts)."""
    modes = [b.training for b in blocks]
    try:
        with torch.no_grad():
            x = torch.zeros(2, *in_shape)
            for b in blocks:
                x = b.eval()(x)
    finally:
        for b, mode in zip(blocks, modes):
            b.train(mode)
    return tuple(x.shape[1:])


def _dense_tail(
    blocks: list[Block],
    in_shape: Sequence[int],
    hidden: Sequence[int],
    out_shape: Sequence[int],
    activation: str,
    heads: dict[str, int] | None,
    out_activation: str = "identity",
) -> tuple[list[Block], dict[str, Block]]:
    """Flatten, hidden Linear blocks, then a Linear output block (or heads)."""
    feat_shape = _shape_after(blocks, in_shape) if blocks else tuple(in_shape)
    width = flat_size(feat_shape)
    first = True
    for h in hidden:
        blocks.append(Block(nn.Linear(width, h), make_activation(activation), in_shape=(width,) if first else None))
        width, first = h, False
    if heads:
        return blocks, _heads(width, heads)
    blocks.append(
        Block(nn.Linear(width, flat_size(out_shape)), make_activation(out_activation), in_shape=(width,) if first else None)
    )
    return blocks, {}


def mlp(in_shape, out_shape, heads=None, depth: int = 2, width: int = 256, activation: str = "tanh",
        out_activation: str = "identity") -> Network:
    """`depth` hidden Linear blocks of `width` units, then a Linear output block (or heads)."""
    if depth < 0 or width < 1:
        raise UserError(f"mlp needs depth >= 0 and width >= 1 (got depth={depth}, width={width})")
    _at_most("mlp", "depth", depth, MAX_MLP_DEPTH)
    _at_most("mlp", "width", width, MAX_MLP_WIDTH)
    blocks, head_blocks = _dense_tail([], in_shape, [width] * depth, out_shape, activation, heads, out_activation)
    return Network(blocks, head_blocks, family="mlp", in_shape=in_shape, out_shape=out_shape)


def lenet(in_shape, out_shape, heads=None, activation: str = "relu") -> Network:
    """LeNet-5 style: conv5(6)-pool-conv5(16)-pool-fc120-fc84-out (padded so 8x8 inputs work)."""
    if len(in_shape) != 3:
        raise UserError(f"lenet needs image inputs (C, H, W), got shape {tuple(in_shape)}")
    c = in_shape[0]
    blocks = [
        Block(nn.Conv2d(c, 6, 5, padding=2), make_activation(activation), nn.MaxPool2d(2)),
        Block(nn.Conv2d(6, 16, 5, padding=2), make_activation(activation), nn.MaxPool2d(2)),
    ]
    blocks, head_blocks = _dense_tail(blocks, in_shape, [120, 84], out_shape, activation, heads)
    return Network(blocks, head_blocks, family="lenet", in_shape=in_shape, out_shape=out_shape)


class ResizedConv2d(nn.Conv2d):
    """A Conv2d that first resizes its input bilinearly to `size` x `size` (still affine in the
    input, so the feedback rules treat it as any convolution)."""

    def __init__(self, *args, size: int, **kwargs):
        super().__init__(*args, **kwargs)
        self.size = size

    def forward(self, x):
        import torch.nn.functional as F

        x = F.interpolate(x, size=(self.size, self.size), mode="bilinear", align_corners=False)
        return super().forward(x)


def biotorch_lenet(in_shape, out_shape, heads=None, activation: str = "relu") -> Network:
    """BioTorch's `le_net_mnist`: inputs resized to 32x32, conv5(6)-pool-conv5(16)-pool-conv5(120)
    (no padding), fc84, out; the network behind BioTorch's MNIST and Fashion-MNIST benchmarks."""
    if len(in_shape) != 3:
        raise UserError(f"biotorch_lenet needs image inputs (C, H, W), got shape {tuple(in_shape)}")
    blocks = [
        Block(ResizedConv2d(in_shape[0], 6, 5, size=32), make_activation(activation), nn.MaxPool2d(2)),
        Block(nn.Conv2d(6, 16, 5), make_activation(activation), nn.MaxPool2d(2)),
        Block(nn.Conv2d(16, 120, 5), make_activation(activation)),
    ]
    blocks, head_blocks = _dense_tail(blocks, in_shape, [84], out_shape, activation, heads)
    return Network(blocks, head_blocks, family="biotorch_lenet", in_shape=in_shape, out_shape=out_shape)


def scaled(width: int, multiplier: float) -> int:
    """A paper width under a width multiplier: rounded, never below 1."""
    if not (isinstance(multiplier, (int, float)) and multiplier > 0 and multiplier == multiplier and multiplier != float("inf")):
        raise UserError(f"width_multiplier must be a finite number > 0, got {multiplier!r}")
    if multiplier > MAX_WIDTH_MULTIPLIER:
        raise UserError(f"width_multiplier={multiplier} is more than the {MAX_WIDTH_MULTIPLIER:g} the paper networks "
                        f"allow; choose width_multiplier <= {MAX_WIDTH_MULTIPLIER:g}")
    return max(1, round(width * multiplier))


# (conv channels with stride 1 then 2 per stage, hidden Linear width) per input size: Tables 7-9
_PAPER_ENCODERS = {28: ((32, 64), 4096), 32: ((32, 64, 128), 2048), 64: ((32, 64, 128, 256), 4096)}


def _paper_convs(in_shape, activation: str, batch_norm: bool, multiplier: float) -> list[Block]:
    c, h, w = in_shape
    if h != w or h not in _PAPER_ENCODERS:
        raise UserError(
            f"the paper networks are defined for 28x28, 32x32 and 64x64 images, got {h}x{w}"
        )
    stages, _ = _PAPER_ENCODERS[h]
    blocks = []
    for ch in (scaled(ch, multiplier) for ch in stages):
        blocks.append(Block(nn.Conv2d(c, ch, 3, 1, 1), make_activation(activation)))
        post = nn.BatchNorm2d(ch, track_running_stats=False) if batch_norm else None
        blocks.append(Block(nn.Conv2d(ch, ch, 3, 2, 1), make_activation(activation), post))
        c = ch
    return blocks


def paper_encoder(in_shape, out_shape, heads=None, activation: str = "leaky_relu",
                  width_multiplier: float = 1.0) -> Network:
    """Encoder of Tables 7 (28x28), 8 (32x32) and 9 (64x64): convs, Linear(hidden), Linear(Z)."""
    blocks = _paper_convs(in_shape, activation, batch_norm=False, multiplier=width_multiplier)
    hidden = scaled(_PAPER_ENCODERS[in_shape[1]][1], width_multiplier)
    blocks, head_blocks = _dense_tail(blocks, in_shape, [hidden], out_shape, activation, heads)
    return Network(blocks, head_blocks, family="paper_encoder", in_shape=in_shape, out_shape=out_shape)


def paper_discriminator(in_shape, out_shape=(1,), heads=None, activation: str = "leaky_relu",
                        width_multiplier: float = 1.0) -> Network:
    """Discriminator of Table 10: the encoder with batch norm after each stride-2 conv, Linear(1).

    Batch norm always uses batch statistics (no running buffers), which keeps the network a pure
    function of its parameters.
    """
    blocks = _paper_convs(in_shape, activation, batch_norm=True, multiplier=width_multiplier)
    hidden = scaled(_PAPER_ENCODERS[in_shape[1]][1], width_multiplier)
    blocks, head_blocks = _dense_tail(blocks, in_shape, [hidden], out_shape, activation, heads)
    return Network(blocks, head_blocks, family="paper_discriminator", in_shape=in_shape, out_shape=out_shape)


def _bn(ch: int, on: bool):
    return nn.BatchNorm2d(ch, track_running_stats=False) if on else None


def fa_generator(in_shape, out_shape=None, heads=None, activation: str = "leaky_relu",
                 batch_norm: bool = True, width_multiplier: float = 1.0) -> Network:
    """Generator of Table 11 (image -> image refinement for VFA-GAN): three 7x7 convs.

    The table prints padding 1, which would shrink every image by 4 pixels per conv; we pad by 3 so
    the output has the input's size. Batch norm after the hidden convs follows the paper's text
    ("only the generator utilizes batch normalization after each convolution"); it is an option.
    """
    c, hidden = in_shape[0], scaled(128, width_multiplier)
    blocks = [
        Block(nn.Conv2d(c, hidden, 7, 1, 3), make_activation(activation), _bn(hidden, batch_norm)),
        Block(nn.Conv2d(hidden, hidden, 7, 1, 3), make_activation(activation), _bn(hidden, batch_norm)),
        Block(nn.Conv2d(hidden, c, 7, 1, 3), make_activation("sigmoid")),
    ]
    return Network(blocks, {}, family="fa_generator", in_shape=in_shape, out_shape=in_shape)


def gan_generator(in_shape, out_shape, heads=None, activation: str = "leaky_relu",
                  batch_norm: bool = True, width_multiplier: float = 1.0) -> Network:
    """Generator of Table 12 (latent -> image): Linear to 256 x s x s, transposed convs, conv, sigmoid.

    64x64 images get the table's four upsampling stages; 32x32 and 28x28 drop the last pairs as the
    table caption says (s = 4, 4, 7 respectively).
    """
    if len(in_shape) != 1 or len(out_shape) != 3:
        raise UserError(f"gan_generator maps a latent vector to an image (channels, height, width); it cannot map "
                        f"{tuple(in_shape)} to {tuple(out_shape)}")
    (z,) = tuple(in_shape)
    c, h, w = out_shape
    stages = 0
    while stages < 4 and h % (2 ** (stages + 1)) == 0 and h // 2 ** (stages + 1) >= 4:
        stages += 1
    if stages == 0 or h != w:
        raise UserError(f"gan_generator cannot build {h}x{w} images")
    s = h // 2**stages
    first = scaled(256, width_multiplier)
    channels = [scaled(ch, width_multiplier) for ch in (256, 128, 64, 32)][:stages]
    blocks = [Block(nn.Linear(z, first * s * s), make_activation(activation))]
    prev = first
    for i, ch in enumerate(channels):
        if i > 0:  # the stride-1 transposed conv that changes width before each later upsampling
            blocks.append(Block(nn.ConvTranspose2d(prev, ch, 3, 1, 1), make_activation(activation), _bn(ch, batch_norm),
                                in_shape=None))
            prev = ch
        up = nn.ConvTranspose2d(prev, ch, 3, 2, 1, output_padding=1)
        blocks.append(Block(up, make_activation(activation), _bn(ch, batch_norm),
                            in_shape=(first, s, s) if i == 0 else None))
        prev = ch
    blocks.append(Block(nn.Conv2d(prev, c, 3, 1, 1), make_activation("sigmoid")))
    return Network(blocks, {}, family="gan_generator", in_shape=in_shape, out_shape=out_shape)


# -- residual networks (He et al. 2016, CIFAR) and a small VGG ----------------------------------------
SHORTCUTS = ("A", "B")


def _batch_norm(channels: int, running_stats: bool = False) -> nn.BatchNorm2d:
    """Batch norm with batch statistics at test time too (the zoo's default, a pure function of the
    parameters), or, with `running_stats`, running statistics as torch keeps them (the engine
    carries them: `fa_rules.core.network`)."""
    return nn.BatchNorm2d(channels, track_running_stats=running_stats)


class ZeroPadShortcut(nn.Module):
    """Option A: the input subsampled by `stride` and zero-padded with `extra` channels."""

    def __init__(self, extra: int, stride: int):
        super().__init__()
        self.extra, self.stride = extra, stride

    def forward(self, x):
        x = x[:, :, :: self.stride, :: self.stride]
        return torch.nn.functional.pad(x, (0, 0, 0, 0, self.extra // 2, self.extra - self.extra // 2))


class ResidualUnit(nn.Module):
    """He et al.'s basic unit: `relu(bn(conv(relu(bn(conv(x))))) + shortcut(x))`, 3x3 convs."""

    def __init__(self, in_channels: int, channels: int, stride: int = 1, shortcut: str = "A",
                 running_stats: bool = False):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, channels, 3, stride, 1, bias=False)
        self.bn1 = _batch_norm(channels, running_stats)
        self.conv2 = nn.Conv2d(channels, channels, 3, 1, 1, bias=False)
        self.bn2 = _batch_norm(channels, running_stats)
        if stride == 1 and in_channels == channels:
            self.shortcut = nn.Identity()
        elif shortcut == "A":
            self.shortcut = ZeroPadShortcut(channels - in_channels, stride)
        else:
            self.shortcut = nn.Sequential(nn.Conv2d(in_channels, channels, 1, stride, bias=False),
                                          _batch_norm(channels, running_stats))

    def forward(self, x):
        out = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


def resnet(in_shape, out_shape, heads=None, depth: int = 20, width: int = 16, shortcut: str = "A",
           running_stats: bool = False) -> Network:
    """He et al.'s CIFAR ResNet with `depth = 6n + 2` layers; stage widths `width`, 2x, 4x."""
    if len(in_shape) != 3:
        raise UserError(f"resnet needs image inputs (C, H, W), got shape {tuple(in_shape)}")
    if depth < 8 or (depth - 2) % 6 or width < 1:
        raise UserError(f"resnet needs depth = 6n + 2 >= 8 and width >= 1 (got depth={depth}, width={width})")
    _at_most("resnet", "depth", depth, MAX_RESNET_DEPTH)
    _at_most("resnet", "width", width, MAX_RESNET_WIDTH)
    if shortcut not in SHORTCUTS:
        raise UserError(f"unknown shortcut '{shortcut}' (use A: zero-padding identity, or B: 1x1 projection)")
    n = (depth - 2) // 6
    stem = nn.Sequential(nn.Conv2d(in_shape[0], width, 3, 1, 1, bias=False), _batch_norm(width, running_stats),
                         nn.ReLU())
    blocks: list[nn.Module] = [stem]
    channels = width
    for stage in range(3):
        for unit in range(n):
            stride = 2 if stage > 0 and unit == 0 else 1
            blocks.append(ResidualUnit(channels, width * 2**stage, stride, shortcut, running_stats))
            channels = width * 2**stage
    pool = [nn.AdaptiveAvgPool2d(1), nn.Flatten()]
    if heads:
        blocks.append(nn.Sequential(*pool))
        return Network(blocks, _heads(channels, heads), family="resnet", in_shape=in_shape, out_shape=out_shape)
    blocks.append(nn.Sequential(*pool, nn.Linear(channels, flat_size(out_shape))))
    return Network(blocks, {}, family="resnet", in_shape=in_shape, out_shape=out_shape)


def resnet_of_depth(depth: int):
    """`resnet` at a fixed depth (ResNet-20, -32, -56), its other settings free."""

    def build(in_shape, out_shape, heads=None, width: int = 16, shortcut: str = "A",
              running_stats: bool = False) -> Network:
        return resnet(in_shape, out_shape, heads, depth=depth, width=width, shortcut=shortcut,
                      running_stats=running_stats)

    build.__name__ = build.__qualname__ = f"resnet{depth}"
    build.__doc__ = f"He et al.'s CIFAR ResNet-{depth}."
    return build


def vgg(in_shape, out_shape, heads=None, width: int = 32, activation: str = "relu", batch_norm: bool = True,
        running_stats: bool = False, convs_per_stage: int = 2) -> Network:
    """Small VGG-style net: stages of `width`, 2x, 4x channels, `convs_per_stage` 3x3 conv blocks
    each (two by default; batch norm after the activation), 2x2 max pooling closing each stage, then
    a Linear output. More convs per stage deepen it as VGG-11 to -19 do."""
    if len(in_shape) != 3:
        raise UserError(f"vgg needs image inputs (C, H, W), got shape {tuple(in_shape)}")
    _at_most("vgg", "width", width, MAX_VGG_WIDTH)
    if convs_per_stage < 1:
        raise UserError(f"vgg needs convs_per_stage >= 1 (got {convs_per_stage})")
    _at_most("vgg", "convs_per_stage", convs_per_stage, MAX_MLP_DEPTH)
    blocks, c = [], in_shape[0]
    for stage in range(3):
        ch = width * 2**stage
        for _ in range(convs_per_stage - 1):
            norm = _batch_norm(ch, running_stats) if batch_norm else None
            blocks.append(Block(nn.Conv2d(c, ch, 3, 1, 1), make_activation(activation), norm))
            c = ch
        pool = nn.Sequential(_batch_norm(ch, running_stats), nn.MaxPool2d(2)) if batch_norm else nn.MaxPool2d(2)
        blocks.append(Block(nn.Conv2d(c, ch, 3, 1, 1), make_activation(activation), pool))
        c = ch
    blocks, head_blocks = _dense_tail(blocks, in_shape, [], out_shape, activation, heads)
    return Network(blocks, head_blocks, family="vgg", in_shape=in_shape, out_shape=out_shape)


# -- SimpleVGG (Ernoult et al. 2022) ----------------------------------------------------------------
SIMPLE_VGG_CHANNELS = (128, 128, 256, 256, 512)


def simple_vgg(in_shape, out_shape, heads=None, activation: str = "elu", width_multiplier: float = 1.0) -> Network:
    """SimpleVGG of Ernoult et al. 2022 ("Towards scaling difference target propagation by learning
    backprop targets", ICML; the network of their CIFAR-10 and ImageNet 32x32 results): five blocks
    of a 3x3 convolution (stride 1, padding 1, bias), the activation (ELU in the paper) and 2x2 max
    pooling (stride 2), with 128, 128, 256, 256, 512 channels, then the flatten and one Linear layer
    to the classes. `width_multiplier` scales every channel count (rounded, at least 1). A block
    pools only while its map is at least 2x2: on 32x32 inputs all five do, as in the paper; on
    28x28 the last map is 1x1 before the fifth pool, which is left out."""
    if len(in_shape) != 3:
        raise UserError(f"simple_vgg needs image inputs (C, H, W), got shape {tuple(in_shape)}")
    if activation == "elu":
        act = nn.ELU
    else:
        make_activation(activation)  # an unknown name: one line naming the choices
        act = lambda: make_activation(activation)  # noqa: E731
    blocks, c, side = [], in_shape[0], min(in_shape[1], in_shape[2])
    for channels in SIMPLE_VGG_CHANNELS:
        ch = scaled(channels, width_multiplier)
        pool = nn.MaxPool2d(2, 2) if side >= 2 else None
        blocks.append(Block(nn.Conv2d(c, ch, 3, 1, 1), act(), pool))
        c, side = ch, side // 2 if side >= 2 else side
    blocks, head_blocks = _dense_tail(blocks, in_shape, [], out_shape, activation, heads)
    return Network(blocks, head_blocks, family="simple_vgg", in_shape=in_shape, out_shape=out_shape)
