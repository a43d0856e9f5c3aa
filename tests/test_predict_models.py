"""Prediction beyond one configuration: the cascade, ensembles of configurations, the
inference plan as default, ROI-first inference, precision choice and the prefetch overlap.

Networks are randomly initialised (no training: fast; the ``model_ws`` fixture of conftest.py,
a copy per test) or hand-made per-voxel networks, whose output does not depend on the tiling,
so ROI and whole-volume inference can be compared exactly.
"""

import json
from dataclasses import replace

import numpy as np
import pytest
import torch
from helpers import DATASET

from autoliver.cli import main
from autoliver.core.errors import StaleArtefactError
from autoliver.infer.ensemble import Ensemble, load_ensemble
from autoliver.infer.pipeline import ensemble_probabilities, predict_case, roi_decision
from autoliver.infer.precision import cpu_flags, resolve_precision
from autoliver.infer.predictor import TILE_MAX_PATCHES, FoldNetwork, load_model, predict_preprocessed, preprocess_for, tile_voxels
from autoliver.infer.roi import coarse_factors, find_roi, grow_box, liver_box, roi_costs
from autoliver.infer.runner import PredictOptions, predict_inputs
from autoliver.infer.sliding_window import tile_starts
from autoliver.infer.volume import one_hot_foreground, predict_volume
from autoliver.io.images import read_image
from autoliver.preprocess.resample import resample_probabilities
from planning.plans import Plans

FAST = ["--no-progress", "--threads", "1", "--device", "cpu"]

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture()
def ws(model_ws):
    """This test's own copy of the tiny workspace with random-weight checkpoints of 2d (folds 0
    and 1), 3d_fullres, 3d_lowres and 3d_cascade_fullres (fold 0)."""
    return model_ws


def image_of(ws, k=0):
    return read_image(sorted((ws.raw / DATASET / "imagesTr").glob("*_0000.nii.gz"))[k], dtype=np.float32)


def test_cascade_feeds_the_resampled_lowres_argmax_as_one_hot(ws, monkeypatch):
    model = load_model(ws.results(DATASET), "3d_cascade_fullres", device="cpu")
    assert model.previous is not None and model.previous.configuration.name == "3d_lowres"
    assert model.data_identifiers == ("lowres", "fullres")
    image, geom = image_of(ws)
    prepared = preprocess_for(model, image, geom)
    low = predict_preprocessed(model.previous, prepared["lowres"][0], tta=False).numpy()
    expected = resample_probabilities(low, prepared["fullres"][0].shape).argmax(0)
    seen = []
    import autoliver.infer.predictor as P

    def spy(*args, **kwargs):
        seen.append(kwargs.get("prev_seg"))
        return predict_volume(*args, **kwargs)

    monkeypatch.setattr(P, "predict_volume", spy)
    pred = predict_case(model, image, geom, tta=False, roi=False)
    assert pred.seg.shape == geom.shape and pred.info["folds"] == {"3d_cascade_fullres": ["0"], "3d_lowres": ["0"]}
    assert seen[0] is None and np.array_equal(seen[1], expected)  # lowres stage first, then the cascade with its labels
    # the network's extra channels are the one-hot of those labels: a volume that is one patch
    patch = model.configuration.patch_size
    data = np.random.default_rng(0).normal(size=patch).astype(np.float32)
    prev = np.random.default_rng(1).integers(0, 3, size=patch).astype(np.uint8)
    inputs = []

    def net(x):
        inputs.append(x.clone())
        return torch.zeros((x.shape[0], 3, *x.shape[2:]))

    predict_volume(net, data, model.configuration, 3, torch.device("cpu"), step=1.0, prev_seg=prev)
    assert len(inputs) == 1 and inputs[0].shape[1] == 3
    assert torch.equal(inputs[0][0, 1:], torch.from_numpy(one_hot_foreground(prev, 3)))
    assert torch.allclose(inputs[0][0, 0], torch.from_numpy(data))


