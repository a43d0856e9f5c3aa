"""``segnet_vgg16``: SegNet (Badrinarayanan et al.) with a VGG-16-BN encoder, 2D.

Encoder: VGG-16-BN (13 conv-BN-ReLU, 5 max pools that keep their argmax indices). Decoder:
the mirror image, block by block from the deepest: ``max_unpool2d`` with that block's
encoder indices (each value goes back exactly where its maximum was, zeros elsewhere),
then as many 3x3 convs as the encoder block had (3, 3, 3, 2, 2: 13 in all), conv-BN-ReLU
keeping the width except the block's last, which maps to the next block's width; the very
last conv maps to the class count (no norm, no ReLU: the logits). Inputs must be
multiples of 32. Option: ``base_features`` (64). ``model.encoder`` is the VGG
(torchvision names).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from autoliver.nets.estimate import Shape, Tally
from autoliver.nets.layers import ConvBNReLU, FixedNet, register_family, relu_init
from autoliver.nets.registry import NetSpec
from autoliver.nets.vgg import VGG16BN, vgg16_widths


def segnet_decoder_layout(base: int, n_classes: int) -> list[list[tuple[int, int]]]:
    """Per decoder block (deepest first), the (cin, cout) of its convs."""
    widths = vgg16_widths(base)
    layout = []
    for b in range(len(widths) - 1, -1, -1):
        w, n = widths[b][-1], len(widths[b])
        out = widths[b - 1][-1] if b > 0 else n_classes
        layout.append([(w, w)] * (n - 1) + [(w, out)])
    return layout


class UnpoolBlock(nn.Module):
    def __init__(self, convs: list[tuple[int, int]], last: bool) -> None:
        super().__init__()
        self.unpool = nn.MaxUnpool2d(2, 2)
        n = len(convs)
        self.convs = nn.Sequential(*[
            ConvBNReLU(2, cin, cout, bias=True, norm=not (last and i == n - 1), act=not (last and i == n - 1))
            for i, (cin, cout) in enumerate(convs)
        ])

    def forward(self, x: torch.Tensor, indices: torch.Tensor, size: torch.Size) -> torch.Tensor:
        return self.convs(self.unpool(x, indices, output_size=size[2:]))


@register_family("segnet_vgg16")
class SegNetVGG16(FixedNet):
    defaults = {"base_features": 64}

    def __init__(self, spec: NetSpec) -> None:
        super().__init__(spec)
        self.encoder = VGG16BN(spec.in_channels, self.opts["base_features"])
        layout = segnet_decoder_layout(self.opts["base_features"], spec.n_classes)
        self.decoder = nn.ModuleList([UnpoolBlock(convs, last=i == len(layout) - 1) for i, convs in enumerate(layout)])
        self.apply(relu_init)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        f = self.encoder(x)
        y = f.bottom
        for block, indices, size in zip(self.decoder, f.indices[::-1], f.sizes[::-1]):
            y = block(y, indices, size)
        return y

    @classmethod
    def divisor_of(cls, opts: dict[str, Any]) -> tuple[int, ...]:
        return (32, 32)

    @classmethod
    def tally(cls, t: Tally, spec: NetSpec, opts: dict[str, Any], shape: Shape) -> None:
        skips, shape = VGG16BN.tally(t, shape, spec.in_channels, opts["base_features"])
        layout = segnet_decoder_layout(opts["base_features"], spec.n_classes)
        for i, (convs, skip) in enumerate(zip(layout, skips[::-1])):
            shape = t.resize(convs[0][0], skip)  # the unpooled map
            for j, (cin, cout) in enumerate(convs):
                final = i == len(layout) - 1 and j == len(convs) - 1
                if final:
                    t.conv(shape, cin, cout, 3, bias=True, saved=False)
                else:
                    shape = ConvBNReLU.tally(t, shape, cin, cout, bias=True)
