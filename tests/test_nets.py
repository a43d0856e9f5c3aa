"""Networks: specs from plans, the registry, output shapes, parameter counts, learning."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from autoliver.nets import NetSpec, available_networks, build_network, default_blocks_per_stage, net_spec, register_network, registry
from autoliver.nets.resenc import BasicBlock
from planning.memory import parameter_count
from planning.planner import plan_experiment
from planning.plans import Configuration
from planning.topology import Topology, compute_topology

ARCHS = ("unet", "resenc")


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny convolutions: one intra-op thread avoids thread hand-off costs that dominate
    (and explode when the cores are shared with other processes)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def config(name: str, dims: int, features, kernels, strides, in_slices: int = 1, previous_stage: str | None = None) -> Configuration:
    patch = tuple(2 * math.prod(s[a] for s in strides) for a in range(dims))
    return Configuration(
        name=name, network_dims=dims, data_identifier="fullres", spacing=(1.0, 1.0, 1.0), median_shape=(64, 64, 64),
        patch_size=patch, batch_size=2, n_stages=len(features), features_per_stage=tuple(features),
        kernel_sizes=tuple(kernels), strides=tuple(strides), in_slices=in_slices, previous_stage=previous_stage,
    )


SMALL_3D = dict(features=(4, 8, 16), kernels=((1, 3, 3), (3, 3, 3), (3, 3, 3)), strides=((1, 1, 1), (1, 2, 2), (2, 2, 2)))
SMALL_2D = dict(features=(4, 8, 16, 16), kernels=((3, 3),) * 4, strides=((1, 1),) + ((2, 2),) * 3)
HAND_MADE = {
    "2d": config("2d", 2, **SMALL_2D),
    "2.5d": config("2.5d", 2, **SMALL_2D, in_slices=5),
    "3d_fullres": config("3d_fullres", 3, **SMALL_3D),
    "3d_cascade_fullres": config("3d_cascade_fullres", 3, **SMALL_3D, previous_stage="3d_lowres"),
}
EXPECTED_CHANNELS = {"2d": 1, "2.5d": 5, "3d_fullres": 1, "3d_cascade_fullres": 3}


def small_fingerprint(spacing, shape, n_cases=4) -> dict:
    pct = {str(p): list(spacing) for p in (5, 10, 50, 90, 95)}
    return {
        "n_cases": n_cases,
        "dataset_name": "Dataset900_Small",
        "labels": {"background": 0, "liver": 1, "tumour": 2},
        "spacing": {"median": list(spacing), "percentiles": pct},
        "shape_after_crop": {"median": list(shape), "percentiles": {k: list(shape) for k in pct}},
        "intensity": {"foreground": {"mean": 100.0, "std": 40.0, "percentile_00_5": -20.0, "percentile_99_5": 200.0}},
    }


def expected_shapes(spec: NetSpec, batch: int, spatial: tuple[int, ...]) -> list[tuple[int, ...]]:
    shapes, cur = [], list(spatial)
    for stride in spec.strides[:-1]:
        cur = [c // s for c, s in zip(cur, stride)]
        shapes.append((batch, spec.n_classes, *cur))
    return shapes


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def spec_of(t: Topology, in_channels: int = 1, n_classes: int = 3, **kw) -> NetSpec:
    return NetSpec(t.dims, in_channels, n_classes, t.features_per_stage, t.kernel_sizes, t.strides, **kw)


# --- specs -------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(HAND_MADE))
def test_net_spec_channels(name):
    spec = net_spec(HAND_MADE[name])
    assert spec.in_channels == EXPECTED_CHANNELS[name]
    assert spec.dims == HAND_MADE[name].network_dims and spec.n_classes == 3 and spec.deep_supervision
    assert net_spec(HAND_MADE["3d_cascade_fullres"], n_classes=4).in_channels == 4


def test_net_spec_rejects_bad_specs():
    good = dict(dims=3, in_channels=1, n_classes=3, features_per_stage=(4, 8), kernel_sizes=((3, 3, 3),) * 2, strides=((1, 1, 1), (2, 2, 2)))
    NetSpec(**good)
    for bad in (
        {"dims": 4},
        {"features_per_stage": (4, 8, 16)},
        {"kernel_sizes": ((3, 3),) * 2},
        {"kernel_sizes": ((3, 3, 2),) * 2},
        {"strides": ((1, 1, 1), (0, 2, 2))},
        {"features_per_stage": (4,), "kernel_sizes": ((3, 3, 3),), "strides": ((1, 1, 1),)},
        {"blocks_per_stage": (1,)},
        {"in_channels": 0},
    ):
        with pytest.raises(ValueError):
            NetSpec(**{**good, **bad})
    with pytest.raises(ValueError):
        net_spec(HAND_MADE["2d"], n_classes=1)


# --- registry ----------------------------------------------------------------------------


def test_registry_lists_and_rejects(monkeypatch):
    assert set(ARCHS) <= set(available_networks())
    spec = net_spec(HAND_MADE["3d_fullres"])
    with pytest.raises(ValueError, match="unknown network architecture 'vnet'.*resenc.*unet"):
        build_network("vnet", spec)
    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))

    @register_network("tiny")
    def tiny(s: NetSpec) -> nn.Module:
        return nn.Conv3d(s.in_channels, s.n_classes, 1)

    assert "tiny" in available_networks()
    assert isinstance(build_network("tiny", spec), nn.Conv3d)
    with pytest.raises(ValueError, match="already registered"):
        register_network("unet")(tiny)


# --- shapes ------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("name", list(HAND_MADE))
def test_output_shapes_hand_made(arch, name):
    spec = net_spec(HAND_MADE[name])
    model = build_network(arch, spec)
    spatial = tuple(2 * d for d in spec.divisor)
    x = torch.randn(2, spec.in_channels, *spatial)
    with torch.no_grad():
        outs = model(x)
        assert isinstance(outs, list) and len(outs) == spec.n_stages - 1
        assert [tuple(o.shape) for o in outs] == expected_shapes(spec, 2, spatial)
        model.deep_supervision = False
        single = model(x)
    assert isinstance(single, torch.Tensor) and single.shape == (2, 3, *spatial)
    torch.testing.assert_close(single, outs[0], rtol=0, atol=0)  # same head, same weights
    with pytest.raises(ValueError, match="multiple of the total stride"):
        model(torch.randn(1, spec.in_channels, *(d + 1 for d in spatial)))
    with pytest.raises(ValueError, match="expected input"):
        model(torch.randn(1, spec.in_channels + 1, *spatial))


@pytest.fixture(scope="module")
def planned():
    small = plan_experiment(small_fingerprint((2.5, 0.8, 0.8), (40, 96, 96)), device="cpu", cpu_ram_gb=4)
    lits = plan_experiment(small_fingerprint((1.0, 0.768, 0.768), (482, 512, 512), 131), device="cpu", cpu_ram_gb=24)
    return {**small.configurations, "3d_cascade_fullres": lits.configurations["3d_cascade_fullres"]}


@pytest.mark.parametrize("name", ["2d", "2.5d", "3d_fullres", "3d_cascade_fullres"])
def test_output_shapes_from_plan(planned, name):
    c = planned[name]
    spec = net_spec(c)
    assert spec.in_channels == {"2d": 1, "2.5d": c.in_slices, "3d_fullres": 1, "3d_cascade_fullres": 3}[name]
    assert spec.kernel_sizes == c.kernel_sizes and spec.strides == c.strides
    assert all(p % d == 0 for p, d in zip(c.patch_size, spec.divisor))  # the plan's patch fits
    model = build_network("unet", spec)
    spatial = tuple(2 * d for d in spec.divisor)  # small valid input: the net is fully convolutional
    with torch.no_grad():
        outs = model(torch.randn(1, spec.in_channels, *spatial))
    assert [tuple(o.shape) for o in outs] == expected_shapes(spec, 1, spatial)


# --- parameters and architecture -----------------------------------------------------------

TOPOLOGIES = [
    compute_topology((128, 128, 128), (1.0, 0.768, 0.768)),  # LiTS-like 3D, 6 stages, 320 cap
    compute_topology((32, 256, 256), (5.0, 0.8, 0.8)),  # anisotropic: (1, 3, 3) kernels, no z pooling first
    compute_topology((512, 512), (0.768, 0.768)),  # 2D, 7 stages, 512 cap
]


@pytest.mark.parametrize("topology", TOPOLOGIES, ids=["lits3d", "aniso3d", "2d"])
def test_unet_parameters_match_memory_model(topology):
    for in_ch in (1, 3):
        model = build_network("unet", spec_of(topology, in_ch))
        assert n_params(model) == parameter_count(topology, in_ch, 3)


def _resenc_parameter_count(spec: NetSpec) -> int:
    f, k = spec.features_per_stage, [math.prod(ks) for ks in spec.kernel_sizes]
    blocks = spec.blocks_per_stage or default_blocks_per_stage(spec.n_stages)
    total = spec.in_channels * f[0] * k[0] + 3 * f[0]  # stem conv + norm
    prev = f[0]
    for s in range(spec.n_stages):
        for b in range(blocks[s]):
            cin = prev if b == 0 else f[s]
            total += cin * f[s] * k[s] + 3 * f[s] + f[s] * f[s] * k[s] + 3 * f[s]
            if b == 0 and (cin != f[s] or any(x != 1 for x in spec.strides[s])):
                total += cin * f[s] + 2 * f[s]  # 1x1 projection (no bias) + norm
        prev = f[s]
    for s in range(spec.n_stages - 1):
        total += f[s + 1] * f[s] * math.prod(spec.strides[s + 1]) + f[s]  # transposed conv
        total += 2 * f[s] * f[s] * k[s] + 3 * f[s]  # one conv block on the concatenation
        total += f[s] * spec.n_classes + spec.n_classes
    return total


@pytest.mark.parametrize("topology", TOPOLOGIES, ids=["lits3d", "aniso3d", "2d"])
def test_resenc_structure(topology):
    spec = spec_of(topology, 2)
    model = build_network("resenc", spec)
    assert n_params(model) == _resenc_parameter_count(spec)
    expected_blocks = (1, 3, 4, 6, 6, 6, 6)[: spec.n_stages]
    assert tuple(len(stage) for stage in model.encoder) == expected_blocks
    for s, stage in enumerate(model.encoder):
        for b, block in enumerate(stage):
            assert isinstance(block, BasicBlock)
            cin = spec.features_per_stage[max(s - 1, 0)]  # stage 0 reads the stem's output
            projects = b == 0 and (cin != spec.features_per_stage[s] or any(x != 1 for x in spec.strides[s]))
            assert isinstance(block.skip, nn.Identity) == (not projects)
    custom = build_network("resenc", spec_of(topology, 1, blocks_per_stage=(2,) * topology.n_stages))
    assert all(len(stage) == 2 for stage in custom.encoder)


def test_unet_matches_independent_reference():
    """Same forward as a straightforward nn.Sequential U-Net given the same weights."""
    t = compute_topology((16, 32, 24), (3.0, 1.0, 1.0), max_pools=2)
    f, ks, st = t.features_per_stage, t.kernel_sizes, t.strides

    def block(cin, cout, k, s):
        return nn.Sequential(nn.Conv3d(cin, cout, k, s, [x // 2 for x in k]), nn.InstanceNorm3d(cout, affine=True), nn.LeakyReLU(0.01))

    enc = nn.ModuleList([nn.Sequential(block(1 if i == 0 else f[i - 1], f[i], ks[i], st[i]), block(f[i], f[i], ks[i], 1)) for i in range(t.n_stages)])
    levels = range(t.n_stages - 2, -1, -1)
    up = nn.ModuleList([nn.ConvTranspose3d(f[i + 1], f[i], st[i + 1], st[i + 1]) for i in levels])
    dec = nn.ModuleList([nn.Sequential(block(2 * f[i], f[i], ks[i], 1), block(f[i], f[i], ks[i], 1)) for i in levels])
    heads = nn.ModuleList([nn.Conv3d(f[i], 3, 1) for i in levels])
    reference = nn.ModuleList([enc, up, dec, heads])
    model = build_network("unet", spec_of(t))
    torch.manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))  # norm scales/shifts away from 1/0 too
        ours, theirs = list(model.parameters()), list(reference.parameters())
        assert [p.shape for p in ours] == [p.shape for p in theirs]
        for a, b in zip(theirs, ours):
            a.copy_(b)
        x = torch.randn(2, 1, *t.patch_size)
        skips, h = [], x
        for e in enc:
            h = e(h)
            skips.append(h)
        expected = []
        for j, (u, d, hd) in enumerate(zip(up, dec, heads)):
            h = d(torch.cat([u(h), skips[-(j + 2)]], 1))
            expected.append(hd(h))
        got = model(x)
    for g, e in zip(got, expected[::-1]):
        torch.testing.assert_close(g, e, rtol=1e-4, atol=1e-4)


def test_weight_init_is_kaiming():
    model = build_network("unet", NetSpec(3, 1, 3, (32, 320), ((3, 3, 3),) * 2, ((1, 1, 1), (2, 2, 2))))
    conv = model.encoder[1][1].conv  # 320 -> 320, 3x3x3: 2.8 M weights
    fan_in = 320 * 27
    expected_std = math.sqrt(2.0 / (1 + 0.01**2)) / math.sqrt(fan_in)
    assert float(conv.weight.detach().std()) == pytest.approx(expected_std, rel=0.01)
    assert float(conv.weight.detach().mean()) == pytest.approx(0.0, abs=expected_std * 0.01)
    for m in model.modules():
        if isinstance(m, (nn.Conv3d, nn.ConvTranspose3d)):
            assert torch.count_nonzero(m.bias) == 0
        if isinstance(m, nn.InstanceNorm3d):
            assert m.affine and m.eps == 1e-5 and not m.track_running_stats
        if isinstance(m, nn.LeakyReLU):
            assert m.negative_slope == 0.01 and m.inplace


# --- learning ------------------------------------------------------------------------------


def _loss(outs, target):
    weights = [0.5**i for i in range(len(outs))]
    loss = 0.0
    for w, o in zip(weights, outs):
        t = nn.functional.interpolate(target[:, None].float(), size=o.shape[2:], mode="nearest")[:, 0].long()
        loss = loss + w * nn.functional.cross_entropy(o, t)
    return loss


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("name", ["2.5d", "3d_cascade_fullres"])
def test_one_sgd_step_reduces_loss(arch, name):
    torch.manual_seed(1)
    spec = net_spec(HAND_MADE[name])
    model = build_network(arch, spec)
    spatial = tuple(2 * d for d in spec.divisor)
    x = torch.randn(2, spec.in_channels, *spatial)
    target = (x[:, :1] > 0.5).long()[:, 0] + (x[:, :1] > 1.5).long()[:, 0]
    opt = torch.optim.SGD(model.parameters(), lr=1e-2, momentum=0.0)
    before = _loss(model(x), target)
    opt.zero_grad()
    before.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
    opt.step()
    with torch.no_grad():
        after = _loss(model(x), target)
    assert float(after) < float(before.detach())


@pytest.mark.parametrize("arch", ARCHS)
def test_bf16_autocast_and_no_global_flags(arch):
    flags = (torch.get_default_dtype(), torch.are_deterministic_algorithms_enabled(), torch.backends.cudnn.benchmark,
             torch.get_num_threads(), torch.is_grad_enabled())
    spec = net_spec(HAND_MADE["3d_fullres"])
    model = build_network(arch, spec)
    x = torch.randn(1, 1, *(2 * d for d in spec.divisor))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        outs = model(x)
    sum(o.float().mean() for o in outs).backward()
    assert all(p.dtype == torch.float32 and p.grad is not None for p in model.parameters())
    assert (torch.get_default_dtype(), torch.are_deterministic_algorithms_enabled(), torch.backends.cudnn.benchmark,
            torch.get_num_threads(), torch.is_grad_enabled()) == flags