def test_ensemble_of_identical_models_is_the_model_and_mixed_ensembles_average(ws):
    image, geom = image_of(ws, 1)
    m2d = load_model(ws.results(DATASET), "2d", folds=["0"])
    m3d = load_model(ws.results(DATASET), "3d_fullres")
    prepared = preprocess_for(Ensemble((m2d, m3d)), image, geom)
    single = ensemble_probabilities(Ensemble((m2d,)), prepared, None, tta=False)
    double = ensemble_probabilities(Ensemble((m2d, m2d)), prepared, None, tta=False)
    assert torch.allclose(single, double, atol=1e-6)
    mixed = ensemble_probabilities(Ensemble((m2d, m3d)), prepared, None, tta=False)
    other = ensemble_probabilities(Ensemble((m3d,)), prepared, None, tta=False)
    assert torch.allclose(mixed, (single + other) / 2, atol=1e-5)
    a = predict_case(Ensemble((m2d, m2d)), image, geom, tta=False, roi=False)
    b = predict_case(m2d, image, geom, tta=False, roi=False)
    assert np.array_equal(a.seg, b.seg) and a.seg.shape == geom.shape


def test_cli_ensemble_and_inference_plan_default(ws, tmp_path):
    src = sorted((ws.raw / DATASET / "imagesTr").glob("*_0000.nii.gz"))[0]
    case = src.name.replace("_0000.nii.gz", "")
    base = ["predict", "-i", str(src), "-d", DATASET, "--workspace", str(ws.root), "--no-tta", *FAST]
    assert main([*base, "-o", str(tmp_path / "ens"), "-c", "2d", "3d_fullres", "-f", "0"]) == 0
    rep = json.loads((tmp_path / "ens" / f"{case}.json").read_text())
    assert rep["configuration"] == "2d+3d_fullres" and rep["models"]["folds"] == {"2d": ["0"], "3d_fullres": ["0"]}
    assert {"wait_input_s", "network_s", "export_s"} <= set(rep["runtime_s"]) and rep["roi"] is not None
    plans = Plans.load(ws.preprocessed(DATASET) / "plans.json")
    plan_path = ws.results(DATASET) / "inference_plan.json"
    plan = {"schema_version": 1, "dataset": DATASET, "plans_hash": plans.plans_hash, "configurations": ["3d_fullres", "2d"],
            "folds": {"3d_fullres": ["0"], "2d": ["0", "1"]},
            "postprocessing": [{"name": "largest_liver_component", "enabled": True, "params": {}},
                               {"name": "min_tumour_volume", "enabled": False, "params": {"min_volume_mm3": 50.0}}]}
    plan_path.write_text(json.dumps(plan))
    try:
        ens = load_ensemble(ws.results(DATASET))
        assert ens.configurations == ("3d_fullres", "2d") and ens.folds == {"3d_fullres": ["0"], "2d": ["0", "1"]}
        assert [s.name for s in ens.postprocessing] == ["largest_liver_component"]
        assert main([*base, "-o", str(tmp_path / "plan")]) == 0
        rep = json.loads((tmp_path / "plan" / f"{case}.json").read_text())
        assert rep["postprocessing"] == ["largest_liver_component"] and rep["models"]["source"] == str(plan_path)
        # -c overrides the plan (and its post-processing)
        assert load_ensemble(ws.results(DATASET), ["2d"]).postprocessing == ()
        plan_path.write_text(json.dumps({**plan, "plans_hash": "0" * 64}))
        with pytest.raises(StaleArtefactError, match="inference_plan.json.*find_best_configuration"):
            load_ensemble(ws.results(DATASET))
    finally:
        plan_path.unlink()
    assert load_ensemble(ws.results(DATASET)).source == "default"  # no plan: the first trained


class VoxelNet(torch.nn.Module):
    """Per-voxel 'liver' where the normalised intensity is near ``centre``; never tumour."""

    def __init__(self, centre: float, width: float = 0.6, liver: bool = True):
        super().__init__()
        self.centre, self.width, self.liver = centre, width, liver

    def forward(self, x):
        v = x[:, :1]
        liver = 1.0 - ((v - self.centre) / self.width) ** 2 if self.liver else torch.full_like(v, -5.0)
        return torch.cat([torch.zeros_like(v), liver, torch.full_like(v, -5.0)], dim=1)


def voxel_model(ws, config="3d_fullres", liver=True):
    model = load_model(ws.results(DATASET), config)
    norm = model.plans.normalisation
    centre = (60.0 - norm.mean) / norm.std  # the phantoms' liver is 60 HU
    return replace(model, folds=(FoldNetwork("0", model.folds[0].checkpoint, 0, VoxelNet(centre, liver=liver)),))


