"""U-Nets laid out as nnU-Net v2's models are, so their weights load with ``strict=True``.

nnU-Net v2 stores a network as a plans ``architecture`` dict: ``network_class_name`` (its
``PlainConvUNet``, ``ResidualEncoderUNet`` or ``ResidualUNet``) and ``arch_kwargs`` (n_stages, features_per_stage,
conv_op, kernel_sizes, strides, n_conv_per_stage or n_blocks_per_stage,
n_conv_per_stage_decoder, conv_bias, norm_op + norm_op_kwargs, dropout_op + kwargs, nonlin +
kwargs). ``build_nnunet_network`` builds the same topology in plain torch, with the module
names its checkpoints use:

- a conv unit is ``conv`` -> [``dropout``] -> [``norm``] -> [``nonlin``], the same modules also
  held in order by ``all_modules`` (a checkpoint lists each parameter under both names);
  a stack of units is ``convs``;
- plain encoder: ``encoder.stages.<s>.0.convs.<i>``, the first unit of a stage strided;
- residual encoder: ``encoder.stem.convs.0``, then ``encoder.stages.<s>.blocks.<b>`` with
  ``conv1`` (strided), ``conv2`` (no nonlinearity), ``skip`` (average pooling by the stride
  when strided, then a bias-free 1x1 conv unit when the width changes), and a nonlinearity after
  the sum;
- decoder: ``decoder.transpconvs.<s>`` (transposed conv, kernel = stride), ``decoder.stages.<s>``
  (a conv stack; residual blocks in ``ResidualUNet``, whose decoder is residual too), one 1x1
  ``decoder.seg_layers.<s>`` per stage, and ``decoder.encoder`` (the encoder again, so its
  parameters are listed a second time under that name).

Class and operator names are looked up in fixed tables, never imported from the plans: an
unknown one is refused with an ``UnsupportedModelError`` naming it. Array layout (B, C, Z, Y, X)
or (B, C, Y, X); deep supervision is off unless asked for (then the outputs, finest first).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import nn

from autoliver.core.errors import AutoliverError

PLAIN, RESIDUAL, RESIDUAL_BOTH = "PlainConvUNet", "ResidualEncoderUNet", "ResidualUNet"
NETWORK_CLASSES = (PLAIN, RESIDUAL, RESIDUAL_BOTH)

_CONV = {"Conv2d": (nn.Conv2d, nn.ConvTranspose2d, nn.AvgPool2d), "Conv3d": (nn.Conv3d, nn.ConvTranspose3d, nn.AvgPool3d)}
_NORM = {"InstanceNorm2d": nn.InstanceNorm2d, "InstanceNorm3d": nn.InstanceNorm3d, "BatchNorm2d": nn.BatchNorm2d,
         "BatchNorm3d": nn.BatchNorm3d}
_DROPOUT = {"Dropout": nn.Dropout, "Dropout1d": nn.Dropout1d, "Dropout2d": nn.Dropout2d, "Dropout3d": nn.Dropout3d}
_NONLIN = {"LeakyReLU": nn.LeakyReLU, "ReLU": nn.ReLU, "PReLU": nn.PReLU, "ELU": nn.ELU, "GELU": nn.GELU, "SiLU": nn.SiLU}


class UnsupportedModelError(AutoliverError):
    """An nnU-Net model whose network class, operator or trainer autoliver does not build."""


def _lookup(table: Mapping, name: str | None, what: str, where: str):
    if name is None:
        return None
    if not isinstance(name, str) or not (name.startswith("torch.nn.") or "." not in name):
        raise UnsupportedModelError(f"{where}: {what} {name!r} is not a torch.nn operator; supported: {', '.join(table)}")
    short = name.rsplit(".", 1)[-1]
    if short not in table:
        raise UnsupportedModelError(f"{where}: {what} {name!r} is not supported; supported: {', '.join(table)}")
    return table[short]


def _triple(v, dims: int) -> list[int]:
    return [int(v)] * dims if isinstance(v, int) else [int(x) for x in v]


class ConvUnit(nn.Module):
    """conv -> [dropout] -> [norm] -> [nonlin] (conv padding (k - 1) // 2)."""

    def __init__(self, ops: dict, cin: int, cout: int, kernel: Sequence[int], stride: Sequence[int], bias: bool,
                 dropout: bool = True, nonlin: bool = True):
        super().__init__()
        modules: list[nn.Module] = []
        self.conv = ops["conv"](cin, cout, tuple(kernel), tuple(stride), padding=[(k - 1) // 2 for k in kernel], dilation=1, bias=bias)
        modules.append(self.conv)
        if dropout and ops["dropout"] is not None:
            self.dropout = ops["dropout"](**ops["dropout_kwargs"])
            modules.append(self.dropout)
        if ops["norm"] is not None:
            self.norm = ops["norm"](cout, **ops["norm_kwargs"])
            modules.append(self.norm)
        if nonlin and ops["nonlin"] is not None:
            self.nonlin = ops["nonlin"](**ops["nonlin_kwargs"])
            modules.append(self.nonlin)
        if ops["nonlin_first"] and ops["norm"] is not None and nonlin and ops["nonlin"] is not None:
            modules[-1], modules[-2] = modules[-2], modules[-1]
        self.all_modules = nn.Sequential(*modules)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.all_modules(x)


class ConvStack(nn.Module):
    """``n`` conv units, the first one strided."""

    def __init__(self, ops: dict, n: int, cin: int, cout: int, kernel: Sequence[int], stride: Sequence[int], bias: bool):
        super().__init__()
        ones = [1] * len(kernel)
        self.convs = nn.Sequential(*[ConvUnit(ops, cin if i == 0 else cout, cout, kernel, stride if i == 0 else ones, bias)
                                     for i in range(n)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.convs(x)


class ResidualBlock(nn.Module):
    """Two conv units (the second without nonlinearity) plus the skip, then the nonlinearity."""

    def __init__(self, ops: dict, cin: int, cout: int, kernel: Sequence[int], stride: Sequence[int], bias: bool):
        super().__init__()
        ones = [1] * len(kernel)
        self.conv1 = ConvUnit(ops, cin, cout, kernel, stride, bias)
        self.conv2 = ConvUnit(ops, cout, cout, kernel, ones, bias, dropout=False, nonlin=False)
        self.nonlin2 = ops["nonlin"](**ops["nonlin_kwargs"]) if ops["nonlin"] is not None else nn.Identity()
        strided = any(s != 1 for s in stride)
        skip: list[nn.Module] = []
        if strided:
            skip.append(ops["pool"](tuple(stride), tuple(stride)))
        if cin != cout:
            skip.append(ConvUnit(ops, cin, cout, ones, ones, False, dropout=False, nonlin=False))
        self.skip = nn.Sequential(*skip) if skip else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv2(self.conv1(x))
        out = out + self.skip(x)
        return self.nonlin2(out)


class ResidualStack(nn.Module):
    def __init__(self, ops: dict, n: int, cin: int, cout: int, kernel: Sequence[int], stride: Sequence[int], bias: bool):
        super().__init__()
        ones = [1] * len(kernel)
        self.blocks = nn.Sequential(*[ResidualBlock(ops, cin if i == 0 else cout, cout, kernel, stride if i == 0 else ones, bias)
                                      for i in range(n)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks(x)


class Encoder(nn.Module):
    def __init__(self, ops: dict, in_channels: int, features: Sequence[int], kernels: Sequence[Sequence[int]],
                 strides: Sequence[Sequence[int]], per_stage: Sequence[int], bias: bool, residual: bool):
        super().__init__()
        self.features, self.kernels, self.strides = list(features), [list(k) for k in kernels], [list(s) for s in strides]
        stages: list[nn.Module] = []
        cin = in_channels
        if residual:
            self.stem = ConvStack(ops, 1, cin, features[0], kernels[0], [1] * len(kernels[0]), bias)
            cin = features[0]
        for s, cout in enumerate(features):
            if residual:
                stages.append(ResidualStack(ops, per_stage[s], cin, cout, kernels[s], strides[s], bias))
            else:
                stages.append(nn.Sequential(ConvStack(ops, per_stage[s], cin, cout, kernels[s], strides[s], bias)))
            cin = cout
        self.stages = nn.Sequential(*stages)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        if hasattr(self, "stem"):
            x = self.stem(x)
        skips = []
        for stage in self.stages:
            x = stage(x)
            skips.append(x)
        return skips


class Decoder(nn.Module):
    def __init__(self, ops: dict, encoder: Encoder, n_classes: int, per_stage: Sequence[int], bias: bool, residual: bool):
        super().__init__()
        self.encoder = encoder  # registered again: nnU-Net's checkpoints list its weights under decoder.encoder too
        self.deep_supervision = False
        f, k, st = encoder.features, encoder.kernels, encoder.strides
        stages, ups, heads = [], [], []
        for s in range(1, len(f)):
            below, skip, stride = f[-s], f[-(s + 1)], st[-s]
            ups.append(ops["transp"](below, skip, tuple(stride), tuple(stride), bias=bias))
            stack = ResidualStack if residual else ConvStack
            stages.append(stack(ops, per_stage[s - 1], 2 * skip, skip, k[-(s + 1)], [1] * len(stride), bias))
            heads.append(ops["conv"](skip, n_classes, 1, 1, 0, bias=True))
        self.stages, self.transpconvs, self.seg_layers = nn.ModuleList(stages), nn.ModuleList(ups), nn.ModuleList(heads)

    def forward(self, skips: list[torch.Tensor]):
        x, outs = skips[-1], []
        last = len(self.stages) - 1
        for s, (up, stage) in enumerate(zip(self.transpconvs, self.stages)):
            x = stage(torch.cat((up(x), skips[-(s + 2)]), 1))
            if self.deep_supervision:
                outs.append(self.seg_layers[s](x))
            elif s == last:
                outs.append(self.seg_layers[-1](x))
        return outs[::-1] if self.deep_supervision else outs[0]


class NnunetUNet(nn.Module):
    """An nnU-Net v2 ``PlainConvUNet`` / ``ResidualEncoderUNet`` (see the module docstring)."""

    def __init__(self, class_name: str, ops: dict, in_channels: int, n_classes: int, features: Sequence[int],
                 kernels: Sequence[Sequence[int]], strides: Sequence[Sequence[int]], per_stage: Sequence[int],
                 per_stage_decoder: Sequence[int], bias: bool):
        super().__init__()
        self.class_name = class_name
        self.encoder = Encoder(ops, in_channels, features, kernels, strides, per_stage, bias, class_name != PLAIN)
        self.decoder = Decoder(ops, self.encoder, n_classes, per_stage_decoder, bias, class_name == RESIDUAL_BOTH)

    @property
    def deep_supervision(self) -> bool:
        return self.decoder.deep_supervision

    @deep_supervision.setter
    def deep_supervision(self, value: bool) -> None:
        self.decoder.deep_supervision = bool(value)

    def forward(self, x: torch.Tensor):
        return self.decoder(self.encoder(x))


def _per_stage(kw: Mapping, key: str, n: int, where: str) -> list[int]:
    v = kw.get(key)
    if v is None:
        raise UnsupportedModelError(f"{where}: arch_kwargs has no {key!r}; the plans are not an nnU-Net v2 U-Net's")
    out = [int(v)] * n if isinstance(v, int) else [int(x) for x in v]
    if len(out) != n:
        raise UnsupportedModelError(f"{where}: {key} has {len(out)} entries for {n} stages")
    return out


def build_nnunet_network(architecture: Mapping, in_channels: int, n_classes: int, where: str = "plans.json") -> NnunetUNet:
    """The network an nnU-Net v2 plans ``architecture`` dict describes (deep supervision off);
    ``where`` names the file in error messages."""
    name = str(architecture.get("network_class_name", ""))
    short = name.rsplit(".", 1)[-1]
    if short not in NETWORK_CLASSES or not (name == short or name.startswith("dynamic_network_architectures.")):
        raise UnsupportedModelError(f"{where}: network class {name!r} is not supported (autoliver builds nnU-Net's "
                                    f"{' and '.join(NETWORK_CLASSES)}); predict this model with nnUNetv2_predict")
    kw = architecture.get("arch_kwargs") or {}
    conv_name = kw.get("conv_op")
    conv = _lookup(_CONV, conv_name, "conv_op", where)
    if conv is None:
        raise UnsupportedModelError(f"{where}: arch_kwargs has no conv_op")
    dims = 3 if conv[0] is nn.Conv3d else 2
    n = int(kw.get("n_stages", 0))
    if n < 1:
        raise UnsupportedModelError(f"{where}: n_stages must be >= 1, got {kw.get('n_stages')!r}")
    ops = {"conv": conv[0], "transp": conv[1], "pool": conv[2],
           "norm": _lookup(_NORM, kw.get("norm_op"), "norm_op", where), "norm_kwargs": dict(kw.get("norm_op_kwargs") or {}),
           "dropout": _lookup(_DROPOUT, kw.get("dropout_op"), "dropout_op", where),
           "dropout_kwargs": dict(kw.get("dropout_op_kwargs") or {}),
           "nonlin": _lookup(_NONLIN, kw.get("nonlin"), "nonlin", where), "nonlin_kwargs": dict(kw.get("nonlin_kwargs") or {}),
           "nonlin_first": bool(kw.get("nonlin_first", False))}
    for key in ("block", "bottleneck_channels", "stem_channels"):
        if kw.get(key) not in (None, "BasicBlockD", "dynamic_network_architectures.building_blocks.residual.BasicBlockD"):
            raise UnsupportedModelError(f"{where}: arch_kwargs {key}={kw.get(key)!r} is not supported")
    features = _per_stage(kw, "features_per_stage", n, where)
    kernels = [_triple(k, dims) for k in (kw.get("kernel_sizes") if not isinstance(kw.get("kernel_sizes"), int) else [kw["kernel_sizes"]] * n)]
    strides = [_triple(s, dims) for s in (kw.get("strides") if not isinstance(kw.get("strides"), int) else [kw["strides"]] * n)]
    if len(kernels) != n or len(strides) != n:
        raise UnsupportedModelError(f"{where}: kernel_sizes / strides need {n} entries")
    per_stage = _per_stage(kw, "n_conv_per_stage" if short == PLAIN else "n_blocks_per_stage", n, where)
    per_decoder = _per_stage(kw, "n_conv_per_stage_decoder", n - 1, where) if n > 1 else []
    return NnunetUNet(short, ops, int(in_channels), int(n_classes), features, kernels, strides, per_stage, per_decoder,
                      bool(kw.get("conv_bias", False)))
