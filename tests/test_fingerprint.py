"""Dataset fingerprint: per-case analysis by hand, the reduce against numpy, real cases."""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest

from autoliver import examples
from autoliver.io.dataset import discover
from autoliver.preprocess.fingerprint import dataset_input_hash, extract_fingerprint
from planning.crop import body_bbox, box_shape
from planning.fingerprint import FingerprintFormatError, analyse_case, load_fingerprint, reduce_fingerprint

SPACING = (2.5, 0.7, 0.8)
DIRECTION = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)
DATASET_JSON = {"channel_names": {"0": "CT"}, "labels": {"background": 0, "liver": 1, "tumour": 2}, "numTraining": 1, "file_ending": ".nii.gz"}


def phantom(offset: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Air around a body box; a liver block with intensities 100 + k; three tumour voxel sets:
    a 3x4x5 block plus one voxel touching only its corner (one 26-component of 61 voxels), and
    a separate 2x2x2 block."""
    image = np.full((60, 40, 50), -1000, dtype=np.int16)
    label = np.zeros(image.shape, dtype=np.uint8)
    image[6:40, 5:35, 6:44] = 20
    label[8:20, 10:30, 10:40] = 1
    image[label == 1] = 100 + offset + (np.arange((label == 1).sum()) % 50)
    label[10:13, 12:16, 12:17] = 2
    label[13, 16, 17] = 2  # corner neighbour of (12, 15, 16)
    label[16:18, 25:27, 30:32] = 2
    image[label == 2] = 60 + offset
    return image, label


def test_analyse_case_by_hand():
    image, label = phantom()
    rng = np.random.default_rng(0)
    r = analyse_case(image, label, SPACING, DIRECTION, rng, samples_per_class=500)
    n_tumour = 60 + 1 + 8
    n_liver = 12 * 20 * 30 - n_tumour
    assert r["class_voxels"] == {"0": image.size - n_liver - n_tumour, "1": n_liver, "2": n_tumour}
    voxel = 2.5 * 0.7 * 0.8
    assert r["tumour_component_volumes_mm3"] == pytest.approx([61 * voxel, 8 * voxel])
    assert r["shape"] == [60, 40, 50] and r["spacing"] == list(SPACING)
    assert r["shape_after_crop"] == list(box_shape(body_bbox(image, label)))
    assert r["shape_after_crop"][0] < 60  # the air is cropped away
    s = r["samples"]
    assert len(s["foreground"]) == len(s["1"]) == 500 and len(s["2"]) == n_tumour  # fewer voxels than the budget: all
    assert np.all(s["2"] == 60)
    assert set(np.unique(s["1"])) <= set(range(100, 150))
    assert np.all(np.isin(s["foreground"], image[label > 0]))
    assert len(np.unique(s["1"])) > 40  # drawn without replacement from many values


def test_six_vs_26_connectivity_matters():
    """The corner voxel joins the block only under 26-connectivity (the documented choice)."""
    from scipy import ndimage

    _, label = phantom()
    assert ndimage.label(label == 2)[1] == 3  # 6-connectivity would count 3 lesions
    r = analyse_case(*phantom(), SPACING, DIRECTION, np.random.default_rng(0))
    assert len(r["tumour_component_volumes_mm3"]) == 2


def test_seed_reproducibility():
    image, label = phantom()
    a = analyse_case(image, label, SPACING, DIRECTION, np.random.default_rng(7), 300)
    b = analyse_case(image, label, SPACING, DIRECTION, np.random.default_rng(7), 300)
    c = analyse_case(image, label, SPACING, DIRECTION, np.random.default_rng(8), 300)
    assert np.array_equal(a["samples"]["1"], b["samples"]["1"])
    assert not np.array_equal(a["samples"]["1"], c["samples"]["1"])


def test_analyse_case_rejects_bad_input():
    image, label = phantom()
    with pytest.raises(ValueError):
        analyse_case(image, label[:-1], SPACING, DIRECTION, np.random.default_rng(0))
    with pytest.raises(ValueError):
        analyse_case(image, label, (1.0, 0.0, 1.0), DIRECTION, np.random.default_rng(0))


def test_reduce_against_numpy():
    rng = np.random.default_rng(3)
    cases = {}
    spacings = [(2.5, 0.7, 0.8), (1.0, 0.9, 0.9), (5.0, 0.6, 0.6), (3.0, 0.75, 0.75)]
    for i, sp in enumerate(spacings):
        image, label = phantom(offset=10 * i)
        if i == 3:
            label[label == 2] = 1  # a case without tumour
        cases[f"case_{i}"] = analyse_case(image, label, sp, DIRECTION, rng, 200)
    fp = reduce_fingerprint(cases, DATASET_JSON, "Dataset001_Test", "abc")
    assert fp["schema_version"] == 1 and fp["input_hash"] == "abc" and fp["n_cases"] == 4
    sp = np.array(spacings)
    assert fp["spacing"]["median"] == pytest.approx(np.median(sp, axis=0))
    for p in (5, 10, 50, 90, 95):
        assert fp["spacing"]["percentiles"][str(p)] == pytest.approx(np.percentile(sp, p, axis=0))
    crops = np.array([cases[k]["shape_after_crop"] for k in sorted(cases)])
    assert fp["shape_after_crop"]["median"] == pytest.approx(np.median(crops, axis=0))

    fg = np.concatenate([cases[k]["samples"]["foreground"] for k in sorted(cases)]).astype(np.float64)
    st = fp["intensity"]["foreground"]
    assert st["mean"] == pytest.approx(fg.mean()) and st["std"] == pytest.approx(fg.std())
    assert st["percentile_00_5"] == pytest.approx(np.percentile(fg, 0.5))
    assert st["percentile_99_5"] == pytest.approx(np.percentile(fg, 99.5))
    assert (st["min"], st["max"], st["median"]) == pytest.approx((fg.min(), fg.max(), np.median(fg)))
    assert fp["intensity"]["per_class"]["2"]["mean"] == pytest.approx(np.mean([60, 70, 80]))

    total = sum(np.prod(c["shape"]) for c in cases.values())
    n2 = sum(c["class_voxels"].get("2", 0) for c in cases.values())
    assert fp["class_fractions"]["2"] == pytest.approx(n2 / total)
    assert sum(fp["class_fractions"].values()) == pytest.approx(1.0)

    t = fp["tumour"]
    assert t["cases_with_tumour"] == 3 and t["components_per_case"]["max"] == 2
    vols = np.array([v for c in cases.values() for v in c["tumour_component_volumes_mm3"]])
    assert t["volume_mm3"]["count"] == 6
    assert t["volume_mm3"]["min"] == pytest.approx(vols.min()) and t["volume_mm3"]["max"] == pytest.approx(vols.max())
    assert t["volume_mm3"]["p50"] == pytest.approx(np.median(vols))

    text = json.dumps(fp)  # JSON-able, and the samples stay out
    assert '"samples"' not in text and "samples" not in fp["cases"]["case_0"]


def test_load_fingerprint_checks_schema(tmp_path):
    path = tmp_path / "fingerprint.json"
    with pytest.raises(FingerprintFormatError, match="plan_and_preprocess"):
        load_fingerprint(path)
    path.write_text(json.dumps({"schema_version": 0}))
    with pytest.raises(FingerprintFormatError) as err:
        load_fingerprint(path)
    assert str(path) in str(err.value) and "autoliver plan_and_preprocess" in str(err.value)
    path.write_text("{")
    with pytest.raises(FingerprintFormatError, match="not valid JSON"):
        load_fingerprint(path)


REAL = ("lits117_128cube", "totalseg_example_ct_sm", "dcmqi_ct3slice")


@pytest.fixture(scope="module")
def real_dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("raw") / "Dataset010_Examples"
    (root / "imagesTr").mkdir(parents=True)
    (root / "labelsTr").mkdir()
    for case in REAL:
        os.symlink(examples.image_path(case), root / "imagesTr" / f"{case}_0000.nii.gz")
        shutil.copy(examples.label_path(case), root / "labelsTr" / f"{case}.nii.gz")
    (root / "dataset.json").write_text(json.dumps(dict(DATASET_JSON, numTraining=len(REAL))))
    dataset, problems = discover(root)
    assert problems == []
    return dataset


@pytest.fixture(scope="module")
def real_fingerprint(real_dataset):
    return extract_fingerprint(real_dataset, n_jobs=1, progress=False, seed=11, samples_per_class=2000)


def test_real_cases(real_fingerprint):
    fp = real_fingerprint
    lits = fp["cases"]["lits117_128cube"]
    assert lits["class_voxels"]["1"] == 485268 and lits["class_voxels"]["2"] == 130083
    assert lits["spacing"] == [1.0, 1.0, 1.0] and lits["shape"] == [128, 128, 128]
    assert fp["cases"]["dcmqi_ct3slice"]["shape"][0] == 3
    assert fp["tumour"]["cases_with_tumour"] == 1
    assert fp["tumour"]["volume_mm3"]["total"] == pytest.approx(130083.0)
    st = fp["intensity"]["per_class"]["2"]
    assert 40 < st["mean"] < 100  # hypodense tumour, about 70 HU
    assert fp["seed"] == 11 and len(fp["input_hash"]) == 64
    json.dumps(fp)


def test_real_cases_n_jobs_and_seed(real_dataset, real_fingerprint):
    again = extract_fingerprint(real_dataset, n_jobs=2, progress=False, seed=11, samples_per_class=2000)
    assert again == real_fingerprint
    other = extract_fingerprint(real_dataset, n_jobs=1, progress=False, seed=12, samples_per_class=2000)
    assert other["cases"] == {k: dict(v, foreground_mean=other["cases"][k]["foreground_mean"],
                                      foreground_std=other["cases"][k]["foreground_std"])
                              for k, v in real_fingerprint["cases"].items()}
    assert other["intensity"] != real_fingerprint["intensity"]


def test_input_hash_tracks_files(real_dataset, tmp_path):
    h = dataset_input_hash(real_dataset)
    assert dataset_input_hash(real_dataset) == h
    label = real_dataset.training[0].label
    st = os.stat(label)
    os.utime(label, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    try:
        assert dataset_input_hash(real_dataset) != h
    finally:
        os.utime(label, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert dataset_input_hash(real_dataset) == h
    dj = real_dataset.root / "dataset.json"
    text = dj.read_text()
    dj.write_text(text.replace('"CT"', '"ct"'))
    try:
        assert dataset_input_hash(real_dataset) != h
    finally:
        dj.write_text(text)


def test_counts_and_components_against_scipy(monkeypatch):
    from scipy import ndimage

    import planning.fingerprint as fpmod

    rng = np.random.default_rng(5)
    label = (rng.random((20, 30, 25)) < 0.3).astype(np.uint8) + (rng.random((20, 30, 25)) < 0.1).astype(np.uint8)
    monkeypatch.setattr(fpmod, "COUNT_CHUNK", 1000)  # many chunks, and value 2 absent from some
    values, counts = np.unique(label, return_counts=True)
    assert fpmod.class_voxel_counts(label) == {str(v): int(c) for v, c in zip(values, counts)}
    mask = label == 2
    ref, n = ndimage.label(mask, structure=np.ones((3, 3, 3)))
    ref_sizes = sorted(np.bincount(ref.ravel())[1:].tolist(), reverse=True)
    vols = fpmod.tumour_components(mask, (2.0, 1.0, 0.5))
    assert len(vols) == n and vols == pytest.approx([c * 1.0 for c in ref_sizes])
    assert fpmod.tumour_components(np.zeros((4, 4, 4), bool), (1.0, 1.0, 1.0)) == []
    with pytest.raises(ValueError, match="negative"):
        fpmod.class_voxel_counts(np.array([[[0, -1]]]))
