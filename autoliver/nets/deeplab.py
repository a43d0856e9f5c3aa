"""``deeplabv3plus_r101``: DeepLabv3+ on a ResNet-101 encoder at output stride 16, 2D.

* encoder: ResNet-101 (3-4-23-3 bottlenecks), layer 4 dilated (rate 2) instead of strided;
* ASPP on layer 4: a 1x1 conv, three 3x3 convs at ``aspp_rates`` (6, 12, 18) and image
  pooling (global average, 1x1 conv, broadcast back), each to ``aspp_features`` (256)
  channels; concatenated, projected by a 1x1 conv, dropout ``dropout`` (0.5, as
  torchvision). Branch convs are conv-BN-ReLU, except the image-pooling conv (bias, ReLU, no
  norm: batch norm of a 1x1 map fails for a batch of one);
* decoder: the ASPP output upsampled (bilinear) to layer 1 (stride 4), concatenated with
  layer 1 projected to ``low_level_features`` (48) by a 1x1 conv-BN-ReLU, two 3x3
  conv-BN-ReLU (``aspp_features``), a 1x1 classifier, 4x bilinear upsampling.

Inputs must be multiples of 16. Options: ``base_features`` (ResNet stem width, 64; the
ASPP and low-level widths scale with it unless set). ``model.encoder`` is the ResNet.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from autoliver.nets.estimate import Shape, Tally
from autoliver.nets.layers import ConvBNReLU, FixedNet, positive_int, positive_ints, register_family, relu_init, scaled
from autoliver.nets.registry import NetSpec
from autoliver.nets.resnet import RESNET101, ResNet, resnet_channels


def _resize(x: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    return F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=False)


class ASPP(nn.Module):
    def __init__(self, cin: int, cout: int, rates: Sequence[int], dropout: float) -> None:
        super().__init__()
        self.branches = nn.ModuleList([ConvBNReLU(2, cin, cout, 1)] + [ConvBNReLU(2, cin, cout, 3, dilation=r) for r in rates])
        self.pooling = nn.Sequential(nn.AdaptiveAvgPool2d(1), ConvBNReLU(2, cin, cout, 1, bias=True, norm=False))
        self.project = nn.Sequential(ConvBNReLU(2, cout * (len(rates) + 2), cout, 1), nn.Dropout(dropout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pooled = self.pooling(x).expand(-1, -1, *x.shape[2:])
        return self.project(torch.cat([b(x) for b in self.branches] + [pooled], dim=1))

    @staticmethod
    def tally(t: Tally, shape: Shape, cin: int, cout: int, rates: Sequence[int]) -> Shape:
        ConvBNReLU.tally(t, shape, cin, cout, 1)
        for r in rates:
            ConvBNReLU.tally(t, shape, cin, cout, 3, dilation=r)
        t.conv(t.tensor(cin, (1, 1)), cin, cout, 1, bias=True)  # image pooling
        cat = t.resize(cout * (len(rates) + 2), shape)
        out = ConvBNReLU.tally(t, cat, cout * (len(rates) + 2), cout, 1)
        return t.resize(cout, out)  # the dropout's output


@register_family("deeplabv3plus_r101")
class DeepLabV3PlusResNet101(FixedNet):
    defaults = {"base_features": 64, "aspp_features": None, "low_level_features": None, "aspp_rates": (6, 12, 18), "dropout": 0.5}

    @classmethod
    def check_options(cls, opts: dict[str, Any]) -> dict[str, Any]:
        opts = super().check_options(opts)
        base = opts["base_features"]
        opts["aspp_features"] = positive_int(cls.name, "aspp_features", opts["aspp_features"] or scaled(256, base, 64))
        opts["low_level_features"] = positive_int(cls.name, "low_level_features", opts["low_level_features"] or scaled(48, base, 64))
        opts["aspp_rates"] = positive_ints(cls.name, "aspp_rates", opts["aspp_rates"])
        if not 0.0 <= float(opts["dropout"]) < 1.0:
            raise ValueError(f"network {cls.name!r}: option dropout must be in [0, 1), got {opts['dropout']!r}")
        return opts

    def __init__(self, spec: NetSpec) -> None:
        super().__init__(spec)
        o = self.opts
        self.encoder = ResNet(RESNET101, spec.in_channels, o["base_features"], dilate_last=True)
        c, a, low = self.encoder.channels, o["aspp_features"], o["low_level_features"]
        self.aspp = ASPP(c[4], a, o["aspp_rates"], float(o["dropout"]))
        self.low_level = ConvBNReLU(2, c[1], low, 1)
        self.decoder = nn.Sequential(ConvBNReLU(2, a + low, a), ConvBNReLU(2, a, a))
        self.classifier = nn.Conv2d(a, spec.n_classes, 1)
        self.apply(relu_init)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        f = self.encoder(x)
        low = self.low_level(f[1])
        y = torch.cat((_resize(self.aspp(f[4]), low.shape[2:]), low), dim=1)
        return _resize(self.classifier(self.decoder(y)), x.shape[2:])

    @classmethod
    def divisor_of(cls, opts: dict[str, Any]) -> tuple[int, ...]:
        return (16, 16)

    @classmethod
    def tally(cls, t: Tally, spec: NetSpec, opts: dict[str, Any], shape: Shape) -> None:
        a, low = opts["aspp_features"], opts["low_level_features"]
        shapes = ResNet.tally(t, shape, RESNET101, spec.in_channels, opts["base_features"], dilate_last=True)
        c = resnet_channels(RESNET101, opts["base_features"])
        ASPP.tally(t, shapes[4], c[4], a, opts["aspp_rates"])
        s = ConvBNReLU.tally(t, shapes[1], c[1], low, 1)
        s = t.resize(a + low, s)  # the concatenation
        s = ConvBNReLU.tally(t, ConvBNReLU.tally(t, s, a + low, a), a, a)
        t.conv(s, a, spec.n_classes, 1, bias=True)
