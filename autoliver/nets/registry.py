"""Network specification from a plan, and the registry of network families by name.

A family registers a builder (any callable ``NetSpec -> torch.nn.Module``, usually the
class itself) under a name with ``@register_network("name")``; ``build_network(name, spec)``
builds it. New families plug in by registering in a module imported by
``autoliver.nets``.

Registration may also record, per family:

* ``divisor``: what every input spatial size must be a multiple of (a callable
  ``NetSpec -> tuple``, or a constant int / tuple); ``input_divisor(arch, spec)`` returns it
  and falls back to ``spec.divisor`` (the plan's total stride) for families without one.
  The sliding window must pad images to a multiple of it.
* ``estimate``: ``(spec, patch_size) -> NetEstimate``, the trainable parameters and the bytes
  of activations one sample keeps for the backward pass, computed from the layer description
  without building the module (``estimate_network(arch, spec, patch_size)``), so a planner
  can size batch and patch.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

from planning.plans import Configuration

if TYPE_CHECKING:
    import torch

logger = logging.getLogger(__name__)

DEFAULT_ARCH = "unet"

Options = tuple[tuple[str, Any], ...]


def _freeze(value: Any) -> Any:
    """Lists (and nested lists) become tuples, so a spec stays hashable."""
    if isinstance(value, (list, tuple)):
        return tuple(_freeze(v) for v in value)
    return value


def _normalise_options(options: Mapping[str, Any] | Iterable[tuple[str, Any]]) -> Options:
    pairs = list(options.items()) if isinstance(options, Mapping) else [tuple(p) for p in options]
    names = []
    for pair in pairs:
        if len(pair) != 2 or not isinstance(pair[0], str) or not pair[0]:
            raise ValueError(f"NetSpec.options entries must be (name, value) pairs with a non-empty string name, got {pair!r}")
        names.append(pair[0])
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ValueError(f"NetSpec.options: option(s) given twice: {', '.join(duplicates)}")
    return tuple(sorted((name, _freeze(value)) for name, value in pairs))


@dataclass(frozen=True)
class NetSpec:
    """Everything a network family needs to build a model for one configuration.

    Per-stage entries (``features_per_stage``, ``kernel_sizes``, ``strides``) have one entry
    per resolution stage; stage 0 is the input resolution, ``strides[s]`` is the
    downsampling into stage ``s`` (the plan's first stride is all ones). Kernel sizes and
    strides have ``dims`` entries each, in (z, y, x) or (y, x) order.
    ``blocks_per_stage``: residual blocks per encoder stage (``resenc``; None: its default).
    ``options``: family options as sorted (name, value) pairs (a mapping is accepted and
    normalised; lists become tuples), read with ``option(name, default)``. Fixed-topology
    families (the published networks) take their widths from here and ignore the per-stage
    topology.
    """

    dims: int
    in_channels: int
    n_classes: int
    features_per_stage: tuple[int, ...]
    kernel_sizes: tuple[tuple[int, ...], ...]
    strides: tuple[tuple[int, ...], ...]
    deep_supervision: bool = True
    blocks_per_stage: tuple[int, ...] | None = None
    options: Options = field(default=())

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
        object.__setattr__(self, "options", _normalise_options(self.options))

    @property
    def n_stages(self) -> int:
        return len(self.features_per_stage)

    @property
    def divisor(self) -> tuple[int, ...]:
        """Total stride per axis: input spatial sizes must be multiples of it."""
        return tuple(math.prod(s[a] for s in self.strides) for a in range(self.dims))

    def option(self, name: str, default: Any = None) -> Any:
        """The family option ``name``, or ``default`` when it is not set."""
        for key, value in self.options:
            if key == name:
                return value
        return default

    def with_options(self, **options: Any) -> NetSpec:
        """A copy with ``options`` set (added to, or replacing, the existing ones)."""
        return replace(self, options={**dict(self.options), **options})


def net_spec(config: Configuration, n_classes: int = 3, deep_supervision: bool = True, options: Mapping[str, Any] | None = None) -> NetSpec:
    """The NetSpec of a plan configuration.

    Input channels: ``config.in_slices`` image channels (1 for 2d/3d, k adjacent slices for
    2.5d), plus, for a cascade stage (``config.previous_stage`` set), the one-hot of the
    previous stage's foreground labels (``n_classes - 1`` channels) after them.
    ``options``: family options (see ``NetSpec.options``): the configuration's
    ``network_options``, updated with ``options``.
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
        options={**_config_options(config), **dict(options or {})},
    )


