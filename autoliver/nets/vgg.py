"""VGG-16 with batch norm (configuration D: 13 3x3 convs, 5 max pools), as an encoder.

``features`` is laid out exactly like torchvision's ``vgg16_bn().features`` (conv with
bias, BN, ReLU per conv; a 2x2 max pool closing each of the 5 blocks), so torchvision
weight files load by name; the pools return their indices (SegNet unpools with them).
Widths 64-128-256-512-512 at ``base = 64``, scaled proportionally otherwise.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from autoliver.nets.estimate import Shape, Tally
from autoliver.nets.layers import scaled

VGG16_BLOCKS = ((64, 64), (128, 128), (256, 256, 256), (512, 512, 512), (512, 512, 512))


def vgg16_widths(base: int = 64) -> tuple[tuple[int, ...], ...]:
    """Per block, the output width of each conv."""
    return tuple(tuple(scaled(w, base, 64) for w in block) for block in VGG16_BLOCKS)


@dataclass
class VGGFeatures:
    """Encoder outputs: per block, the map before its pool (strides 1, 2, 4, 8, 16), the
    pool's indices and input size, and the last pool's output (stride 32)."""

    skips: list[torch.Tensor]
    indices: list[torch.Tensor]
    sizes: list[torch.Size]
    bottom: torch.Tensor


class VGG16BN(nn.Module):
    def __init__(self, in_channels: int = 3, base: int = 64) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        cin = in_channels
        for block in vgg16_widths(base):
            for w in block:
                layers += [nn.Conv2d(cin, w, 3, padding=1), nn.BatchNorm2d(w), nn.ReLU(inplace=True)]
                cin = w
            layers.append(nn.MaxPool2d(2, 2, return_indices=True))
        self.features = nn.Sequential(*layers)
        self.channels = tuple(block[-1] for block in vgg16_widths(base))

    def forward(self, x: torch.Tensor) -> VGGFeatures:
        skips, indices, sizes = [], [], []
        for layer in self.features:
            if isinstance(layer, nn.MaxPool2d):
                skips.append(x)
                sizes.append(x.shape)
                x, idx = layer(x)
                indices.append(idx)
            else:
                x = layer(x)
        return VGGFeatures(skips, indices, sizes, x)

    @staticmethod
    def tally(t: Tally, shape: Shape, in_channels: int, base: int) -> tuple[list[Shape], Shape]:
        """Shapes of the skips and of the bottom map."""
        cin, skips = in_channels, []
        for block in vgg16_widths(base):
            for w in block:
                shape = t.norm(t.conv(shape, cin, w, 3, bias=True), w)
                cin = w
            skips.append(shape)
            shape = t.pool(shape, cin, 2, indices=True)
        return skips, shape
