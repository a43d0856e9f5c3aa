"""ResNet with bottleneck blocks (ResNet-50: 3-4-6-3, ResNet-101: 3-4-23-3), as an encoder.

Module names follow torchvision's ``resnet50`` / ``resnet101`` (``conv1``, ``bn1``,
``layer1`` .. ``layer4``; blocks with ``conv1``/``bn1``/``conv2``/``bn2``/``conv3``/``bn3``
and ``downsample.0``/``.1``), without the ``fc`` classifier, so torchvision weight files
load by name (``weights.load_encoder_weights``). The stride sits on the 3x3 conv (v1.5).

* stem: 7x7 conv, stride 2, ``in_channels -> base`` (any number of input channels), BN,
  ReLU, 3x3 max pool stride 2;
* ``layer{i}``: ``blocks[i]`` bottlenecks of width ``base * 2**i`` (output 4x that); the
  first block of layers 2-4 has stride 2; ``dilate_last`` gives layer 4 stride 1 and
  dilation 2 instead (output stride 16, DeepLab), its first block keeping dilation 1 as in
  torchvision;
* ``forward`` returns the feature maps at strides 2 (stem, before the pool), 4, 8, 16 and
  32 (16 with ``dilate_last``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from autoliver.nets.estimate import Shape, Tally

EXPANSION = 4
RESNET50 = (3, 4, 6, 3)
RESNET101 = (3, 4, 23, 3)


@dataclass(frozen=True)
class BlockLayout:
    inplanes: int
    planes: int
    stride: int
    dilation: int
    downsample: bool


def resnet_layout(blocks: Sequence[int], base: int = 64, dilate_last: bool = False) -> list[list[BlockLayout]]:
    """Per layer, its bottlenecks (torchvision's ``_make_layer`` rules)."""
    inplanes, dilation, layout = base, 1, []
    for i, n in enumerate(blocks):
        planes, stride, previous = base * 2**i, 1 if i == 0 else 2, dilation
        if dilate_last and i == len(blocks) - 1:
            dilation, stride = dilation * stride, 1
        down = stride != 1 or inplanes != planes * EXPANSION
        layer = [BlockLayout(inplanes, planes, stride, previous, down)]
        layer += [BlockLayout(planes * EXPANSION, planes, 1, dilation, False) for _ in range(n - 1)]
        layout.append(layer)
        inplanes = planes * EXPANSION
    return layout


def resnet_channels(blocks: Sequence[int], base: int = 64) -> tuple[int, ...]:
    """Channels of ``ResNet.forward``'s maps: the stem, then each layer's output."""
    return (base, *(base * 2**i * EXPANSION for i in range(len(blocks))))


class Bottleneck(nn.Module):
    """1x1 -> 3x3 (stride, dilation) -> 1x1 (4x wider), BN after each, ReLU; plus the
    identity or a 1x1 strided projection with BN; ReLU after the sum."""

    def __init__(self, b: BlockLayout) -> None:
        super().__init__()
        width, out = b.planes, b.planes * EXPANSION
        self.conv1 = nn.Conv2d(b.inplanes, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, b.stride, padding=b.dilation, dilation=b.dilation, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, out, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = nn.Sequential(nn.Conv2d(b.inplanes, out, 1, b.stride, bias=False), nn.BatchNorm2d(out)) if b.downsample else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        out += identity
        return self.relu(out)

    @staticmethod
    def tally(t: Tally, shape: Shape, b: BlockLayout) -> Shape:
        width, out = b.planes, b.planes * EXPANSION
        if b.downsample:
            t.norm(t.conv(shape, b.inplanes, out, 1, b.stride, padding=0), out, saved=False)  # only feeds the sum
        s = t.norm(t.conv(shape, b.inplanes, width, 1, padding=0), width)
        s = t.norm(t.conv(s, width, width, 3, b.stride, dilation=b.dilation), width)
        return t.norm(t.conv(s, width, out, 1, padding=0), out)  # the sum is in place


class ResNet(nn.Module):
    """Bottleneck ResNet encoder; ``channels`` are those of ``forward``'s five maps."""

    def __init__(self, blocks: Sequence[int], in_channels: int = 3, base: int = 64, dilate_last: bool = False) -> None:
        super().__init__()
        layout = resnet_layout(blocks, base, dilate_last)
        self.conv1 = nn.Conv2d(in_channels, base, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(base)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        for i, layer in enumerate(layout):
            setattr(self, f"layer{i + 1}", nn.Sequential(*[Bottleneck(b) for b in layer]))
        self.n_layers = len(layout)
        self.channels = resnet_channels(blocks, base)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        x = self.relu(self.bn1(self.conv1(x)))
        feats = [x]
        x = self.maxpool(x)
        for i in range(self.n_layers):
            x = getattr(self, f"layer{i + 1}")(x)
            feats.append(x)
        return feats

    @staticmethod
    def tally(t: Tally, shape: Shape, blocks: Sequence[int], in_channels: int, base: int, dilate_last: bool = False) -> list[Shape]:
        """Shapes of ``forward``'s five maps."""
        s = t.norm(t.conv(shape, in_channels, base, 7, 2, padding=3), base)
        shapes = [s]
        s = t.pool(s, base, 3, 2, 1, indices=True)
        for layer in resnet_layout(blocks, base, dilate_last):
            for b in layer:
                s = Bottleneck.tally(t, s, b)
            shapes.append(s)
        return shapes