@pytest.mark.parametrize("config", ["3d_fullres", "2d"])
def test_roi_equals_whole_volume_inside_the_roi_and_covers_the_liver(ws, config):
    model = voxel_model(ws, config)
    image, geom = image_of(ws, 2)
    label, _ = read_image(str(sorted((ws.raw / DATASET / "labelsTr").glob("*.nii.gz"))[2]), dtype=np.uint8)
    ens = Ensemble((model,))
    prepared = preprocess_for(ens, image, geom)
    data, props = prepared["fullres"]
    roi = find_roi(model, data)
    assert roi.found and roi.fraction <= 1.0
    box = roi.box
    inner = (slice(None), *(slice(a, b) for a, b in box))
    whole = ensemble_probabilities(ens, prepared, None, tta=True)
    inside = ensemble_probabilities(ens, prepared, box, tta=True)
    assert torch.allclose(inside, whole[inner], atol=1e-5)
    # a real (random-weight) U-Net too: the ROI runs the whole volume's tiles that reach into it
    unet = Ensemble((load_model(ws.results(DATASET), config),))
    small = ((box[0][0] + 1, box[0][1] - 1), (box[1][0] + 3, box[1][0] + 9), (box[2][1] - 7, box[2][1] - 2))
    inner = (slice(None), *(slice(a, b) for a, b in small))
    whole = ensemble_probabilities(unet, prepared, None, tta=False)
    assert torch.allclose(ensemble_probabilities(unet, prepared, small, tta=False), whole[inner], atol=1e-5)
    pred = predict_case(model, image, geom, tta=True, roi=True, save_probabilities=True)
    final = pred.info["roi"]["box"]  # the coarse pass's box, grown where the predicted liver touched it
    assert pred.info["roi"]["found"] and all(a <= c and d <= b for (a, b), (c, d) in zip(final, box))
    assert (final == [list(b) for b in box]) == (pred.info["roi"]["grown"] == 0)
    # the reference liver (mapped to the preprocessed grid) lies inside the box
    from autoliver.preprocess.case import preprocess_case

    _, seg_pre, _ = preprocess_case(image, geom, label, model.plans, "fullres")
    zz, yy, xx = np.nonzero(seg_pre)
    assert all(a <= v.min() and v.max() < b for v, (a, b) in zip((zz, yy, xx), box))
    assert pred.probabilities.dtype == np.float16 and pred.probabilities.shape == (3, *geom.shape)


def test_no_liver_in_the_coarse_pass_predicts_the_whole_volume(ws, caplog):
    model = voxel_model(ws, liver=False)
    image, geom = image_of(ws)
    with caplog.at_level("INFO"):
        pred = predict_case(model, image, geom, tta=False, roi=True)
    assert pred.info["roi"]["found"] is False and pred.info["roi"]["fraction"] == 1.0
    assert "no liver" in caplog.text and not pred.seg.any()


def test_auto_tiles_give_the_patch_tiles_result_for_a_per_voxel_network(ws):
    model = voxel_model(ws)
    image, geom = image_of(ws, 2)
    by_patch = predict_case(model, image, geom, tta=True, roi="off", tiles="patch", save_probabilities=True)
    small = predict_case(model, image, geom, tta=True, roi="off", tiles="auto", tile_mb=0.01, save_probabilities=True)
    big = predict_case(model, image, geom, tta=True, roi="on", tiles="auto", save_probabilities=True)
    assert by_patch.info["tiles"]["mode"] == "patch" and big.info["tiles"]["mode"] == "auto"
    assert small.info["tiles"]["tile"] == list(model.configuration.patch_size)  # the budget floors at the patch
    patch_voxels = int(np.prod(model.configuration.patch_size))
    assert tile_voxels(model.configuration, 1e6) == int(TILE_MAX_PATCHES * patch_voxels)  # instance norm: tiles stay near the patch
    assert np.prod(big.info["tiles"]["tile"]) <= TILE_MAX_PATCHES * patch_voxels
    for other in (small, big):
        assert np.array_equal(other.seg, by_patch.seg)
    np.testing.assert_allclose(small.probabilities.astype(np.float32), by_patch.probabilities.astype(np.float32), atol=2e-3)


