"""The published networks (fixed-topology families): parameter counts from the papers'
layer lists, the analytic estimate, shapes, gradients, mixed pooling, SegNet unpooling,
the registry metadata and encoder weight loading."""

from __future__ import annotations

import math
import pickle
import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from autoliver.nets import (
    NetSpec,
    build_network,
    estimate_network,
    fixed_spec,
    input_divisor,
    load_encoder_weights,
    net_spec,
    register_network,
    registry,
)
from autoliver.nets.resnet import Bottleneck
from autoliver.nets.unet2d import MixedPool2d
from autoliver.train.loss import DeepSupervisionLoss
from planning.memory import parameter_count
from planning.plans import Configuration
from planning.topology import Topology

FAMILIES_2D = ("segnet_vgg16", "resunet2d", "mixpool_unet2d", "unet2d_classic", "resnet50_unet", "vgg16_unet", "fcn_r50", "deeplabv3plus_r101")
FAMILIES = ("dualpath3d", *FAMILIES_2D)
DIVISORS = {"dualpath3d": 1, "segnet_vgg16": 32, "resunet2d": 8, "mixpool_unet2d": 16, "unet2d_classic": 16,
            "resnet50_unet": 32, "vgg16_unet": 32, "fcn_r50": 32, "deeplabv3plus_r101": 16}
DEFAULT_BASE = {"dualpath3d": 30, **{f: 64 for f in FAMILIES_2D}}
TINY_BASE = {"dualpath3d": 3, **{f: 4 for f in FAMILIES_2D}}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def dims_of(arch: str) -> int:
    return 3 if arch == "dualpath3d" else 2


def spec(arch: str, in_channels: int = 1, n_classes: int = 3, deep_supervision: bool = True, **options) -> NetSpec:
    return fixed_spec(dims_of(arch), in_channels, n_classes, deep_supervision=deep_supervision, **options)


def on_meta(arch: str, s: NetSpec) -> nn.Module:
    """Built without allocating or initialising weights: enough to count parameters."""
    with torch.device("meta"):
        return build_network(arch, s)


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# --- independent parameter counts from the papers' layer lists -------------------------------


def conv(cin: int, cout: int, k: int, bias: bool, dims: int = 2) -> int:
    return cin * cout * k**dims + (cout if bias else 0)


def bn(c: int) -> int:
    return 2 * c


RESNET50, RESNET101 = (3, 4, 6, 3), (3, 4, 23, 3)
VGG16 = ((64, 64), (128, 128), (256, 256, 256), (512, 512, 512), (512, 512, 512))


def resnet_count(blocks, in_ch: int = 3, b: int = 64) -> int:
    total = conv(in_ch, b, 7, False) + bn(b)
    inplanes = b
    for i, n in enumerate(blocks):
        p = b * 2**i
        for j in range(n):
            cin = inplanes if j == 0 else 4 * p
            total += conv(cin, p, 1, False) + bn(p) + conv(p, p, 3, False) + bn(p) + conv(p, 4 * p, 1, False) + bn(4 * p)
            if j == 0:
                total += conv(cin, 4 * p, 1, False) + bn(4 * p)  # projection shortcut
        inplanes = 4 * p
    return total


