"""``fcn_r50``: FCN-8s-style segmentation head on a ResNet-50 encoder, 2D.

A 1x1 score conv (to the class count) on each of the last three ResNet stages (strides 8,
16, 32); the stride-32 scores are upsampled (bilinear) to stride 16 and added to that
stage's scores, the sum upsampled to stride 8 and added to those, and the result upsampled
8x to the input size. Inputs must be multiples of 32. Option: ``base_features`` (ResNet
stem width, 64). ``model.encoder`` is the ResNet (torchvision names).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from autoliver.nets.estimate import Shape, Tally
from autoliver.nets.layers import FixedNet, register_family, relu_init
from autoliver.nets.registry import NetSpec
from autoliver.nets.resnet import RESNET50, ResNet, resnet_channels


def _up(x: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return F.interpolate(x, size=like.shape[2:], mode="bilinear", align_corners=False)


@register_family("fcn_r50")
class FCNResNet50(FixedNet):
    defaults = {"base_features": 64}

    def __init__(self, spec: NetSpec) -> None:
        super().__init__(spec)
        self.encoder = ResNet(RESNET50, spec.in_channels, self.opts["base_features"])
        c = self.encoder.channels
        self.score8, self.score16, self.score32 = (nn.Conv2d(c[i], spec.n_classes, 1) for i in (2, 3, 4))
        self.apply(relu_init)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        f = self.encoder(x)
        s = _up(self.score32(f[4]), f[3]) + self.score16(f[3])
        s = _up(s, f[2]) + self.score8(f[2])
        return _up(s, x)

    @classmethod
    def divisor_of(cls, opts: dict[str, Any]) -> tuple[int, ...]:
        return (32, 32)

    @classmethod
    def tally(cls, t: Tally, spec: NetSpec, opts: dict[str, Any], shape: Shape) -> None:
        shapes = ResNet.tally(t, shape, RESNET50, spec.in_channels, opts["base_features"])
        c = resnet_channels(RESNET50, opts["base_features"])
        for i in (2, 3, 4):  # score maps and their sums: nothing the backward pass keeps
            t.conv(shapes[i], c[i], spec.n_classes, 1, bias=True, saved=False)
