"""The plain U-Net (nnU-Net's PlainConvUNet), 2D or 3D by the conv op.

Encoder stage ``s``: two conv blocks with ``kernel_sizes[s]``, the first with ``strides[s]``
(a strided conv does the downsampling; stage 0 has stride 1). Decoder: see
``blocks.UNetDecoder`` (transposed conv, skip concatenation, two conv blocks, a 1x1 head per
level). ``planning.memory.parameter_count`` models exactly this network.
"""

from __future__ import annotations

import torch
from torch import nn

from autoliver.nets.blocks import UNetDecoder, check_input, init_weights, stacked_convs
from autoliver.nets.registry import NetSpec, register_network

CONVS_PER_STAGE = 2


@register_network("unet")
class UNet(nn.Module):
    """forward(x: (B, C, *spatial)) -> list of logits, full resolution first (one per decoder
    level) when ``self.deep_supervision`` is True, else one (B, n_classes, *spatial) tensor."""

    def __init__(self, spec: NetSpec) -> None:
        super().__init__()
        self.spec = spec
        self.deep_supervision = spec.deep_supervision
        self.encoder = nn.ModuleList()
        prev = spec.in_channels
        for f, k, s in zip(spec.features_per_stage, spec.kernel_sizes, spec.strides):
            self.encoder.append(stacked_convs(spec.dims, prev, f, k, s, CONVS_PER_STAGE))
            prev = f
        self.decoder = UNetDecoder(spec.dims, spec.features_per_stage, spec.kernel_sizes, spec.strides, spec.n_classes, CONVS_PER_STAGE)
        self.apply(init_weights)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor] | torch.Tensor:
        check_input(x, self.spec.dims, self.spec.in_channels, self.spec.divisor)
        skips = []
        for stage in self.encoder:
            x = stage(x)
            skips.append(x)
        return self.decoder(skips, self.deep_supervision)
