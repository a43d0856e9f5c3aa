"""Experiment planner: nnU-Net v2's LiTS plan as the reference, rules and invariants."""

from __future__ import annotations

import json
import math

import pytest

from autoliver.core.errors import PlanError
from planning.planner import plan_experiment, slices_for_25d
from planning.plans import Plans
from planning.table import plans_table

PCTS = (5, 10, 50, 90, 95)


def make_fingerprint(spacing, shape, n_cases, p10=None, name="Dataset003_Liver") -> dict:
    """A reduced fingerprint with the keys the planner reads (no per-case entries)."""
    pct = {str(p): list(spacing) for p in PCTS}
    if p10 is not None:
        pct["10"] = [p10, spacing[1], spacing[2]]
        pct["5"] = [p10, spacing[1], spacing[2]]
    return {
        "schema_version": 1,
        "dataset_name": name,
        "input_hash": "x",
        "n_cases": n_cases,
        "labels": {"background": 0, "liver": 1, "tumour": 2},
        "spacing": {"median": list(spacing), "percentiles": pct},
        "shape_after_crop": {"median": list(shape), "percentiles": {str(p): list(shape) for p in PCTS}},
        "intensity": {
            "foreground": {"mean": 99.4, "std": 39.4, "median": 101.0, "min": -1024.0, "max": 3071.0,
                           "percentile_00_5": -17.0, "percentile_99_5": 201.0, "n_samples": 1000},
            "per_class": {},
        },
    }


LITS = make_fingerprint((1.0, 0.768, 0.768), (482, 512, 512), 131)


@pytest.fixture(scope="module")
def lits_plans() -> Plans:
    return plan_experiment(LITS, memory_gb=8.0)


def test_lits_matches_nnunet_v2(lits_plans):
    """nnU-Net v2 (8 GB target) plans for LiTS: 3d_fullres 128³ batch 2 at 1.0/0.768/0.768 mm,
    6 stages 32..320; 2d 512² batch 12; 3d_lowres at ~2.47/1.90/1.90 mm."""
    c = lits_plans.configurations
    full = c["3d_fullres"]
    assert full.spacing == pytest.approx((1.0, 0.768, 0.768))
    assert 0.5 <= math.prod(full.patch_size) / 128**3 <= 2.0
    assert full.batch_size == 2
    assert full.n_stages == 6
    assert full.features_per_stage == (32, 64, 128, 256, 320, 320)
    assert full.estimated_memory_gb <= 8.0

    two = c["2d"]
    assert two.network_dims == 2 and two.data_identifier == "fullres"
    assert 0.5 <= math.prod(two.patch_size) / 512**2 <= 2.0
    assert 9 <= two.batch_size <= 16
    assert max(two.features_per_stage) == 512

    assert "3d_lowres" in c and "3d_cascade_fullres" in c
    low = c["3d_lowres"]
    assert low.data_identifier == "lowres"
    assert low.spacing == pytest.approx((2.47, 1.90, 1.90), rel=0.1)
    assert 0.5 <= math.prod(low.patch_size) / 128**3 <= 2.0
    assert low.batch_size == 2
    casc = c["3d_cascade_fullres"]
    assert casc.previous_stage == "3d_lowres" and casc.patch_size == full.patch_size
    assert lits_plans.data_spacings == {"fullres": full.spacing, "lowres": low.spacing}


def test_2d_configs_share_fullres_data(lits_plans):
    c = lits_plans.configurations
    for name in ("2d", "2.5d", "3d_fullres", "3d_cascade_fullres"):
        assert c[name].data_identifier == "fullres"
        assert c[name].spacing == c["3d_fullres"].spacing
    assert c["2.5d"].in_slices in (5, 7) and c["2.5d"].in_slices % 2 == 1
    assert c["2d"].in_slices == 1


def test_normalisation_from_foreground(lits_plans):
    n = lits_plans.normalisation
    assert (n.scheme, n.clip_low, n.clip_high, n.mean, n.std) == ("ct", -17.0, 201.0, 99.4, 39.4)