def _config_options(config: Configuration) -> dict[str, Any]:
    found = getattr(config, "network_options", None) or {}
    if not isinstance(found, Mapping):
        raise ValueError(f"configuration {config.name!r}: network_options must be a mapping of option names to values, got {found!r}")
    return dict(found)


def fixed_spec(dims: int, in_channels: int, n_classes: int, *, deep_supervision: bool = True, **options: Any) -> NetSpec:
    """A NetSpec for a fixed-topology family (no plan needed): the per-stage topology is a
    two-stage placeholder (the fixed-topology families ignore it), ``options`` set."""
    return NetSpec(
        dims=dims,
        in_channels=in_channels,
        n_classes=n_classes,
        features_per_stage=(32, 64),
        kernel_sizes=((3,) * dims,) * 2,
        strides=((1,) * dims, (2,) * dims),
        deep_supervision=deep_supervision,
        options=options,
    )


@dataclass(frozen=True)
class NetEstimate:
    """Analytic size of a network: trainable parameters, and the bytes of activations one
    sample keeps for the backward pass in fp32 (about half under fp16/bf16 autocast), the
    loss's logits, probabilities and log-probabilities included."""

    parameters: int
    activation_bytes_per_sample: int


Builder = Callable[[NetSpec], "torch.nn.Module"]
DivisorFn = Callable[[NetSpec], Sequence[int]]
EstimateFn = Callable[[NetSpec, Sequence[int]], NetEstimate]


@dataclass(frozen=True)
class NetworkEntry:
    """A registered family: its builder and, optionally, its input divisor and estimate."""

    builder: Builder
    divisor: DivisorFn | int | tuple[int, ...] | None = None
    estimate: EstimateFn | None = None


_REGISTRY: dict[str, NetworkEntry] = {}


def register_network(
    name: str, *, divisor: DivisorFn | int | tuple[int, ...] | None = None, estimate: EstimateFn | None = None
) -> Callable[[Builder], Builder]:
    """Decorator: register a builder (``NetSpec -> Module``) under ``name``, with optional
    metadata (see the module docstring). Returns the builder unchanged."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"network name must be a non-empty string, got {name!r}")

    def decorate(builder: Builder) -> Builder:
        if name in _REGISTRY and _REGISTRY[name].builder is not builder:
            raise ValueError(f"network {name!r} is already registered (by {_REGISTRY[name].builder!r}); pick another name")
        _REGISTRY[name] = NetworkEntry(builder, divisor, estimate)
        return builder

    return decorate


def available_networks() -> tuple[str, ...]:
    """Registered network names, sorted."""
    return tuple(sorted(_REGISTRY))


def _entry(arch: str) -> NetworkEntry:
    if arch not in _REGISTRY:
        raise ValueError(f"unknown network architecture {arch!r}; available: {', '.join(available_networks())}")
    return _REGISTRY[arch]


def build_network(arch: str, spec: NetSpec) -> "torch.nn.Module":
    """Build the network family ``arch`` for ``spec`` (weights freshly initialised)."""
    model = _entry(arch).builder(spec)
    n_params = sum(p.numel() for p in model.parameters())
    logger.debug("built %s: %d-D, %d parameters", arch, spec.dims, n_params)
    return model


def input_divisor(arch: str, spec: NetSpec) -> tuple[int, ...]:
    """Per axis, what every input spatial size of ``arch`` built from ``spec`` must be a
    multiple of (pad to it); ``spec.divisor`` for families that register none."""
    d = _entry(arch).divisor
    if d is None:
        return spec.divisor
    value = d(spec) if callable(d) else d
    out = (int(value),) * spec.dims if isinstance(value, int) else tuple(int(v) for v in value)
    if len(out) != spec.dims or min(out) < 1:
        raise ValueError(f"network {arch!r}: input divisor {out} does not have {spec.dims} positive entries")
    return out


def estimate_network(arch: str, spec: NetSpec, patch_size: Sequence[int]) -> NetEstimate:
    """Analytic parameter count and activation bytes per sample of ``arch`` for ``spec`` at
    ``patch_size``, without building the module. ValueError if the family has no estimate,
    or the patch does not suit the network (wrong axes, not a multiple of the divisor)."""
    entry = _entry(arch)
    if entry.estimate is None:
        raise ValueError(f"network {arch!r} registers no analytic estimate; build it and count its parameters instead")
    patch = tuple(int(p) for p in patch_size)
    divisor = input_divisor(arch, spec)
    if len(patch) != spec.dims or any(p < 1 or p % d for p, d in zip(patch, divisor)):
        raise ValueError(f"network {arch!r}: patch size {patch} must have {spec.dims} axes, each a positive multiple of {divisor}")
    return entry.estimate(spec, patch)
