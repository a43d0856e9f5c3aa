"""Shared pieces of the fixed-topology (published) networks: conv-BN-ReLU, family options,
the common base class and the registration decorator.

These networks follow their papers rather than nnU-Net's conventions: batch norm (eps 1e-5,
momentum 0.1) and plain ReLU (in place); He-normal init of every conv
(``blocks.init_weights`` with slope 0, the ReLU gain), zero biases, norms at scale 1 and
shift 0. Their topology is fixed by the paper; ``NetSpec.options`` sets widths and the
other family options, the per-stage topology of the spec is ignored.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from functools import partial
from typing import Any, ClassVar

import torch
from torch import nn

from autoliver.nets.blocks import check_input, conv_op, init_weights
from autoliver.nets.estimate import Shape, Tally
from autoliver.nets.registry import NetEstimate, NetSpec, register_network

logger = logging.getLogger(__name__)

_BN = {2: nn.BatchNorm2d, 3: nn.BatchNorm3d}

relu_init = partial(init_weights, neg_slope=0.0)


def batch_norm(dims: int, channels: int) -> nn.Module:
    return _BN[dims](channels)


def scaled(width: int, base: int, reference: int) -> int:
    """``width`` of the paper's network at base width ``reference``, rescaled to ``base``."""
    return max(1, (width * base) // reference)


class ConvBNReLU(nn.Sequential):
    """conv (padding ``dilation * (k // 2)``) -> batch norm -> ReLU (in place); ``norm=False``
    drops the norm, ``act=False`` the ReLU. Children 0, 1, 2 like torchvision's blocks."""

    def __init__(
        self, dims: int, cin: int, cout: int, kernel: int = 3, stride: int = 1, *,
        dilation: int = 1, bias: bool = False, norm: bool = True, act: bool = True,
    ) -> None:
        layers: list[nn.Module] = [conv_op(dims)(cin, cout, kernel, stride, dilation * (kernel // 2), dilation, bias=bias)]
        if norm:
            layers.append(batch_norm(dims, cout))
        if act:
            layers.append(nn.ReLU(inplace=True))
        super().__init__(*layers)

    @staticmethod
    def tally(
        t: Tally, shape: Shape, cin: int, cout: int, kernel: int = 3, stride: int = 1, *,
        dilation: int = 1, bias: bool = False, norm: bool = True, act: bool = True,
    ) -> Shape:
        shape = t.conv(shape, cin, cout, kernel, stride, dilation=dilation, bias=bias)
        return t.norm(shape, cout) if norm else shape


def family_options(name: str, spec: NetSpec, defaults: Mapping[str, Any]) -> dict[str, Any]:
    """The family's options: ``defaults`` overridden by ``spec.options``; ValueError naming
    the family for an option it does not know (a typo would otherwise be ignored)."""
    unknown = sorted(k for k, _ in spec.options if k not in defaults)
    if unknown:
        raise ValueError(f"network {name!r}: unknown option(s) {', '.join(unknown)}; it takes {', '.join(sorted(defaults))}")
    return {k: spec.option(k, v) for k, v in defaults.items()}


def positive_int(name: str, option: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"network {name!r}: option {option} must be a positive integer, got {value!r}")
    return value


def positive_ints(name: str, option: str, value: Any, n: int | None = None) -> tuple[int, ...]:
    if not isinstance(value, Sequence) or (n is not None and len(value) != n) or not value:
        raise ValueError(f"network {name!r}: option {option} must be a sequence of {n or 'some'} positive integers, got {value!r}")
    return tuple(positive_int(name, option, v) for v in value)


class FixedNet(nn.Module):
    """Base of the fixed-topology families.

    A subclass sets ``dims`` and ``defaults`` (its options and their paper values), builds
    its layers in ``__init__`` after ``super().__init__(spec)`` (``self.opts`` holds the
    options), and implements ``logits(x)``, ``divisor_of(opts)`` and
    ``tally(t, spec, opts, shape)``. ``forward`` checks the input and returns
    ``[logits]`` while ``self.deep_supervision`` is True (one output level, for the
    deep-supervision loss), else the logits tensor.
    """

    name: ClassVar[str] = "?"
    dims: ClassVar[int] = 2
    defaults: ClassVar[dict[str, Any]] = {}

    def __init__(self, spec: NetSpec) -> None:
        super().__init__()
        self.opts = self.options_of(spec)
        self.spec = spec
        self.deep_supervision = spec.deep_supervision
        self.divisor = self.input_divisor(spec)

    @classmethod
    def options_of(cls, spec: NetSpec) -> dict[str, Any]:
        if spec.dims != cls.dims:
            raise ValueError(f"network {cls.name!r} is {cls.dims}-D, the spec is {spec.dims}-D")
        return cls.check_options(family_options(cls.name, spec, cls.defaults))

    @classmethod
    def check_options(cls, opts: dict[str, Any]) -> dict[str, Any]:
        """Validate (and normalise) the options; the default checks ``base_features``."""
        if "base_features" in opts:
            positive_int(cls.name, "base_features", opts["base_features"])
        return opts

    @classmethod
    def input_divisor(cls, spec: NetSpec) -> tuple[int, ...]:
        return cls.divisor_of(cls.options_of(spec))

    @classmethod
    def divisor_of(cls, opts: dict[str, Any]) -> tuple[int, ...]:
        raise NotImplementedError

    @classmethod
    def estimate(cls, spec: NetSpec, patch_size: Sequence[int]) -> NetEstimate:
        t = Tally(cls.dims)
        shape = tuple(int(p) for p in patch_size)
        cls.tally(t, spec, cls.options_of(spec), shape)
        return t.result(shape, spec.in_channels, spec.n_classes)

    @classmethod
    def tally(cls, t: Tally, spec: NetSpec, opts: dict[str, Any], shape: Shape) -> None:
        raise NotImplementedError

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> list[torch.Tensor] | torch.Tensor:
        check_input(x, self.spec.dims, self.spec.in_channels, self.divisor)
        out = self.logits(x)
        return [out] if self.deep_supervision else out


def register_family(name: str) -> Callable[[type[FixedNet]], type[FixedNet]]:
    """Class decorator: name a ``FixedNet`` subclass and register it with its input divisor
    and analytic estimate."""

    def decorate(cls: type[FixedNet]) -> type[FixedNet]:
        cls.name = name
        return register_network(name, divisor=cls.input_divisor, estimate=cls.estimate)(cls)

    return decorate
