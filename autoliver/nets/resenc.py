"""Residual-encoder U-Net (after nnU-Net's ResEncUNet), 2D or 3D by the conv op.

* stem: one conv block ``in_channels -> F_0`` with ``kernel_sizes[0]``, stride 1;
* encoder stage ``s``: ``blocks_per_stage[s]`` residual basic blocks (default 1, 3, 4, 6, 6,
  6, ... like nnU-Net's ResEnc presets); the first block of a stage has the stage's stride;
* basic block: conv block (kernel, stride) -> conv + norm (kernel, stride 1), plus the skip,
  then leaky ReLU. The skip is the identity, or, where the stride or channel count changes,
  a 1x1 strided conv (no bias) + instance norm (the projection);
* the last norm of every residual branch starts at zero (scale and shift), so each block
  starts as its skip (nnU-Net does the same);
* decoder: the plain U-Net decoder (``blocks.UNetDecoder``) with one conv block per level
  (nnU-Net's ResEnc presets), a 1x1 head per level.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from autoliver.nets.blocks import LEAKY_SLOPE, NORM_EPS, ConvNormAct, UNetDecoder, check_input, conv_op, init_weights, norm_op
from autoliver.nets.estimate import Shape, Tally
from autoliver.nets.registry import NetEstimate, NetSpec, register_network

DECODER_CONVS_PER_STAGE = 1
_DEFAULT_BLOCKS = (1, 3, 4, 6)


def default_blocks_per_stage(n_stages: int) -> tuple[int, ...]:
    """1, 3, 4, 6, 6, 6, ... truncated or extended to ``n_stages``."""
    return tuple(_DEFAULT_BLOCKS[s] if s < len(_DEFAULT_BLOCKS) else 6 for s in range(n_stages))


class BasicBlock(nn.Module):
    def __init__(self, dims: int, cin: int, cout: int, kernel: Sequence[int], stride: Sequence[int]) -> None:
        super().__init__()
        ones = (1,) * dims
        self.conv1 = ConvNormAct(dims, cin, cout, kernel, stride)
        self.conv2 = ConvNormAct(dims, cout, cout, kernel, ones, act=False)
        if cin != cout or tuple(stride) != ones:
            self.skip: nn.Module = nn.Sequential(
                conv_op(dims)(cin, cout, 1, tuple(stride), 0, bias=False), norm_op(dims)(cout, eps=NORM_EPS, affine=True)
            )
        else:
            self.skip = nn.Identity()
        self.act = nn.LeakyReLU(LEAKY_SLOPE, inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv2(self.conv1(x))
        out = out + self.skip(x)
        return self.act(out)

    @staticmethod
    def tally(t: Tally, shape: Shape, cin: int, cout: int, kernel: Sequence[int], stride: Sequence[int]) -> Shape:
        out = t.norm(t.conv(shape, cin, cout, kernel, stride, bias=True), cout)
        t.norm(t.conv(out, cout, cout, kernel, 1, bias=True), cout, saved=False)  # norm outputs that only feed the sum
        if cin != cout or any(s != 1 for s in stride):
            t.norm(t.conv(shape, cin, cout, 1, stride, padding=0), cout, saved=False)
        return t.tensor(cout, out)  # the sum, activated in place


def estimate_resenc(spec: NetSpec, patch_size: Sequence[int]) -> NetEstimate:
    """Analytic parameters and activation bytes of ``ResEncUNet`` (see ``estimate.Tally``);
    with deep supervision the loss's tensors at every decoder level are counted."""
    t = Tally(spec.dims)
    f, ks, st = spec.features_per_stage, spec.kernel_sizes, spec.strides
    blocks = spec.blocks_per_stage or default_blocks_per_stage(spec.n_stages)
    shape = t.norm(t.conv(tuple(patch_size), spec.in_channels, f[0], ks[0], 1, bias=True), f[0])
    shapes, prev = [], f[0]
    for s in range(spec.n_stages):
        for b in range(blocks[s]):
            shape = BasicBlock.tally(t, shape, prev if b == 0 else f[s], f[s], ks[s], st[s] if b == 0 else (1,) * spec.dims)
        shapes.append(shape)
        prev = f[s]
    for s in range(spec.n_stages - 2, -1, -1):
        t.transposed_conv(shape, f[s + 1], f[s], st[s + 1], saved=False)
        shape = t.norm(t.conv(t.tensor(2 * f[s], shapes[s]), 2 * f[s], f[s], ks[s], 1, bias=True), f[s])
        t.conv(shape, f[s], spec.n_classes, 1, bias=True, saved=False)
        if spec.deep_supervision and s > 0:
            t.tensor(3 * spec.n_classes, shape)
    return t.result(tuple(patch_size), spec.in_channels, spec.n_classes)


@register_network("resenc", estimate=estimate_resenc)
class ResEncUNet(nn.Module):
    """forward(x: (B, C, *spatial)) -> list of logits, full resolution first, when
    ``self.deep_supervision`` is True, else one (B, n_classes, *spatial) tensor."""

    def __init__(self, spec: NetSpec) -> None:
        super().__init__()
        self.spec = spec
        self.deep_supervision = spec.deep_supervision
        blocks = spec.blocks_per_stage or default_blocks_per_stage(spec.n_stages)
        self.blocks_per_stage = blocks
        dims, f = spec.dims, spec.features_per_stage
        self.stem = ConvNormAct(dims, spec.in_channels, f[0], spec.kernel_sizes[0], (1,) * dims)
        self.encoder = nn.ModuleList()
        prev = f[0]
        for s in range(spec.n_stages):
            stage = [BasicBlock(dims, prev, f[s], spec.kernel_sizes[s], spec.strides[s])]
            stage += [BasicBlock(dims, f[s], f[s], spec.kernel_sizes[s], (1,) * dims) for _ in range(blocks[s] - 1)]
            self.encoder.append(nn.Sequential(*stage))
            prev = f[s]
        self.decoder = UNetDecoder(dims, f, spec.kernel_sizes, spec.strides, spec.n_classes, DECODER_CONVS_PER_STAGE)
        self.apply(init_weights)
        for m in self.modules():
            if isinstance(m, BasicBlock):
                nn.init.zeros_(m.conv2.norm.weight)
                nn.init.zeros_(m.conv2.norm.bias)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor] | torch.Tensor:
        check_input(x, self.spec.dims, self.spec.in_channels, self.spec.divisor)
        x = self.stem(x)
        skips = []
        for stage in self.encoder:
            x = stage(x)
            skips.append(x)
        return self.decoder(skips, self.deep_supervision)
