"""Case storage (atomic, patch-readable) and the resumable dataset runner."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from autoliver import examples
from autoliver.core.errors import MissingArtefactError
from autoliver.io.dataset import open_dataset
from autoliver.io.images import Geometry, read_image, write_image
from autoliver.preprocess import storage
from autoliver.preprocess.runner import DATASET_PROPERTIES, preprocess_dataset
from autoliver.preprocess.storage import case_done, list_cases, load_case, save_case
from planning.plans import Normalisation, Plans


def arrays(shape=(40, 70, 300), seed=0):
    rng = np.random.default_rng(seed)
    data = rng.normal(size=shape).astype(np.float16)
    seg = rng.integers(0, 3, size=shape).astype(np.uint8)
    return data, seg


def test_save_load_and_patch_reads(tmp_path):
    data, seg = arrays()
    save_case(tmp_path, "case_a", data, seg, {"spacing": [1.0, 1.0, 1.0]})
    assert case_done(tmp_path, "case_a") and list_cases(tmp_path) == ["case_a"]
    d, s, props = load_case(tmp_path, "case_a")
    assert props["spacing"] == [1.0, 1.0, 1.0] and props["case_id"] == "case_a"
    assert d.shape == data.shape and d.dtype == np.float16 and s.dtype == np.uint8
    patch = d[3:35, 10:60, 250:300]
    assert isinstance(patch, np.ndarray)
    np.testing.assert_array_equal(patch, data[3:35, 10:60, 250:300])
    np.testing.assert_array_equal(s[7], seg[7])
    d2, s2, _ = load_case(tmp_path, "case_a", mmap=False)
    np.testing.assert_array_equal(d2, data)
    np.testing.assert_array_equal(s2, seg)


def test_case_without_seg_and_overwrite(tmp_path):
    data, seg = arrays(seed=1)
    save_case(tmp_path, "c", data, seg, {})
    save_case(tmp_path, "c", data * 2, None, {"v": 2})
    d, s, props = load_case(tmp_path, "c", mmap=False)
    assert s is None and props["v"] == 2
    np.testing.assert_array_equal(d, data * 2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.b2nd", "c.json"]


def test_crash_before_properties_is_not_done(tmp_path, monkeypatch):
    data, seg = arrays(seed=2)

    def crash(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(storage, "write_json", crash)
    with pytest.raises(OSError):
        save_case(tmp_path, "x", data, seg, {})
    assert (tmp_path / "x.b2nd").is_file()  # arrays were written ...
    assert not case_done(tmp_path, "x") and list_cases(tmp_path) == []  # ... but it is not done
    with pytest.raises(MissingArtefactError):
        load_case(tmp_path, "x")
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp files left
    monkeypatch.undo()
    save_case(tmp_path, "x", data, seg, {})
    assert case_done(tmp_path, "x")


def test_bad_shapes(tmp_path):
    data, seg = arrays()
    with pytest.raises(ValueError):
        save_case(tmp_path, "b", data, seg[:-1], {})
    with pytest.raises(ValueError):
        save_case(tmp_path, "b", data[0], None, {})


@pytest.fixture(scope="module")
def tiny_dataset(tmp_path_factory) -> Path:
    """Three real CT cases: two halves of lits117 and totalseg's 30-slice crop."""
    root = tmp_path_factory.mktemp("raw") / "Dataset001_Tiny"
    (root / "imagesTr").mkdir(parents=True)
    (root / "labelsTr").mkdir()
    image, geom = read_image(examples.image_path("lits117_128cube"))
    label, _ = read_image(examples.label_path("lits117_128cube"))
    for i, (a, b) in enumerate([(0, 64), (64, 128)]):
        g = Geometry((b - a, 128, 128), (1.0, 1.0, 1.0), (0.0, 0.0, float(a)), geom.direction)
        write_image(root / "imagesTr" / f"lits_{i:03d}_0000.nii.gz", image[a:b], g)
        write_image(root / "labelsTr" / f"lits_{i:03d}.nii.gz", label[a:b], g)
    image, geom = read_image(examples.image_path("totalseg_example_ct_sm"))
    label, _ = read_image(examples.label_path("totalseg_example_ct_sm"))
    write_image(root / "imagesTr" / "tseg_000_0000.nii.gz", image, geom)
    write_image(root / "labelsTr" / "tseg_000.nii.gz", label, geom)
    (root / "dataset.json").write_text(json.dumps({
        "channel_names": {"0": "CT"}, "labels": {"background": 0, "liver": 1, "tumour": 2},
        "numTraining": 3, "file_ending": ".nii.gz"}))
    return root


def tiny_plans() -> Plans:
    return Plans("Dataset001_Tiny", "0" * 64, "cpu", 8.0, {"background": 0, "liver": 1, "tumour": 2},
                 Normalisation("ct", -17.0, 201.0, 99.0, 39.0),
                 {"fullres": (1.5, 1.5, 1.5), "lowres": (3.0, 3.0, 3.0)}, {})


def folder_contents(folder: Path) -> dict:
    out = {}
    for case_id in list_cases(folder):
        d, s, p = load_case(folder, case_id, mmap=False)
        out[case_id] = (d, s, p)
    return out


def test_runner_resumes_overwrites_and_matches_across_jobs(tmp_path, tiny_dataset):
    dataset = open_dataset(tiny_dataset)
    plans = tiny_plans()
    first = preprocess_dataset(dataset, plans, tmp_path / "a", progress=False)
    assert first["done"] == ["lits_000", "lits_001", "tseg_000"] and first["skipped"] == []
    for ident, spacing in plans.data_spacings.items():
        dp = json.loads((tmp_path / "a" / ident / DATASET_PROPERTIES).read_text())
        assert dp["plans_hash"] == plans.plans_hash and dp["spacing"] == list(spacing)
        assert dp["cases"] == ["lits_000", "lits_001", "tseg_000"]
    d, s, p = load_case(tmp_path / "a" / "lowres", "tseg_000")
    assert d.shape == tuple(p["shape_after_resampling"]) and p["plans_hash"] == plans.plans_hash

    second = preprocess_dataset(dataset, plans, tmp_path / "a", progress=False)
    assert second["done"] == [] and len(second["skipped"]) == 3

    (tmp_path / "a" / "fullres" / "lits_001.json").unlink()  # an interrupted case is redone
    third = preprocess_dataset(dataset, plans, tmp_path / "a", progress=False)
    assert third["done"] == ["lits_001"]

    again = preprocess_dataset(dataset, plans, tmp_path / "a", overwrite=True, progress=False)
    assert len(again["done"]) == 3

    parallel = preprocess_dataset(dataset, plans, tmp_path / "b", n_jobs=2, progress=False)
    assert sorted(parallel["done"]) == first["done"]
    for ident in plans.data_spacings:
        one, two = folder_contents(tmp_path / "a" / ident), folder_contents(tmp_path / "b" / ident)
        assert one.keys() == two.keys()
        for case_id in one:
            np.testing.assert_array_equal(one[case_id][0], two[case_id][0])
            np.testing.assert_array_equal(one[case_id][1], two[case_id][1])
            assert one[case_id][2] == two[case_id][2]


def test_runner_rejects_unknown_identifier(tmp_path, tiny_dataset):
    with pytest.raises(ValueError):
        preprocess_dataset(open_dataset(tiny_dataset), tiny_plans(), tmp_path, data_identifiers=["3d"], progress=False)
