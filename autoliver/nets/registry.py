"""Network specification from a plan, and the registry of network families by name.

A family registers a builder (any callable ``NetSpec -> torch.nn.Module``, usually the
class itself) under a name with ``@register_network("name")``; ``build_network(name, spec)``
builds it. New families plug in by registering in a module imported by
``autoliver.nets``.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from planning.plans import Configuration

if TYPE_CHECKING:
    import torch

logger = logging.getLogger(__name__)

DEFAULT_ARCH = "unet"


@dataclass(frozen=True)
class NetSpec:
    """Everything a network family needs to build a model for one configuration.

    Per-stage entries (``features_per_stage``, ``kernel_sizes``, ``strides``) have one entry
    per resolution stage; stage 0 is the input resolution, ``strides[s]`` is the
    downsampling into stage ``s`` (the plan's first stride is all ones). Kernel sizes and
    strides have ``dims`` entries each, in (z, y, x) or (y, x) order.
    ``blocks_per_stage``: residual blocks per encoder stage (``resenc``; None: its default).
    """

    dims: int
    in_channels: int
    n_classes: int
    features_per_stage: tuple[int, ...]
    kernel_sizes: tuple[tuple[int, ...], ...]
    strides: tuple[tuple[int, ...], ...]
    deep_supervision: bool = True
    blocks_per_stage: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        if self.dims not in (2, 3):
            raise ValueError(f"NetSpec.dims must be 2 or 3, got {self.dims!r}")
        if self.in_channels < 1 or self.n_classes < 1:
            raise ValueError(f"NetSpec needs in_channels >= 1 and n_classes >= 1, got {self.in_channels}, {self.n_classes}")
        n = len(self.features_per_stage)
        if n < 2:
            raise ValueError(f"NetSpec needs at least 2 stages (an encoder and a decoder level), got {n}; the patch is too small to pool")
        if len(self.kernel_sizes) != n or len(self.strides) != n:
            raise ValueError(
                f"NetSpec: features_per_stage, kernel_sizes and strides need one entry per stage, got "
                f"{n}, {len(self.kernel_sizes)}, {len(self.strides)}"
            )
        if any(f < 1 for f in self.features_per_stage):
            raise ValueError(f"NetSpec.features_per_stage must be positive, got {self.features_per_stage}")
        for name, per_stage in (("kernel_sizes", self.kernel_sizes), ("strides", self.strides)):
            if any(len(v) != self.dims or min(v) < 1 for v in per_stage):
                raise ValueError(f"NetSpec.{name}: every entry needs {self.dims} positive values, got {per_stage}")
        if any(k % 2 == 0 for ks in self.kernel_sizes for k in ks):
            raise ValueError(f"NetSpec.kernel_sizes must be odd (same-size padding), got {self.kernel_sizes}")
        if self.blocks_per_stage is not None and (len(self.blocks_per_stage) != n or min(self.blocks_per_stage) < 1):
            raise ValueError(f"NetSpec.blocks_per_stage needs {n} entries >= 1, got {self.blocks_per_stage}")

    @property
    def n_stages(self) -> int:
        return len(self.features_per_stage)

    @property
    def divisor(self) -> tuple[int, ...]:
        """Total stride per axis: input spatial sizes must be multiples of it."""
        return tuple(math.prod(s[a] for s in self.strides) for a in range(self.dims))


def net_spec(config: Configuration, n_classes: int = 3, deep_supervision: bool = True) -> NetSpec:
    """The NetSpec of a plan configuration.

    Input channels: ``config.in_slices`` image channels (1 for 2d/3d, k adjacent slices for
    2.5d), plus, for a cascade stage (``config.previous_stage`` set), the one-hot of the
    previous stage's foreground labels (``n_classes - 1`` channels) after them.
    """
    if n_classes < 2:
        raise ValueError(f"n_classes must be >= 2 (background + at least one label), got {n_classes}")
    if config.in_slices < 1:
        raise ValueError(f"configuration {config.name!r}: in_slices must be >= 1, got {config.in_slices}")
    in_channels = config.in_slices + (n_classes - 1 if config.previous_stage else 0)
    return NetSpec(
        dims=int(config.network_dims),
        in_channels=int(in_channels),
        n_classes=int(n_classes),
        features_per_stage=tuple(int(f) for f in config.features_per_stage),
        kernel_sizes=tuple(tuple(int(k) for k in ks) for ks in config.kernel_sizes),
        strides=tuple(tuple(int(s) for s in st) for st in config.strides),
        deep_supervision=deep_supervision,
    )


Builder = Callable[[NetSpec], "torch.nn.Module"]
_REGISTRY: dict[str, Builder] = {}


def register_network(name: str) -> Callable[[Builder], Builder]:
    """Decorator: register a builder (``NetSpec -> Module``) under ``name``."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"network name must be a non-empty string, got {name!r}")

    def decorate(builder: Builder) -> Builder:
        if name in _REGISTRY and _REGISTRY[name] is not builder:
            raise ValueError(f"network {name!r} is already registered (by {_REGISTRY[name]!r}); pick another name")
        _REGISTRY[name] = builder
        return builder

    return decorate


def available_networks() -> tuple[str, ...]:
    """Registered network names, sorted."""
    return tuple(sorted(_REGISTRY))


def build_network(arch: str, spec: NetSpec) -> "torch.nn.Module":
    """Build the network family ``arch`` for ``spec`` (weights freshly initialised)."""
    if arch not in _REGISTRY:
        raise ValueError(f"unknown network architecture {arch!r}; available: {', '.join(available_networks())}")
    model = _REGISTRY[arch](spec)
    n_params = sum(p.numel() for p in model.parameters())
    logger.debug("built %s: %d-D, %d stages, %d parameters", arch, spec.dims, spec.n_stages, n_params)
    return model
