"""``dualpath3d``: dual-path multi-scale 3D CNN (after Kamnitsas et al. 2017, DeepMedic).

* normal path: eight 3x3x3 conv-BN-ReLU on the input patch (widths 30-30-40-40-40-40-50-50);
* context path: the same eight layers (own weights) on the input average-pooled by
  ``pool_factor`` (3 per axis) for a wider field of view; the input is first padded
  (replicate) to a multiple of the factor, and the path's output is upsampled
  (trilinear) by the same factor and cropped, so each coarse voxel lines up with the
  ``factor**3`` fine voxels it summarises;
* both paths concatenated, 1x1x1 conv-BN-ReLU "fully connected" layers (150, 150), a
  1x1x1 classifier.

Convs use same padding (DeepMedic's are valid), so the output has the input's size (dense
prediction) and any input size works (divisor 1). Options: ``base_features`` (30; the path
widths are 30-30-40-40-40-40-50-50 and the fc widths 150-150 scaled by base/30),
``path_features`` and ``fc_features`` (explicit widths, or None), ``pool_factor`` (int or
3 ints).
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from autoliver.nets.estimate import Shape, Tally
from autoliver.nets.layers import ConvBNReLU, FixedNet, positive_ints, register_family, relu_init, scaled
from autoliver.nets.registry import NetSpec

PATH_WIDTHS = (30, 30, 40, 40, 40, 40, 50, 50)
FC_WIDTHS = (150, 150)


def _path(cin: int, widths: tuple[int, ...]) -> nn.Sequential:
    return nn.Sequential(*[ConvBNReLU(3, cin if i == 0 else widths[i - 1], w) for i, w in enumerate(widths)])


def _path_tally(t: Tally, shape: Shape, cin: int, widths: tuple[int, ...]) -> Shape:
    for w in widths:
        shape = ConvBNReLU.tally(t, shape, cin, w)
        cin = w
    return shape


@register_family("dualpath3d")
class DualPath3d(FixedNet):
    dims = 3
    defaults = {"base_features": 30, "path_features": None, "fc_features": None, "pool_factor": 3}

    @classmethod
    def check_options(cls, opts: dict[str, Any]) -> dict[str, Any]:
        opts = super().check_options(opts)
        base = opts["base_features"]
        opts["path_features"] = positive_ints(cls.name, "path_features", opts["path_features"] or tuple(scaled(w, base, 30) for w in PATH_WIDTHS))
        opts["fc_features"] = positive_ints(cls.name, "fc_features", opts["fc_features"] or tuple(scaled(w, base, 30) for w in FC_WIDTHS))
        factor = opts["pool_factor"]
        opts["pool_factor"] = positive_ints(cls.name, "pool_factor", (factor,) * 3 if isinstance(factor, int) else factor, 3)
        return opts

    def __init__(self, spec: NetSpec) -> None:
        super().__init__(spec)
        widths, fc = self.opts["path_features"], self.opts["fc_features"]
        self.factor = self.opts["pool_factor"]
        self.normal = _path(spec.in_channels, widths)
        self.context = _path(spec.in_channels, widths)
        self.fc = nn.Sequential(*[ConvBNReLU(3, 2 * widths[-1] if i == 0 else fc[i - 1], w, 1) for i, w in enumerate(fc)])
        self.classifier = nn.Conv3d(fc[-1], spec.n_classes, 1)
        self.apply(relu_init)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        size = x.shape[2:]
        pad = [p for n, f in zip(reversed(size), reversed(self.factor)) for p in (0, -n % f)]
        coarse = F.avg_pool3d(F.pad(x, pad, mode="replicate") if any(pad) else x, self.factor)
        context = F.interpolate(self.context(coarse), scale_factor=tuple(float(f) for f in self.factor), mode="trilinear", align_corners=False)
        context = context[(..., *(slice(0, n) for n in size))]
        return self.classifier(self.fc(torch.cat((self.normal(x), context), dim=1)))

    @classmethod
    def divisor_of(cls, opts: dict[str, Any]) -> tuple[int, ...]:
        return (1, 1, 1)

    @classmethod
    def tally(cls, t: Tally, spec: NetSpec, opts: dict[str, Any], shape: Shape) -> None:
        widths, fc, factor = opts["path_features"], opts["fc_features"], opts["pool_factor"]
        _path_tally(t, shape, spec.in_channels, widths)
        coarse = t.tensor(spec.in_channels, tuple(math.ceil(n / f) for n, f in zip(shape, factor)))
        _path_tally(t, coarse, spec.in_channels, widths)
        s = t.resize(2 * widths[-1], shape)  # the concatenation
        cin = 2 * widths[-1]
        for w in fc:
            s = ConvBNReLU.tally(t, s, cin, w, 1)
            cin = w
        t.conv(s, cin, spec.n_classes, 1, bias=True, saved=False)
