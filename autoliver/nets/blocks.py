"""Building blocks shared by the U-Net families: conv blocks, the U-Net decoder, weight init.

Every op is chosen by the spatial dimensionality (2 or 3), so one class serves 2D and 3D
networks. Conventions follow nnU-Net's plain conv U-Net: a conv block is conv (with bias) ->
instance norm (affine, eps 1e-5) -> leaky ReLU (slope 0.01, in place); padding is
``kernel // 2`` per axis, so a stride-1 conv keeps the feature-map size.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

NORM_EPS = 1e-5
LEAKY_SLOPE = 1e-2

_CONV = {2: nn.Conv2d, 3: nn.Conv3d}
_TRANSPOSED = {2: nn.ConvTranspose2d, 3: nn.ConvTranspose3d}
_NORM = {2: nn.InstanceNorm2d, 3: nn.InstanceNorm3d}


def conv_op(dims: int) -> type[nn.Module]:
    """``nn.Conv2d`` or ``nn.Conv3d``."""
    if dims not in _CONV:
        raise ValueError(f"dims must be 2 or 3, got {dims!r}")
    return _CONV[dims]


def transposed_conv_op(dims: int) -> type[nn.Module]:
    if dims not in _TRANSPOSED:
        raise ValueError(f"dims must be 2 or 3, got {dims!r}")
    return _TRANSPOSED[dims]


def norm_op(dims: int) -> type[nn.Module]:
    if dims not in _NORM:
        raise ValueError(f"dims must be 2 or 3, got {dims!r}")
    return _NORM[dims]


class ConvNormAct(nn.Module):
    """conv -> instance norm (affine) -> leaky ReLU; ``act=False`` leaves the activation out
    (the last conv of a residual block, activated after the addition)."""

    def __init__(self, dims: int, cin: int, cout: int, kernel: Sequence[int], stride: Sequence[int], act: bool = True) -> None:
        super().__init__()
        self.conv = conv_op(dims)(cin, cout, tuple(kernel), tuple(stride), padding=tuple(k // 2 for k in kernel), bias=True)
        self.norm = norm_op(dims)(cout, eps=NORM_EPS, affine=True)
        self.act = nn.LeakyReLU(LEAKY_SLOPE, inplace=True) if act else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.norm(self.conv(x)))


def stacked_convs(dims: int, cin: int, cout: int, kernel: Sequence[int], stride: Sequence[int], n: int) -> nn.Sequential:
    """``n`` conv blocks; the first has ``stride`` and maps ``cin`` to ``cout`` channels."""
    ones = (1,) * dims
    return nn.Sequential(*[ConvNormAct(dims, cin if i == 0 else cout, cout, kernel, stride if i == 0 else ones) for i in range(n)])


class UNetDecoder(nn.Module):
    """Transposed-conv upsampling, skip concatenation, conv blocks and a 1x1 head per level.

    Levels are built bottom-up: level ``j`` upsamples from encoder stage ``s + 1`` to stage
    ``s = n_stages - 2 - j`` with kernel = stride = ``strides[s + 1]``, concatenates the
    stage-``s`` skip (``2 F_s`` channels) and runs ``convs_per_stage`` conv blocks with
    ``kernel_sizes[s]``. The heads exist at every level whether deep supervision is used or
    not, so weights load either way.
    """

    def __init__(
        self,
        dims: int,
        features_per_stage: Sequence[int],
        kernel_sizes: Sequence[Sequence[int]],
        strides: Sequence[Sequence[int]],
        n_classes: int,
        convs_per_stage: int = 2,
    ) -> None:
        super().__init__()
        f = list(features_per_stage)
        n = len(f)
        conv, tconv = conv_op(dims), transposed_conv_op(dims)
        self.upsample = nn.ModuleList()
        self.stages = nn.ModuleList()
        self.heads = nn.ModuleList()
        for s in range(n - 2, -1, -1):
            st = tuple(strides[s + 1])
            self.upsample.append(tconv(f[s + 1], f[s], st, st, bias=True))
            self.stages.append(stacked_convs(dims, 2 * f[s], f[s], kernel_sizes[s], (1,) * dims, convs_per_stage))
            self.heads.append(conv(f[s], n_classes, 1, 1, 0, bias=True))

    def forward(self, skips: list[torch.Tensor], deep_supervision: bool) -> list[torch.Tensor] | torch.Tensor:
        x = skips[-1]
        outputs = []
        last = len(self.stages) - 1
        for j, (up, stage, head) in enumerate(zip(self.upsample, self.stages, self.heads)):
            x = stage(torch.cat((up(x), skips[-(j + 2)]), dim=1))
            if deep_supervision:
                outputs.append(head(x))
            elif j == last:
                return head(x)
        return outputs[::-1]  # full resolution first


def init_weights(module: nn.Module, neg_slope: float = LEAKY_SLOPE) -> None:
    """He (kaiming normal, ``a = neg_slope``) for conv and transposed-conv weights, zero
    biases; norm layers keep torch's defaults (scale 1, shift 0). Use with ``Module.apply``."""
    if isinstance(module, (nn.Conv2d, nn.Conv3d, nn.ConvTranspose2d, nn.ConvTranspose3d)):
        nn.init.kaiming_normal_(module.weight, a=neg_slope)
        if module.bias is not None:
            nn.init.zeros_(module.bias)


def check_input(x: torch.Tensor, dims: int, in_channels: int, divisor: Sequence[int]) -> None:
    """ValueError unless ``x`` is (B, in_channels, *spatial) with every spatial size a
    multiple of the network's total stride along that axis."""
    if x.dim() != dims + 2 or x.shape[1] != in_channels:
        raise ValueError(f"expected input (B, {in_channels}, {dims} spatial axes), got shape {tuple(x.shape)}")
    spatial = tuple(x.shape[2:])
    if any(s % d for s, d in zip(spatial, divisor)):
        raise ValueError(f"input spatial size {spatial} must be a multiple of the total stride {tuple(divisor)} per axis; pad or change the patch size")
