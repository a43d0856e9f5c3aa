"""``resunet2d``: residual 2D U-Net with pre-activation blocks (after Zhang et al. 2018,
"Road extraction by deep residual U-Net").

* pre-activation residual block: BN-ReLU-3x3 conv (stride) -> BN-ReLU-3x3 conv, plus the
  identity, or a 1x1 conv (stride) + BN projection where the width or stride changes; the
  network's first block starts with the conv (its input is the image, not a block output);
* encoder: level 0 one block ``in_channels -> base_features``, level i (1..depth) one
  block with stride 2 doubling the width (the last is the bridge);
* decoder, per level from the bridge up: nearest-neighbour 2x upsampling, concatenation with
  the encoder block's output, one block (stride 1) to that level's width; a 1x1 conv head.

Inputs must be multiples of ``2**depth``. Options: ``base_features`` (64), ``depth`` (3:
64-128-256 and a 512 bridge, as in the paper).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from autoliver.nets.estimate import Shape, Tally
from autoliver.nets.layers import FixedNet, batch_norm, positive_int, register_family, relu_init
from autoliver.nets.registry import NetSpec


class PreActBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int = 1, first: bool = False) -> None:
        super().__init__()
        self.pre = nn.Identity() if first else nn.Sequential(batch_norm(2, cin), nn.ReLU(inplace=True))
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.mid = nn.Sequential(batch_norm(2, cout), nn.ReLU(inplace=True))
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        if cin != cout or stride != 1:
            self.shortcut: nn.Module = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), batch_norm(2, cout))
        else:
            self.shortcut = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv2(self.mid(self.conv1(self.pre(x)))) + self.shortcut(x)

    @staticmethod
    def tally(t: Tally, shape: Shape, cin: int, cout: int, stride: int = 1, first: bool = False) -> Shape:
        if not first:
            t.norm(shape, cin)
        out = t.norm(t.conv(shape, cin, cout, 3, stride), cout)
        t.conv(out, cout, cout, 3, saved=False)  # only feeds the sum
        if cin != cout or stride != 1:
            t.norm(t.conv(shape, cin, cout, 1, stride, padding=0), cout, saved=False)
        return t.tensor(cout, out)  # the sum


@register_family("resunet2d")
class ResUNet2d(FixedNet):
    defaults = {"base_features": 64, "depth": 3}

    @classmethod
    def check_options(cls, opts: dict[str, Any]) -> dict[str, Any]:
        opts = super().check_options(opts)
        positive_int(cls.name, "depth", opts["depth"])
        return opts

    @staticmethod
    def widths(opts: dict[str, Any]) -> list[int]:
        return [opts["base_features"] * 2**i for i in range(opts["depth"] + 1)]

    def __init__(self, spec: NetSpec) -> None:
        super().__init__(spec)
        f = self.widths(self.opts)
        self.encoder = nn.ModuleList(
            [PreActBlock(spec.in_channels, f[0], first=True)] + [PreActBlock(f[i - 1], f[i], 2) for i in range(1, len(f))]
        )
        self.decoder = nn.ModuleList([PreActBlock(f[i + 1] + f[i], f[i]) for i in range(len(f) - 2, -1, -1)])
        self.head = nn.Conv2d(f[0], spec.n_classes, 1)
        self.apply(relu_init)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        skips = []
        for block in self.encoder:
            x = block(x)
            skips.append(x)
        x = skips.pop()
        for block in self.decoder:
            x = block(torch.cat((F.interpolate(x, scale_factor=2.0, mode="nearest"), skips.pop()), dim=1))
        return self.head(x)

    @classmethod
    def divisor_of(cls, opts: dict[str, Any]) -> tuple[int, ...]:
        return (2 ** opts["depth"],) * 2

    @classmethod
    def tally(cls, t: Tally, spec: NetSpec, opts: dict[str, Any], shape: Shape) -> None:
        f = cls.widths(opts)
        shapes = []
        for i in range(len(f)):
            shape = PreActBlock.tally(t, shape, spec.in_channels if i == 0 else f[i - 1], f[i], 1 if i == 0 else 2, first=i == 0)
            shapes.append(shape)
        for i in range(len(f) - 2, -1, -1):
            shape = t.resize(f[i + 1] + f[i], shapes[i])  # the concatenation
            shape = PreActBlock.tally(t, shape, f[i + 1] + f[i], f[i])
        t.conv(shape, f[0], spec.n_classes, 1, bias=True, saved=False)
