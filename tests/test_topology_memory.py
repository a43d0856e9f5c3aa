"""U-Net topology rules and the analytic training-memory model."""

from __future__ import annotations

import math
import subprocess
import sys

import pytest

from planning.memory import (
    CPU_FP32,
    GIB,
    GPU_AMP,
    activation_elements,
    max_batch_size,
    memory_breakdown,
    parameter_count,
    training_memory_bytes,
)
from planning.topology import compute_topology, shrink_axis

CASES = [
    ((128, 128, 128), (1.0, 0.768, 0.768)),
    ((40, 192, 160), (5.0, 0.8, 0.8)),
    ((100, 130, 70), (1.5, 1.0, 1.2)),
    ((20, 512, 512), (3.0, 0.7, 0.7)),
    ((7, 33, 9), (1.0, 1.0, 1.0)),
    ((512, 512), (0.768, 0.768)),
    ((300, 97), (1.0, 2.5)),
]


@pytest.mark.parametrize("patch,spacing", CASES)
def test_topology_invariants(patch, spacing):
    t = compute_topology(patch, spacing)
    dims = len(patch)
    assert all(p % d == 0 for p, d in zip(t.patch_size, t.divisor))
    assert all(p >= q for p, q in zip(t.patch_size, patch))  # rounded up, never down
    assert all(p - q < d for p, q, d in zip(t.patch_size, patch, t.divisor))
    assert t.strides[0] == (1,) * dims
    assert len(t.kernel_sizes) == len(t.features_per_stage) == t.n_stages
    bottleneck = t.stage_shapes()[-1]
    for a in range(dims):
        if t.divisor[a] > 1:
            assert bottleneck[a] >= 4
    cap = 320 if dims == 3 else 512
    assert t.features_per_stage == tuple(min(32 * 2**i, cap) for i in range(t.n_stages))
    assert max(math.log2(d) for d in t.divisor) <= (5 if dims == 3 else 6)


def test_lits_topology_is_nnunets():
    t = compute_topology((128, 128, 128), (1.0, 0.768, 0.768))
    assert t.patch_size == (128, 128, 128)
    assert t.n_stages == 6
    assert t.strides == ((1, 1, 1),) + ((2, 2, 2),) * 5
    assert t.kernel_sizes == ((3, 3, 3),) * 6
    assert t.features_per_stage == (32, 64, 128, 256, 320, 320)


def test_anisotropic_spacing_does_not_pool_z_first():
    t = compute_topology((32, 256, 256), (5.0, 0.8, 0.8))
    # in-plane spacing 0.8 -> 1.6 -> 3.2: z (5 mm) is pooled only from the third pooling on
    assert [s[0] for s in t.strides[:3]] == [1, 1, 1]
    assert all(s[1:] == (2, 2) for s in t.strides[1:])
    assert t.kernel_sizes[0] == (1, 3, 3) and t.kernel_sizes[1] == (1, 3, 3)
    assert t.kernel_sizes[-1] == (3, 3, 3)
    assert t.divisor[0] < t.divisor[1]


def test_shrink_axis_does_not_skip_valid_sizes():
    t = compute_topology((256, 256), (1.0, 1.0))
    assert t.divisor == (64, 64)
    smaller = shrink_axis(t.patch_size, 0, (1.0, 1.0))
    assert smaller.patch_size == (224, 256)  # 224 = 7 x 32, not 192


def test_bad_arguments():
    with pytest.raises(ValueError):
        compute_topology((64, 64, 64), (1.0, 1.0))
    with pytest.raises(ValueError):
        compute_topology((64, 0, 64), (1.0, 1.0, 1.0))
    with pytest.raises(ValueError):
        training_memory_bytes(compute_topology((64, 64, 64), (1, 1, 1)), 0)


def test_memory_monotone_in_patch_and_batch():
    spacing = (1.0, 0.8, 0.8)
    prev = 0.0
    for edge in (32, 48, 64, 96, 128, 160, 192):
        t = compute_topology((edge, edge, edge), spacing)
        m = [training_memory_bytes(t, b) for b in (1, 2, 3, 4)]
        assert m == sorted(m) and len(set(m)) == 4
        assert m[1] > prev
        prev = m[1]
    for model in (GPU_AMP, CPU_FP32):
        t = compute_topology((96, 96, 96), spacing)
        budget = training_memory_bytes(t, 3, model=model)
        assert max_batch_size(t, budget, model=model) == 3
        assert max_batch_size(t, budget - 1, model=model) == 2