def vgg_widths(b: int):
    return [[w * b // 64 for w in block] for block in VGG16]


def vgg_count(in_ch: int = 3, b: int = 64) -> int:
    total, cin = 0, in_ch
    for block in vgg_widths(b):
        for w in block:
            total += conv(cin, w, 3, True) + bn(w)
            cin = w
    return total


def segnet_count(in_ch, n, b):
    w = [block[-1] for block in vgg_widths(b)]
    decoder = [(w[4], w[4])] * 3 + [(w[3], w[3])] * 2 + [(w[3], w[2])] + [(w[2], w[2])] * 2 + [(w[2], w[1])]
    decoder += [(w[1], w[1]), (w[1], w[0]), (w[0], w[0])]
    return vgg_count(in_ch, b) + sum(conv(i, o, 3, True) + bn(o) for i, o in decoder) + conv(w[0], n, 3, True)


def plain_unet_count(in_ch, n, b, norm: bool, depth: int = 4):
    f = [b * 2**i for i in range(depth + 1)]
    block = (lambda i, o: conv(i, o, 3, False) + bn(o)) if norm else (lambda i, o: conv(i, o, 3, True))
    total = sum(block(in_ch if i == 0 else f[i - 1], f[i]) + block(f[i], f[i]) for i in range(depth + 1))
    for i in range(depth):
        total += f[i + 1] * f[i] * 4 + f[i] + block(2 * f[i], f[i]) + block(f[i], f[i])
    return total + conv(f[0], n, 1, True) + (depth if norm else 0)  # mixed pooling: one alpha per pool


def resunet_count(in_ch, n, b, depth: int = 3):
    f = [b * 2**i for i in range(depth + 1)]

    def block(cin, cout, first=False, stride=1):
        shortcut = conv(cin, cout, 1, False) + bn(cout) if cin != cout or stride != 1 else 0
        return (0 if first else bn(cin)) + conv(cin, cout, 3, False) + bn(cout) + conv(cout, cout, 3, False) + shortcut

    total = block(in_ch, f[0], first=True) + sum(block(f[i - 1], f[i], stride=2) for i in range(1, depth + 1))
    total += sum(block(f[i + 1] + f[i], f[i]) for i in range(depth))
    return total + conv(f[0], n, 1, True)


def skip_decoder_count(bottom, skips, widths, n):
    total, cin = 0, bottom
    for s, w in zip(skips, widths):
        total += conv(cin + s, w, 3, False) + bn(w) + conv(w, w, 3, False) + bn(w)
        cin = w
    return total + conv(cin, n, 1, True)


def resnet50_unet_count(in_ch, n, b):
    dec = [256 * b // 64, 128 * b // 64, b, b // 2, b // 4]
    return resnet_count(RESNET50, in_ch, b) + skip_decoder_count(32 * b, [16 * b, 8 * b, 4 * b, b, 0], dec, n)


def vgg16_unet_count(in_ch, n, b):
    dec = [256 * b // 64, 128 * b // 64, b, b // 2, b // 4]
    w = [block[-1] for block in vgg_widths(b)]
    return vgg_count(in_ch, b) + skip_decoder_count(w[4], w[::-1], dec, n)


def fcn_count(in_ch, n, b):
    return resnet_count(RESNET50, in_ch, b) + conv(8 * b, n, 1, True) + conv(16 * b, n, 1, True) + conv(32 * b, n, 1, True)


def deeplab_count(in_ch, n, b):
    a, low, c4 = 4 * b, 48 * b // 64, 32 * b
    aspp = conv(c4, a, 1, False) + bn(a) + 3 * (conv(c4, a, 3, False) + bn(a)) + conv(c4, a, 1, True) + conv(5 * a, a, 1, False) + bn(a)
    decoder = conv(4 * b, low, 1, False) + bn(low) + conv(a + low, a, 3, False) + bn(a) + conv(a, a, 3, False) + bn(a) + conv(a, n, 1, True)
    return resnet_count(RESNET101, in_ch, b) + aspp + decoder


def dualpath_count(in_ch, n, b):
    widths = [w * b // 30 for w in (30, 30, 40, 40, 40, 40, 50, 50)]
    fc = [150 * b // 30] * 2
    path = sum(conv(in_ch if i == 0 else widths[i - 1], w, 3, False, dims=3) + bn(w) for i, w in enumerate(widths))
    head = conv(2 * widths[-1], fc[0], 1, False, 3) + bn(fc[0]) + conv(fc[0], fc[1], 1, False, 3) + bn(fc[1]) + conv(fc[1], n, 1, True, 3)
    return 2 * path + head


PAPER_COUNTS = {
    "dualpath3d": dualpath_count,
    "segnet_vgg16": segnet_count,
    "resunet2d": resunet_count,
    "mixpool_unet2d": lambda i, n, b: plain_unet_count(i, n, b, norm=True),
    "unet2d_classic": lambda i, n, b: plain_unet_count(i, n, b, norm=False),
    "resnet50_unet": resnet50_unet_count,
    "vgg16_unet": vgg16_unet_count,
    "fcn_r50": fcn_count,
    "deeplabv3plus_r101": deeplab_count,
}


def test_backbone_counts_match_torchvision():
    """torchvision's resnet50 / resnet101 without fc, and vgg16_bn().features."""
    assert resnet_count(RESNET50) == 23_508_032
    assert resnet_count(RESNET101) == 42_500_160
    assert vgg_count() == 14_723_136
    for arch, expected in (("resnet50_unet", 23_508_032), ("fcn_r50", 23_508_032), ("deeplabv3plus_r101", 42_500_160),
                           ("vgg16_unet", 14_723_136), ("segnet_vgg16", 14_723_136)):
        assert n_params(on_meta(arch, spec(arch, in_channels=3)).encoder) == expected, arch


@pytest.mark.parametrize("arch", FAMILIES)
@pytest.mark.parametrize("base", ["default", "small"])
def test_parameters_match_paper_layer_list(arch, base):
    b = DEFAULT_BASE[arch] if base == "default" else DEFAULT_BASE[arch] // 4
    model = on_meta(arch, spec(arch, 1, 3, base_features=b))
    assert n_params(model) == PAPER_COUNTS[arch](1, 3, b)


def _count(model: nn.Module, kind) -> int:
    return sum(isinstance(m, kind) for m in model.modules())


def test_layer_structure():
    for arch in ("vgg16_unet", "segnet_vgg16"):
        enc = on_meta(arch, spec(arch)).encoder
        assert _count(enc, nn.Conv2d) == 13 and _count(enc, nn.MaxPool2d) == 5 and _count(enc, nn.BatchNorm2d) == 13
    segnet = on_meta("segnet_vgg16", spec("segnet_vgg16"))
    assert _count(segnet.decoder, nn.Conv2d) == 13 and _count(segnet.decoder, nn.MaxUnpool2d) == 5
    assert segnet.decoder[-1].convs[-1][0].out_channels == 3  # the last decoder conv gives the logits
    for arch, blocks in (("resnet50_unet", RESNET50), ("fcn_r50", RESNET50), ("deeplabv3plus_r101", RESNET101)):
        enc = on_meta(arch, spec(arch)).encoder
        assert tuple(_count(getattr(enc, f"layer{i}"), Bottleneck) for i in range(1, 5)) == blocks
        assert _count(enc, nn.Conv2d) == 1 + 3 * sum(blocks) + 4
        assert enc.conv1.kernel_size == (7, 7) and enc.conv1.stride == (2, 2)
    deeplab = on_meta("deeplabv3plus_r101", spec("deeplabv3plus_r101"))
    assert [b[0].dilation for b in deeplab.aspp.branches] == [(1, 1), (6, 6), (12, 12), (18, 18)]
    assert deeplab.encoder.layer4[0].conv2.stride == (1, 1) and deeplab.encoder.layer4[1].conv2.dilation == (2, 2)
    assert deeplab.aspp.project[0][0].out_channels == 256 and deeplab.low_level[0].out_channels == 48
    dual = on_meta("dualpath3d", spec("dualpath3d"))
    convs3 = [m for m in (*dual.normal.modules(), *dual.context.modules()) if isinstance(m, nn.Conv3d)]
    assert len(convs3) == 16 and all(m.kernel_size == (3, 3, 3) for m in convs3)
    assert [m.out_channels for m in dual.normal.modules() if isinstance(m, nn.Conv3d)] == [30, 30, 40, 40, 40, 40, 50, 50]
    assert [m[0].out_channels for m in dual.fc] == [150, 150] and dual.factor == (3, 3, 3)
    classic = on_meta("unet2d_classic", spec("unet2d_classic"))
    assert [stage[0][0].out_channels for stage in classic.encoder] == [64, 128, 256, 512, 1024]
    assert _count(classic, nn.BatchNorm2d) == 0 and _count(classic, nn.ConvTranspose2d) == 4


# --- the analytic estimate -----------------------------------------------------------------


@pytest.mark.parametrize("arch", FAMILIES)
def test_estimate_parameters_equal_built(arch):
    d = DIVISORS[arch]
    for in_ch, n, b in ((1, 3, DEFAULT_BASE[arch]), (2, 2, TINY_BASE[arch]), (5, 4, 2 * TINY_BASE[arch]), (3, 3, 48)):
        s = spec(arch, in_ch, n, base_features=b)
        patch = (2 * d,) * dims_of(arch) if arch != "dualpath3d" else (10, 14, 9)
        assert estimate_network(arch, s, patch).parameters == n_params(on_meta(arch, s)), (arch, in_ch, n, b)


def test_estimate_with_family_options():
    cases = [
        ("dualpath3d", dict(path_features=(4, 4, 6, 6, 6, 6, 8, 8), fc_features=(12, 10), pool_factor=(1, 3, 3))),
        ("deeplabv3plus_r101", dict(base_features=8, aspp_features=24, low_level_features=6, aspp_rates=(2, 4))),
        ("resnet50_unet", dict(base_features=8, decoder_features=(20, 10, 8, 6, 4))),
        ("resunet2d", dict(base_features=6, depth=4)),
        ("mixpool_unet2d", dict(base_features=6, depth=2, dropout=0.0)),
    ]
    for arch, options in cases:
        s = spec(arch, 2, 3, **options)
        patch = (3, 9, 9) if arch == "dualpath3d" else (64, 64)
        assert estimate_network(arch, s, patch).parameters == n_params(on_meta(arch, s)), arch


def test_existing_families_estimates():
    t = Topology((16, 32, 32), ((1, 1, 1), (2, 2, 2), (2, 2, 2)), ((1, 3, 3), (3, 3, 3), (3, 3, 3)), (4, 8, 16))
    s = NetSpec(3, 2, 3, t.features_per_stage, t.kernel_sizes, t.strides)
    assert input_divisor("unet", s) == s.divisor == (4, 4, 4)
    assert estimate_network("unet", s, t.patch_size).parameters == parameter_count(t, 2, 3) == n_params(build_network("unet", s))
    for blocks in (None, (2, 1, 3)):
        r = NetSpec(3, 2, 3, t.features_per_stage, t.kernel_sizes, t.strides, blocks_per_stage=blocks)
        assert estimate_network("resenc", r, t.patch_size).parameters == n_params(build_network("resenc", r))
    with pytest.raises(ValueError, match="multiple of"):
        estimate_network("unet", s, (16, 32, 30))


def test_estimate_scales_with_patch():
    s = spec("resnet50_unet", base_features=8)
    small, large = (estimate_network("resnet50_unet", s, p) for p in ((64, 64), (128, 128)))
    assert small.parameters == large.parameters
    assert large.activation_bytes_per_sample == pytest.approx(4 * small.activation_bytes_per_sample, rel=0.01)


def saved_tensor_bytes(model: nn.Module, x: torch.Tensor):
    """Forward pass, and the bytes of the distinct non-parameter tensors autograd saved."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        s = t.untyped_storage()
        if s.data_ptr() not in params:
            storages[s.data_ptr()] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = model(x)
    return out, sum(storages.values())


# --- forward, outputs, gradients -------------------------------------------------------------


@pytest.mark.parametrize("arch", FAMILIES)
def test_forward_shapes_gradients_and_memory(arch):
    torch.manual_seed(0)
    dims, d = dims_of(arch), DIVISORS[arch]
    s = spec(arch, 2, 3, base_features=TINY_BASE[arch])
    assert input_divisor(arch, s) == (d,) * dims
    model = build_network(arch, s)
    spatial = (7, 10, 11) if arch == "dualpath3d" else (2 * max(d, 16), 3 * max(d, 16))
    assert all(n % d == 0 for n in spatial)
    x = torch.randn(2, 2, *spatial)
    outs, saved = saved_tensor_bytes(model, x)
    assert isinstance(outs, list) and len(outs) == 1 and outs[0].shape == (2, 3, *spatial)
    target = torch.randint(0, 3, (2, 1, *spatial))
    loss = DeepSupervisionLoss(1)(outs, target)  # the training loss takes the one-element list
    loss.backward()
    first = next(m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Conv3d)))
    assert first.in_channels == 2 and first.weight.grad is not None and float(first.weight.grad.abs().sum()) > 0
    assert all(p.grad is not None for p in model.parameters())  # every parameter is used (DDP needs it)
    # the estimate's activations (input and loss tensors aside) match what autograd kept
    est = estimate_network(arch, s, spatial).activation_bytes_per_sample
    loss_tensors = 4 * 3 * 3 * math.prod(spatial)  # fp32 logits, probabilities, log-probabilities
    assert est - loss_tensors == pytest.approx(saved / 2, rel=0.1)
    model.eval()
    model.deep_supervision = False  # what the trainer and predictor set
    with torch.no_grad():
        single = model(x[:1])
    assert isinstance(single, torch.Tensor) and single.shape == (1, 3, *spatial)
    no_ds = build_network(arch, spec(arch, 2, 3, deep_supervision=False, base_features=TINY_BASE[arch]))
    assert isinstance(no_ds(x), torch.Tensor)
    if d > 1:
        with pytest.raises(ValueError, match="multiple of the total stride"):
            model(torch.randn(1, 2, *(n + d // 2 for n in spatial)))
    with pytest.raises(ValueError, match="expected input"):
        model(torch.randn(1, 3, *spatial))


def test_dualpath_context_alignment():
    """Pad, average-pool, upsample and crop line each coarse voxel up with the fine voxels it
    summarises: a linear ramp comes back exactly between the first and last coarse centres."""
    model = build_network("dualpath3d", spec("dualpath3d", 1, 2, deep_supervision=False, base_features=3, pool_factor=(1, 3, 2))).eval()
    model.context, model.fc, model.classifier = nn.Identity(), nn.Identity(), nn.Identity()  # expose the resampled input
    shape = (5, 9, 8)
    exact = {0: slice(None), 1: slice(1, 8), 2: slice(1, 7)}  # between the coarse centres (factor 1: everywhere)
    for axis in range(3):
        ramp = torch.arange(shape[axis], dtype=torch.float32).reshape([-1 if a == axis else 1 for a in range(3)]).expand(shape)
        with torch.no_grad():
            context = model(ramp[None, None].contiguous())[0, -1]
        assert context.shape == shape
        index = [slice(None)] * 3
        index[axis] = exact[axis]
        torch.testing.assert_close(context[tuple(index)], ramp[tuple(index)])
    with torch.no_grad():
        assert model(torch.randn(1, 1, 4, 7, 5)).shape[2:] == (4, 7, 5)  # sizes that are not multiples: padded, cropped


def test_wrong_dims_and_unknown_options():
    with pytest.raises(ValueError, match="2-D, the spec is 3-D"):
        build_network("segnet_vgg16", fixed_spec(3, 1, 3))
    with pytest.raises(ValueError, match="3-D, the spec is 2-D"):
        build_network("dualpath3d", fixed_spec(2, 1, 3))
    with pytest.raises(ValueError, match="unknown option.*base_featurs"):
        build_network("resunet2d", spec("resunet2d", base_featurs=8))
    with pytest.raises(ValueError, match="base_features must be a positive integer"):
        estimate_network("fcn_r50", spec("fcn_r50", base_features=0), (32, 32))
    with pytest.raises(ValueError, match="pool_factor"):
        build_network("dualpath3d", spec("dualpath3d", pool_factor=(3, 3)))
    assert input_divisor("resunet2d", spec("resunet2d", depth=5)) == (32, 32)
    assert input_divisor("mixpool_unet2d", spec("mixpool_unet2d", depth=2)) == (4, 4)


# --- mixed pooling, SegNet unpooling -----------------------------------------------------------


def test_mixed_pooling_alpha_is_learned():
    pool = MixedPool2d(2)
    x = torch.randn(2, 3, 8, 8)
    assert float(pool.alpha.detach()) == 0.5
    torch.testing.assert_close(pool(x), 0.5 * F.max_pool2d(x, 2) + 0.5 * F.avg_pool2d(x, 2))
    with torch.no_grad():
        pool.alpha_logit.fill_(30.0)
    torch.testing.assert_close(pool(x), F.max_pool2d(x, 2))
    with torch.no_grad():
        pool.alpha_logit.fill_(-30.0)
    torch.testing.assert_close(pool(x), F.avg_pool2d(x, 2))

    torch.manual_seed(0)
    model = build_network("mixpool_unet2d", spec("mixpool_unet2d", 1, 2, deep_supervision=False, base_features=4))
    pools = [m for m in model.modules() if isinstance(m, MixedPool2d)]
    assert len(pools) == 4 and all(any(p is q for q in model.parameters()) for p in (m.alpha_logit for m in pools))
    before = [float(m.alpha.detach()) for m in pools]
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    x = torch.randn(2, 1, 32, 32)
    F.cross_entropy(model(x), (x[:, 0] > 0.3).long()).backward()
    assert all(m.alpha_logit.grad is not None and float(m.alpha_logit.grad) != 0 for m in pools)
    opt.step()
    assert all(float(m.alpha.detach()) != b for m, b in zip(pools, before))


def test_segnet_unpools_to_the_encoder_argmax():
    torch.manual_seed(0)
    model = build_network("segnet_vgg16", spec("segnet_vgg16", 1, 3, deep_supervision=False, base_features=4)).eval()
    pools = [m for m in model.encoder.features if isinstance(m, nn.MaxPool2d)]
    seen = {}
    pools[-1].register_forward_hook(lambda m, i, o: seen.update(pre=i[0].clone(), pooled=o[0].clone(), idx=o[1]))
    model.decoder[0].unpool.register_forward_hook(lambda m, i, o: seen.update(unpooled=o.clone()))
    with torch.no_grad():
        model(torch.randn(2, 1, 64, 64))
    pre, pooled, idx, unpooled = seen["pre"], seen["pooled"], seen["idx"], seen["unpooled"]
    assert unpooled.shape == pre.shape
    flat_idx = idx.flatten(2)
    torch.testing.assert_close(pre.flatten(2).gather(2, flat_idx), pooled.flatten(2), rtol=0, atol=0)  # idx: the encoder's argmax
    torch.testing.assert_close(unpooled.flatten(2).gather(2, flat_idx), pooled.flatten(2), rtol=0, atol=0)  # values go back there
    elsewhere = torch.ones_like(unpooled, dtype=torch.bool).flatten(2).scatter_(2, flat_idx, False)
    assert not unpooled.flatten(2)[elsewhere].any()  # and nowhere else


# --- NetSpec options and the registry ----------------------------------------------------------


def test_netspec_options():
    base = dict(dims=2, in_channels=1, n_classes=3, features_per_stage=(4, 8), kernel_sizes=((3, 3),) * 2, strides=((1, 1), (2, 2)))
    plain = NetSpec(**base)
    assert plain.options == () and plain.option("base_features", 64) == 64
    s = NetSpec(**base, options={"fc_features": [10, 12], "base_features": 8})
    assert s.options == (("base_features", 8), ("fc_features", (10, 12)))
    assert s.option("fc_features") == (10, 12) and hash(s) == hash(NetSpec(**base, options=(("fc_features", (10, 12)), ("base_features", 8))))
    assert s.with_options(base_features=16).option("base_features") == 16 and s.option("base_features") == 8
    with pytest.raises(ValueError, match="given twice"):
        NetSpec(**base, options=(("a", 1), ("a", 2)))
    with pytest.raises(ValueError, match="pairs"):
        NetSpec(**base, options=(("", 1),))
    config = Configuration(
        name="2d", network_dims=2, data_identifier="fullres", spacing=(1.0, 1.0, 1.0), median_shape=(64, 64, 64), patch_size=(64, 64),
        batch_size=2, n_stages=2, features_per_stage=(4, 8), kernel_sizes=((3, 3),) * 2, strides=((1, 1), (2, 2)),
        network_options={"base_features": 8, "depth": 2},
    )
    assert net_spec(config).options == (("base_features", 8), ("depth", 2))
    assert net_spec(config, options={"depth": 3}).option("depth") == 3


def test_registry_metadata(monkeypatch):
    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))

    @register_network("tiny2d", divisor=4)
    def tiny(s: NetSpec) -> nn.Module:
        return nn.Conv2d(s.in_channels, s.n_classes, 1)

    s = spec("fcn_r50")
    assert input_divisor("tiny2d", s) == (4, 4)
    with pytest.raises(ValueError, match="no analytic estimate"):
        estimate_network("tiny2d", s, (8, 8))
    with pytest.raises(ValueError, match="multiple of"):
        estimate_network("fcn_r50", s, (48, 64))
    with pytest.raises(ValueError, match="unknown network architecture"):
        input_divisor("vnet", s)


# --- encoder weights -----------------------------------------------------------------------------


def _perturbed(arch: str, in_channels: int = 1, **options) -> nn.Module:
    torch.manual_seed(3)
    model = build_network(arch, spec(arch, in_channels, 3, **options))
    with torch.no_grad():
        for t in model.state_dict().values():
            if t.is_floating_point():
                t.add_(torch.randn_like(t))
    return model


def _assert_same(a: nn.Module, b: nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        torch.testing.assert_close(sa[k], sb[k], rtol=0, atol=0, msg=k)


@pytest.mark.parametrize("arch", ["resnet50_unet", "segnet_vgg16"])
def test_encoder_weights_round_trip(tmp_path, arch):
    source = _perturbed(arch, base_features=4)
    path = tmp_path / "encoder.pt"
    torch.save(source.encoder.state_dict(), path)
    fresh = build_network(arch, spec(arch, 1, 3, base_features=4))
    decoder_before = {k: v.clone() for k, v in fresh.decoder.state_dict().items()}
    report = load_encoder_weights(fresh, path)
    _assert_same(source.encoder, fresh.encoder)
    for k, v in fresh.decoder.state_dict().items():
        assert torch.equal(v, decoder_before[k])  # only the encoder is loaded
    assert report.prefix == "" and len(report.loaded) == len(source.encoder.state_dict())

    # a whole model's state dict, wrapped like an autoliver checkpoint: "encoder." prefix
    torch.save({"weights": source.state_dict(), "epoch": 3}, path)
    fresh = build_network(arch, spec(arch, 1, 3, base_features=4))
    report = load_encoder_weights(fresh, path)
    _assert_same(source.encoder, fresh.encoder)
    assert report.prefix == "encoder." and all(k.startswith("decoder.") for k in report.ignored)


def test_torchvision_names_and_first_conv_adaptation(tmp_path):
    rgb = _perturbed("fcn_r50", in_channels=3, base_features=4)
    state = dict(rgb.encoder.state_dict())
    assert {"conv1.weight", "bn1.running_var", "layer1.0.conv1.weight", "layer1.0.downsample.0.weight", "layer1.0.downsample.1.bias",
            "layer4.2.bn3.weight"} <= state.keys()
    state = {k: v for k, v in state.items() if not k.endswith("num_batches_tracked")}  # older torchvision files lack them
    state["fc.weight"], state["fc.bias"] = torch.zeros(10, 128), torch.zeros(10)  # the ImageNet classifier
    torch.save(state, tmp_path / "resnet50.pth")
    ct = build_network("resnet50_unet", spec("resnet50_unet", 1, 3, base_features=4))
    report = load_encoder_weights(ct, tmp_path / "resnet50.pth")
    assert report.adapted == "conv1.weight" and set(report.ignored) == {"fc.weight", "fc.bias"}
    torch.testing.assert_close(ct.encoder.conv1.weight, rgb.encoder.conv1.weight.sum(1, keepdim=True))
    torch.testing.assert_close(ct.encoder.layer3[1].conv2.weight, rgb.encoder.layer3[1].conv2.weight, rtol=0, atol=0)

    vgg = _perturbed("vgg16_unet", in_channels=3, base_features=4)
    state = dict(vgg.encoder.state_dict(), **{"classifier.0.weight": torch.zeros(4, 4)})
    assert "features.0.weight" in state and "features.41.running_mean" in state  # torchvision vgg16_bn indices
    torch.save(state, tmp_path / "vgg16_bn.pth")
    seg = build_network("segnet_vgg16", spec("segnet_vgg16", 3, 2, base_features=4))
    load_encoder_weights(seg, tmp_path / "vgg16_bn.pth")
    _assert_same(vgg.encoder, seg.encoder)


def test_encoder_weights_safetensors(tmp_path, monkeypatch):
    source = _perturbed("deeplabv3plus_r101", base_features=4)
    path = tmp_path / "encoder.safetensors"
    path.write_bytes(b"not read")
    monkeypatch.setitem(sys.modules, "safetensors", None)
    monkeypatch.setitem(sys.modules, "safetensors.torch", None)
    with pytest.raises(ImportError, match="pip install safetensors"):
        load_encoder_weights(build_network("deeplabv3plus_r101", spec("deeplabv3plus_r101", base_features=4)), path)
    monkeypatch.undo()
    safetensors_torch = pytest.importorskip("safetensors.torch")
    safetensors_torch.save_file({f"backbone.{k}": v.contiguous() for k, v in source.encoder.state_dict().items()}, str(path))
    fresh = build_network("deeplabv3plus_r101", spec("deeplabv3plus_r101", base_features=4))
    assert load_encoder_weights(fresh, path).prefix == "backbone."
    _assert_same(source.encoder, fresh.encoder)


class _Payload:
    """Unpickling this creates a file: what a malicious weight file would do."""

    def __init__(self, target: str) -> None:
        self.target = target

    def __reduce__(self):
        return (open, (self.target, "w"))


def test_malicious_pickle_is_refused(tmp_path):
    model = build_network("fcn_r50", spec("fcn_r50", base_features=4))
    proof = tmp_path / "proof"
    pickle.loads(pickle.dumps(_Payload(str(proof)))).close()
    assert proof.exists()  # the payload is live when unpickled
    marker = tmp_path / "pwned"
    state = dict(model.encoder.state_dict(), evil=_Payload(str(marker)))
    for name, write in (("evil.pt", lambda p: torch.save(state, p)), ("evil.pkl", lambda p: p.write_bytes(pickle.dumps(state, protocol=2)))):
        path = tmp_path / name
        write(path)
        with pytest.raises(ValueError, match=f"{name}.*weights_only"):
            load_encoder_weights(model, path)
        assert not marker.exists()


def test_encoder_weights_mismatches_name_the_file(tmp_path):
    model = build_network("resnet50_unet", spec("resnet50_unet", base_features=4))
    wider = build_network("resnet50_unet", spec("resnet50_unet", base_features=8)).encoder.state_dict()
    path = tmp_path / "wider.pt"
    torch.save(wider, path)
    with pytest.raises(ValueError, match=r"wider\.pt.*shape mismatch.*conv1\.weight \(8, 1, 7, 7\) vs \(4, 1, 7, 7\)"):
        load_encoder_weights(model, path)
    state = dict(model.encoder.state_dict())
    del state["layer2.0.bn2.running_var"]
    state["layer9.weight"] = torch.zeros(1)
    torch.save(state, tmp_path / "odd.pt")
    with pytest.raises(ValueError, match=r"odd\.pt.*unexpected key.*layer9\.weight.*missing key.*layer2\.0\.bn2\.running_var"):
        load_encoder_weights(model, tmp_path / "odd.pt")
    torch.save([torch.zeros(1)], tmp_path / "list.pt")
    with pytest.raises(ValueError, match=r"list\.pt.*state dict"):
        load_encoder_weights(model, tmp_path / "list.pt")
    with pytest.raises(FileNotFoundError):
        load_encoder_weights(model, tmp_path / "absent.pt")