def test_roi_auto_runs_the_coarse_pass_only_where_it_pays(ws):
    model = voxel_model(ws)
    patch = tuple(model.configuration.patch_size)
    ens = Ensemble((model,))
    one_tile = roi_decision(ens, patch, "fullres", tta=False, step=0.5)
    assert not one_tile["pays"] and one_tile["coarse_to_whole"] == 1.0  # a coarse pass of one patch saves nothing
    big = tuple(6 * p for p in patch)
    coarse, whole = roi_costs(model, big, tta=False, step=0.5)
    factors = coarse_factors(model.configuration.spacing)
    expected = np.prod([len(range(0, -(-n // f), p)) if -(-n // f) > p else 1 for n, f, p in zip(big, factors, patch)])
    assert coarse == expected * np.prod(patch) and whole == np.prod([len(tile_starts(n, p, 0.5)) for n, p in zip(big, patch)]) * np.prod(patch)
    assert roi_decision(ens, big, "fullres", tta=False, step=0.5)["pays"]
    assert roi_costs(model, big, tta=True, step=0.5)[1] == 8 * whole  # mirrored copies count
    image, geom = image_of(ws)
    pred = predict_case(model, image, geom, tta=False, roi="auto")
    assert pred.info["roi"]["mode"] == "auto" and pred.info["roi"]["used"] == pred.info["roi"]["decision"]["pays"]


def test_a_box_that_cuts_the_liver_grows_until_it_holds_it(ws, monkeypatch):
    import autoliver.infer.pipeline as pipeline
    from autoliver.infer.roi import Roi

    model = voxel_model(ws)
    image, geom = image_of(ws, 2)
    whole = predict_case(model, image, geom, tta=False, roi="off")
    ens = Ensemble((model,))
    data = preprocess_for(ens, image, geom)["fullres"][0]
    roi = find_roi(model, data, margin_mm=0.0)
    (z0, z1), (y0, y1), (x0, x1) = roi.box
    cut = ((z0, z1), (y0, y1), (x0 + (x1 - x0) // 2, x1))  # half of the liver left out
    monkeypatch.setattr(pipeline, "find_roi", lambda *a, **k: Roi(cut, True, 0.1))
    pred = predict_case(model, image, geom, tta=False, roi="on")
    assert pred.info["roi"]["grown"] >= 1 and pred.info["roi"]["box"][2][0] < cut[2][0]
    monkeypatch.setattr(pipeline, "MAX_GROW", 0)
    kept = predict_case(model, image, geom, tta=False, roi="on")
    assert kept.info["roi"]["grown"] == 0 and kept.info["roi"]["box"] == [list(b) for b in cut]
    liver = lambda seg: np.isin(seg, (1, 2))  # noqa: E731
    # the per-voxel network's labels inside any box are the whole volume's: growing recovers liver, adds nothing else
    assert liver(kept.seg).sum() < liver(pred.seg).sum() <= liver(whole.seg).sum()
    assert not (liver(pred.seg) & ~liver(whole.seg)).any()


def test_grow_box_moves_only_the_sides_the_largest_liver_region_touches_inside_the_volume():
    labels = np.zeros((10, 12, 14), np.uint8)
    labels[0:6, 3:8, 4:14] = 1  # the liver: touches the low z side and the high x side
    labels[2:4, 4:6, 10:14] = 2  # with a tumour at the high x side
    labels[5, 11, 0] = 1  # a stray voxel at the high y / low x corner: not the liver, grows nothing
    box = ((0, 10), (20, 32), (30, 44))
    grown = grow_box(box, labels, (40, 60, 60), (2.0, 1.0, 1.0), margin_mm=5.0, block_mm=1.0)
    assert grown == ((0, 10), (20, 32), (30, 54))  # z already at the volume's border; x moved by 2 x 5 mm
    assert grow_box(box, np.zeros_like(labels), (40, 60, 60), (2.0, 1.0, 1.0)) == box


def test_coarse_pass_pools_the_volume_but_the_box_is_in_the_full_grid():
    labels = np.zeros((10, 15, 15), np.uint8)  # a coarse grid pooled by 2 from (20, 30, 30)
    labels[3:6, 4:8, 5:9] = 1
    box = liver_box(labels, np.arange(10) * 2, (20, 30, 30), (3.0, 3.0, 3.0), margin_mm=0.0, inplane=(2, 2))
    assert box[1] == (8, 16) and box[2] == (10, 18)
    assert box[0][0] <= 6 and box[0][1] >= 11


def test_liver_box_takes_the_largest_component_with_margin_and_sampled_slices():
    labels = np.zeros((40, 60, 60), np.uint8)
    labels[10:20, 20:40, 25:45] = 1
    labels[14:16, 30:32, 30:32] = 2
    labels[35, 2, 2] = 1  # a stray voxel far away: ignored
    spacing = (2.5, 1.5, 1.5)
    box = liver_box(labels, np.arange(40), labels.shape, spacing, margin_mm=6.0)
    assert box == ((10 - 3, 20 + 3), (20 - 4, 40 + 4), (25 - 4, 45 + 4))
    assert liver_box(labels, np.arange(40), labels.shape, spacing, margin_mm=100.0) == ((0, 40), (0, 60), (0, 60))  # clipped
    sampled = liver_box(labels[1::4], np.arange(1, 40, 4), labels.shape, spacing, margin_mm=6.0)
    assert sampled[0][0] <= 7 and sampled[0][1] >= 23  # slices between the sampled ones are covered
    grown = liver_box(labels, np.arange(40), labels.shape, spacing, margin_mm=0.0, min_size=(16, 32, 32))
    assert [b - a for a, b in grown] == [16, 32, 32] and grown[0][0] <= 10 and grown[0][1] >= 20
    assert liver_box(np.zeros_like(labels), np.arange(40), labels.shape, spacing) is None


def test_precision_choice(tmp_path):
    assert resolve_precision("auto", "cpu", flags={"avx2", "fma"}) in ("fp32", "bf16")  # bf16 only via AMX capability
    assert resolve_precision("auto", "cpu", flags={"avx2", "avx512_bf16"}) == "bf16"
    assert resolve_precision("auto", "cuda") == "fp16" and resolve_precision("fp32", "cuda") == "fp32"
    with pytest.raises(ValueError, match="precision"):
        resolve_precision("int8", "cpu")
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nflags\t\t: fpu sse2 avx2 amx_bf16\n\nprocessor\t: 1\nflags\t\t: fpu\n")
    assert cpu_flags(info) == {"fpu", "sse2", "avx2", "amx_bf16"} and cpu_flags(tmp_path / "missing") == set()


def test_prefetch_prepares_the_next_case_while_the_network_runs(ws, tmp_path):
    model = load_model(ws.results(DATASET), "3d_fullres")
    inputs = tmp_path / "in"
    inputs.mkdir()
    for src in sorted((ws.raw / DATASET / "imagesTr").glob("*_0000.nii.gz"))[:3]:
        (inputs / src.name).write_bytes(src.read_bytes())
    summary = predict_inputs(model, inputs, tmp_path / "out", PredictOptions(progress=False, tta=True, roi=False))
    cases = summary.predicted
    assert len(cases) == 3 and not summary.failed
    ev = summary.events
    for before, after in zip(cases, cases[1:]):
        assert ev[after]["input_ready"] < ev[before]["finished"]  # the next case was ready before this one was done
    for case in cases:
        t = summary.timings[case]
        assert {"wait_input_s", "network_s", "export_s"} <= set(t)
        rep = json.loads((tmp_path / "out" / f"{case}.json").read_text())
        assert rep["events"]["input_ready"] == pytest.approx(ev[case]["input_ready"])
        assert rep["runtime_s"]["wait_input_s"] == pytest.approx(t["wait_input_s"], abs=1e-3)
    assert set(summary.stage_totals()) >= {"wait_input_s", "network_s", "export_s"}


def test_cli_roi_and_tile_options_reach_the_report(ws, tmp_path):
    src = sorted((ws.raw / DATASET / "imagesTr").glob("*_0000.nii.gz"))[0]
    case = src.name.replace("_0000.nii.gz", "")
    base = ["predict", "-i", str(src), "-d", DATASET, "--workspace", str(ws.root), "-c", "3d_fullres", "--no-tta", *FAST]
    assert main([*base, "-o", str(tmp_path / "a"), "--roi", "--tiles", "patch"]) == 0
    rep = json.loads((tmp_path / "a" / f"{case}.json").read_text())
    assert rep["roi"]["mode"] == "on" and rep["roi"]["used"] and rep["tiles"]["mode"] == "patch"
    assert main([*base, "-o", str(tmp_path / "b"), "--tile-mb", "64"]) == 0
    rep = json.loads((tmp_path / "b" / f"{case}.json").read_text())
    assert rep["roi"]["mode"] == "auto" and "coarse_to_whole" in rep["roi"]["decision"]
    assert rep["tiles"]["mode"] == "auto" and rep["tiles"]["tile_mb"] == 64.0
    assert main([*base, "-o", str(tmp_path / "c"), "--no-roi"]) == 0
    assert json.loads((tmp_path / "c" / f"{case}.json").read_text())["roi"] is None
    assert main([*base, "-o", str(tmp_path / "d"), "--tile-mb", "0"]) == 2
    assert not (tmp_path / "d" / f"{case}.nii.gz").exists()