def test_small_dataset_has_no_lowres():
    plans = plan_experiment(make_fingerprint((1.0, 1.0, 1.0), (128, 128, 128), 4), memory_gb=8.0)
    assert set(plans.configurations) == {"2d", "2.5d", "3d_fullres"}
    full = plans.configurations["3d_fullres"]
    assert full.patch_size == (128, 128, 128)
    # 5% cap: 4 cases x 128² slices x 128 -> at most round(0.05 * 4 * 128) = 26 slices per batch
    assert plans.configurations["2d"].batch_size <= 26
    assert "lowres" not in plans.data_spacings


def test_anisotropic_dataset():
    fp = make_fingerprint((5.0, 0.8, 0.8), (60, 512, 512), 30, p10=3.0)
    plans = plan_experiment(fp, memory_gb=8.0)
    full = plans.configurations["3d_fullres"]
    # thick slices and few of them: z takes the 10th percentile of the slice spacings
    assert full.spacing == pytest.approx((3.0, 0.8, 0.8))
    assert full.median_shape == (100, 512, 512)
    assert plans.configurations["2.5d"].in_slices == 3
    assert full.strides[1][0] == 1 and full.kernel_sizes[0][0] == 1
    assert all(p % math.prod(s[a] for s in full.strides) == 0 for a, p in enumerate(full.patch_size))
    # not anisotropic enough in voxels: median stays
    fp2 = make_fingerprint((5.0, 0.8, 0.8), (200, 512, 512), 30, p10=3.0)
    assert plan_experiment(fp2).configurations["3d_fullres"].spacing == pytest.approx((5.0, 0.8, 0.8))


def test_slices_for_25d():
    assert [slices_for_25d(s) for s in (0.5, 0.8, 1.0, 1.5, 2.0, 3.0, 5.0)] == [7, 7, 5, 3, 3, 3, 3]


def test_more_memory_never_gives_smaller_patches():
    prev = None
    for gb in (5, 6, 7, 8, 10, 12, 16, 24, 40):
        plans = plan_experiment(LITS, memory_gb=gb)
        cur = {n: (c.patch_size, c.batch_size, c.estimated_memory_gb) for n, c in plans.configurations.items()}
        for n, (patch, batch, est) in cur.items():
            assert est <= gb
            if prev is not None and n in prev:
                p_patch, p_batch, _ = prev[n]
                assert all(a >= b for a, b in zip(patch, p_patch)), (gb, n, patch, p_patch)
                if patch == p_patch:
                    assert batch >= p_batch
        prev = cur


def test_cpu_plan():
    plans = plan_experiment(LITS, device="cpu", cpu_ram_gb=24)
    assert plans.device == "cpu" and plans.memory_budget_gb == pytest.approx(12.0)
    for c in plans.configurations.values():
        assert c.extra["memory_model"] == "cpu_fp32"
        assert math.prod(c.patch_size) <= (64**3 if c.network_dims == 3 else 256**2)
        assert c.estimated_memory_gb <= 12.0
    with pytest.raises(ValueError, match="cpu_ram_gb"):
        plan_experiment(LITS, device="cpu")
    with pytest.raises(ValueError):
        plan_experiment(LITS, device="tpu")


def test_impossible_budget_is_a_plan_error():
    with pytest.raises(PlanError, match="memory budget"):
        plan_experiment(LITS, memory_gb=0.5)


def test_plans_round_trip(lits_plans, tmp_path):
    d = lits_plans.to_json()
    path = tmp_path / "plans.json"
    path.write_text(json.dumps(d))
    back = Plans.load(path)
    assert back == lits_plans
    assert back.plans_hash == lits_plans.plans_hash


def test_plans_table(lits_plans):
    text = plans_table(lits_plans)
    lines = text.splitlines()
    assert len(lines) == 2 + 1 + len(lits_plans.configurations)
    for name, c in lits_plans.configurations.items():
        row = next(line for line in lines if line.startswith(name + " ") or line.startswith(name + "  "))
        assert "x".join(map(str, c.patch_size)) in row
        assert f"{c.estimated_memory_gb:.2f}" in row
    assert len({len(line) for line in lines[1:3]}) == 1  # header and rule aligned