def test_breakdown_adds_up_and_fp32_costs_more():
    t = compute_topology((128, 128, 128), (1.0, 0.768, 0.768))
    b = memory_breakdown(t, 2)
    assert b["total"] == pytest.approx(sum(v for k, v in b.items() if k != "total"))
    assert memory_breakdown(t, 2, model=CPU_FP32)["activations"] == pytest.approx(2 * b["activations"])


def test_nnunet_lits_config_estimate_is_plausible():
    """nnU-Net's 128³ x batch 2 network trains in roughly 7-9 GB with AMP."""
    t = compute_topology((128, 128, 128), (1.0, 0.768, 0.768))
    assert 6.5 * GIB < training_memory_bytes(t, 2) < 9.0 * GIB
    # the activations alone: ~0.9 G elements per sample at 2 bytes
    assert 0.8e9 < activation_elements(t) < 1.0e9


def _torch_unet(topology, in_channels, n_classes):
    torch = pytest.importorskip("torch")
    nn = torch.nn
    dims = topology.dims
    conv = nn.Conv3d if dims == 3 else nn.Conv2d
    tconv = nn.ConvTranspose3d if dims == 3 else nn.ConvTranspose2d
    norm = nn.InstanceNorm3d if dims == 3 else nn.InstanceNorm2d

    def block(cin, cout, k, stride):
        return nn.Sequential(conv(cin, cout, k, stride, padding=[x // 2 for x in k]), norm(cout, affine=True), nn.LeakyReLU(0.01, inplace=True))

    f, ks, st = topology.features_per_stage, topology.kernel_sizes, topology.strides

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.enc = nn.ModuleList()
            prev = in_channels
            for i in range(topology.n_stages):
                self.enc.append(nn.Sequential(block(prev, f[i], ks[i], st[i]), block(f[i], f[i], ks[i], 1)))
                prev = f[i]
            self.up, self.dec, self.heads = nn.ModuleList(), nn.ModuleList(), nn.ModuleList()
            for i in range(topology.n_stages - 2, -1, -1):
                self.up.append(tconv(f[i + 1], f[i], st[i + 1], st[i + 1]))
                self.dec.append(nn.Sequential(block(2 * f[i], f[i], ks[i], 1), block(f[i], f[i], ks[i], 1)))
                self.heads.append(conv(f[i], n_classes, 1))

        def forward(self, x):
            skips = []
            for e in self.enc:
                x = e(x)
                skips.append(x)
            outs = []
            for j, (u, d, h) in enumerate(zip(self.up, self.dec, self.heads)):
                x = d(torch.cat([u(x), skips[-(j + 2)]], 1))
                outs.append(h(x))
            return outs

    return torch, Net()


@pytest.mark.parametrize("patch,spacing", [((16, 32, 32), (2.0, 1.0, 1.0)), ((64, 48), (1.0, 1.0))])
def test_analytic_counts_match_torch(patch, spacing):
    """Parameter count exactly, and saved-for-backward bytes (measured with autograd's
    saved-tensor hooks on CPU, fp32) against ``activation_elements``."""
    t = compute_topology(patch, spacing, max_pools=3)
    in_ch, n_cls, batch = 2, 3, 2
    torch, net = _torch_unet(t, in_ch, n_cls)
    assert sum(p.numel() for p in net.parameters()) == parameter_count(t, in_ch, n_cls)
    param_ptrs = {p.untyped_storage().data_ptr() for p in net.parameters()}
    saved = {}

    def pack(x):
        s = x.untyped_storage()
        if s.data_ptr() not in param_ptrs:
            saved[s.data_ptr()] = s.nbytes()
        return x

    x = torch.randn(batch, in_ch, *t.patch_size)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x):
        outs = net(x)
        loss = sum((torch.softmax(o, 1) * o).sum() + torch.log_softmax(o, 1).mean() for o in outs)
    loss.backward()
    measured = sum(saved.values()) / 4 / batch
    assert measured == pytest.approx(activation_elements(t, in_ch, n_cls), rel=0.02)


def test_planning_imports_without_torch():
    code = (
        "import sys; sys.modules['torch'] = None\n"
        "import planning.topology, planning.memory, planning.planner, planning.fingerprint, planning.table\n"
        "assert 'torch' not in [m for m in sys.modules if sys.modules[m] is not None]\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
