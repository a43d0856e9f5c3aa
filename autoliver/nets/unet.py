"""The plain U-Net (nnU-Net's PlainConvUNet), 2D or 3D by the conv op.

Encoder stage ``s``: two conv blocks with ``kernel_sizes[s]``, the first with ``strides[s]``
(a strided conv does the downsampling; stage 0 has stride 1). Decoder: see
``blocks.UNetDecoder`` (transposed conv, skip concatenation, two conv blocks, a 1x1 head per
level). ``planning.memory.parameter_count`` models exactly this network, and
``planning.memory.activation_elements`` its activations: the registered estimate uses them.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from autoliver.nets.blocks import UNetDecoder, check_input, init_weights, stacked_convs
from autoliver.nets.estimate import BYTES_FLOAT
from autoliver.nets.registry import NetEstimate, NetSpec, register_network
from planning.memory import activation_elements, parameter_count
from planning.topology import Topology

CONVS_PER_STAGE = 2


def estimate_unet(spec: NetSpec, patch_size: Sequence[int]) -> NetEstimate:
    """The planner's memory model (``planning.memory``) of this network, fp32 activations."""
    t = Topology(tuple(int(p) for p in patch_size), spec.strides, spec.kernel_sizes, spec.features_per_stage)
    return NetEstimate(parameter_count(t, spec.in_channels, spec.n_classes), BYTES_FLOAT * activation_elements(t, spec.in_channels, spec.n_classes))


@register_network("unet", estimate=estimate_unet)
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
