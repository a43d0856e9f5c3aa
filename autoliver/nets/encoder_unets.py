"""U-Nets on classification backbones: ``resnet50_unet`` (ResNet-50 encoder) and
``vgg16_unet`` (VGG-16-BN encoder), 2D.

Decoder (``SkipDecoder``, shared): five blocks, each nearest-neighbour 2x upsampling,
concatenation of the encoder map at that stride (when there is one), two 3x3 conv-BN-ReLU;
widths 256-128-64-32-16 at ``base_features = 64`` (scaled with it, or set by
``decoder_features``); a 1x1 conv head. The encoders pool five times: inputs must be
multiples of 32.

* ``resnet50_unet`` skips: the stem (stride 2) and layers 1-3 (strides 4, 8, 16); the
  decoder starts from layer 4 (stride 32); the last block (stride 1) has no skip.
* ``vgg16_unet`` skips: each VGG block's output before its pool (strides 1-16); the decoder
  starts from the fifth pool's output (stride 32).

Options: ``base_features`` (encoder stem width, 64), ``decoder_features`` (5 widths, or
None for the scaled default). ``model.encoder`` is the backbone (torchvision names).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from autoliver.nets.estimate import Shape, Tally
from autoliver.nets.layers import ConvBNReLU, FixedNet, positive_ints, register_family, relu_init, scaled
from autoliver.nets.registry import NetSpec
from autoliver.nets.resnet import RESNET50, ResNet, resnet_channels
from autoliver.nets.vgg import VGG16BN, vgg16_widths

DECODER_WIDTHS = (256, 128, 64, 32, 16)


class SkipDecoder(nn.Module):
    """Upsample-concat-two-convs blocks from the bottom map up, then a 1x1 head.
    ``skip_channels``: deepest first, 0 where a block has no skip."""

    def __init__(self, bottom: int, skip_channels: Sequence[int], widths: Sequence[int], n_classes: int) -> None:
        super().__init__()
        self.blocks = nn.ModuleList()
        cin = bottom
        for skip, w in zip(skip_channels, widths):
            self.blocks.append(nn.Sequential(ConvBNReLU(2, cin + skip, w), ConvBNReLU(2, w, w)))
            cin = w
        self.head = nn.Conv2d(cin, n_classes, 1)

    def forward(self, x: torch.Tensor, skips: Sequence[torch.Tensor | None]) -> torch.Tensor:
        for block, skip in zip(self.blocks, skips):
            if skip is None:
                x = F.interpolate(x, scale_factor=2.0, mode="nearest")
            else:
                x = torch.cat((F.interpolate(x, size=skip.shape[2:], mode="nearest"), skip), dim=1)
            x = block(x)
        return self.head(x)

    @staticmethod
    def tally(t: Tally, shape: Shape, bottom: int, skip_channels: Sequence[int], widths: Sequence[int], n_classes: int) -> Shape:
        cin = bottom
        for skip, w in zip(skip_channels, widths):
            shape = t.resize(cin + skip, tuple(2 * n for n in shape))  # the concatenation
            shape = ConvBNReLU.tally(t, shape, cin + skip, w)
            shape = ConvBNReLU.tally(t, shape, w, w)
            cin = w
        return t.conv(shape, cin, n_classes, 1, bias=True)


class _BackboneUNet(FixedNet):
    defaults = {"base_features": 64, "decoder_features": None}

    @classmethod
    def check_options(cls, opts: dict[str, Any]) -> dict[str, Any]:
        opts = super().check_options(opts)
        if opts["decoder_features"] is None:
            opts["decoder_features"] = tuple(scaled(w, opts["base_features"], 64) for w in DECODER_WIDTHS)
        opts["decoder_features"] = positive_ints(cls.name, "decoder_features", opts["decoder_features"], len(DECODER_WIDTHS))
        return opts

    @classmethod
    def divisor_of(cls, opts: dict[str, Any]) -> tuple[int, ...]:
        return (32, 32)


@register_family("resnet50_unet")
class ResNet50UNet(_BackboneUNet):
    def __init__(self, spec: NetSpec) -> None:
        super().__init__(spec)
        self.encoder = ResNet(RESNET50, spec.in_channels, self.opts["base_features"])
        c = self.encoder.channels
        self.decoder = SkipDecoder(c[4], (c[3], c[2], c[1], c[0], 0), self.opts["decoder_features"], spec.n_classes)
        self.apply(relu_init)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        f = self.encoder(x)
        return self.decoder(f[4], (f[3], f[2], f[1], f[0], None))

    @classmethod
    def tally(cls, t: Tally, spec: NetSpec, opts: dict[str, Any], shape: Shape) -> None:
        base = opts["base_features"]
        shapes = ResNet.tally(t, shape, RESNET50, spec.in_channels, base)
        c = resnet_channels(RESNET50, base)
        SkipDecoder.tally(t, shapes[4], c[4], (c[3], c[2], c[1], c[0], 0), opts["decoder_features"], spec.n_classes)


@register_family("vgg16_unet")
class VGG16UNet(_BackboneUNet):
    def __init__(self, spec: NetSpec) -> None:
        super().__init__(spec)
        self.encoder = VGG16BN(spec.in_channels, self.opts["base_features"])
        c = self.encoder.channels
        self.decoder = SkipDecoder(c[4], c[::-1], self.opts["decoder_features"], spec.n_classes)
        self.apply(relu_init)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        f = self.encoder(x)
        return self.decoder(f.bottom, f.skips[::-1])

    @classmethod
    def tally(cls, t: Tally, spec: NetSpec, opts: dict[str, Any], shape: Shape) -> None:
        skips, bottom = VGG16BN.tally(t, shape, spec.in_channels, opts["base_features"])
        c = tuple(block[-1] for block in vgg16_widths(opts["base_features"]))
        SkipDecoder.tally(t, bottom, c[4], c[::-1], opts["decoder_features"], spec.n_classes)
