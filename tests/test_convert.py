"""convert_msd / convert_lits: fake MSD and LiTS folders become valid raw datasets."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from scipy.spatial.transform import Rotation

from autoliver import examples
from autoliver.core.errors import DatasetError
from autoliver.io import convert
from autoliver.io.convert import convert_lits, convert_msd
from autoliver.io.images import Geometry, read_header, read_image, write_image
from autoliver.io.validate import validate_dataset

OBLIQUE = tuple(float(v) for v in Rotation.from_euler("xyz", [5, -8, 12], degrees=True).as_matrix().ravel())


def _geometry(k: int) -> Geometry:
    return Geometry((5 + k, 8, 9), (2.5 + k, 0.7, 0.7), (-100.0 + k, 20.5, -300.25), OBLIQUE)


def _pair(k: int) -> tuple[np.ndarray, np.ndarray, Geometry]:
    geom = _geometry(k)
    image = np.random.default_rng(k).integers(-1024, 2000, geom.shape).astype(np.int16)
    label = np.zeros(geom.shape, np.uint8)
    label[1:4, 2:6, 2:7] = 1
    label[2, 3, 3 + k] = 2
    return image, label, geom


def make_msd(src: Path, n: int = 3, label_dtypes=(np.uint8, np.int16, np.float32)) -> Path:
    training = []
    for k in range(n):
        image, label, geom = _pair(k)
        write_image(src / "imagesTr" / f"liver_{k}.nii.gz", image, geom)
        write_image(src / "labelsTr" / f"liver_{k}.nii.gz", label.astype(label_dtypes[k % len(label_dtypes)]), geom)
        training.append({"image": f"./imagesTr/liver_{k}.nii.gz", "label": f"./labelsTr/liver_{k}.nii.gz"})
    write_image(src / "imagesTs" / "liver_132.nii.gz", _pair(5)[0], _geometry(5))
    (src / "imagesTr" / "._liver_0.nii.gz").write_bytes(b"macOS resource fork, not an image")
    dj = {
        "name": "Liver", "modality": {"0": "CT"}, "labels": {"0": "background", "1": "liver", "2": "cancer"},
        "numTraining": n, "numTest": 1, "training": training, "test": ["./imagesTs/liver_132.nii.gz"],
    }
    (src / "dataset.json").write_text(json.dumps(dj))
    return src


def make_lits(src: Path) -> Path:
    for k, batch in ((0, "Training Batch 1"), (1, "Training Batch 1"), (2, "Training Batch 2")):
        image, label, geom = _pair(k)
        write_image(src / batch / f"volume-{k}.nii", image, geom)
        write_image(src / batch / f"segmentation-{k}.nii", label.astype(np.float32 if k == 1 else np.uint8), geom)
    write_image(src / "test-volume-0.nii", _pair(4)[0], _geometry(4))
    return src


def assert_same_grid(got: Geometry, want: Geometry) -> None:
    """NIfTI stores spacing and origin as float32 (re-written exactly) and the direction as a
    float32 quaternion/affine: re-writing an oblique one moves its cosines by ~1e-9."""
    assert (got.shape, got.spacing, got.origin) == (want.shape, want.spacing, want.origin)
    np.testing.assert_allclose(got.direction, want.direction, rtol=0, atol=1e-7)


def _listing(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


def test_convert_msd(tmp_path):
    src = make_msd(tmp_path / "Task03_Liver")
    dst = convert_msd(src, tmp_path / "out" / "Dataset003_Liver", progress=False)
    assert dst == tmp_path / "out" / "Dataset003_Liver"
    assert _listing(dst) == [
        "dataset.json", "imagesTr", *[f"imagesTr/liver_{k}_0000.nii.gz" for k in range(3)],
        "imagesTs", "imagesTs/liver_132_0000.nii.gz", "labelsTr", *[f"labelsTr/liver_{k}.nii.gz" for k in range(3)],
    ]
    assert _listing(tmp_path / "out") == ["Dataset003_Liver", *[f"Dataset003_Liver/{p}" for p in _listing(dst)]]  # no temp folder left
    dj = json.loads((dst / "dataset.json").read_text())
    assert dj["channel_names"] == {"0": "CT"} and dj["labels"] == {"background": 0, "liver": 1, "tumour": 2}
    assert dj["numTraining"] == 3 and dj["file_ending"] == ".nii.gz"
    dataset, problems = validate_dataset(dst, progress=False)
    assert problems == [] and len(dataset.training) == 3 and len(dataset.test) == 1
    for k in range(3):
        # .nii.gz images are copied byte for byte; labels end up uint8 with voxels and geometry kept.
        assert (dst / "imagesTr" / f"liver_{k}_0000.nii.gz").read_bytes() == (src / "imagesTr" / f"liver_{k}.nii.gz").read_bytes()
        label, geom = read_image(dst / "labelsTr" / f"liver_{k}.nii.gz")
        src_label, src_geom = read_image(src / "labelsTr" / f"liver_{k}.nii.gz")
        assert label.dtype == np.uint8
        assert_same_grid(geom, src_geom)
        np.testing.assert_array_equal(label, src_label)
    assert read_header(dst / "labelsTr" / "liver_1.nii.gz")[2] == "8-bit unsigned integer"


def test_convert_lits(tmp_path):
    src = make_lits(tmp_path / "LiTS")
    (src / "Training Batch 1" / "notes.txt").write_text("ignored")
    dst = convert_lits(src, tmp_path / "Dataset004_LiTS", progress=False)
    assert _listing(dst / "labelsTr") == [f"liver_{k}.nii.gz" for k in range(3)]
    assert _listing(dst / "imagesTs") == ["liver_test_0_0000.nii.gz"]
    dataset, problems = validate_dataset(dst, progress=False)
    assert problems == [] and [c.case_id for c in dataset.training] == ["liver_0", "liver_1", "liver_2"]
    for k in range(3):
        image, geom = read_image(dst / "imagesTr" / f"liver_{k}_0000.nii.gz")
        src_image, src_geom = read_image(next(src.rglob(f"volume-{k}.nii")))
        assert image.dtype == np.int16
        assert_same_grid(geom, src_geom)
        np.testing.assert_array_equal(image, src_image)
        label, lgeom = read_image(dst / "labelsTr" / f"liver_{k}.nii.gz")
        assert label.dtype == np.uint8
        assert_same_grid(lgeom, src_geom)
        np.testing.assert_array_equal(label, _pair(k)[1])


def test_convert_real_example_cases(tmp_path):
    src = tmp_path / "Task03_Liver"
    cases = {"liver_117": "lits117_128cube", "liver_3": "dcmqi_ct3slice"}
    for sub in ("imagesTr", "labelsTr"):
        (src / sub).mkdir(parents=True)
    for case, example in cases.items():
        shutil.copyfile(examples.image_path(example), src / "imagesTr" / f"{case}.nii.gz")
        shutil.copyfile(examples.label_path(example), src / "labelsTr" / f"{case}.nii.gz")
    dj = {"labels": {"0": "background", "1": "liver", "2": "cancer"}, "modality": {"0": "CT"},
          "training": [{"image": f"./imagesTr/{c}.nii.gz", "label": f"./labelsTr/{c}.nii.gz"} for c in cases], "test": []}
    (src / "dataset.json").write_text(json.dumps(dj))
    dst = convert_msd(src, tmp_path / "Dataset005_Real", progress=False)
    assert validate_dataset(dst, progress=False)[1] == []
    assert not (dst / "imagesTs").exists()
    for case, example in cases.items():
        assert (dst / "labelsTr" / f"{case}.nii.gz").read_bytes() == examples.label_path(example).read_bytes()


def test_refuses_to_overwrite_unless_asked(tmp_path):
    src = make_msd(tmp_path / "Task03_Liver", n=2)
    dst = tmp_path / "Dataset003_Liver"
    dst.mkdir()
    convert_msd(src, dst, progress=False)  # an existing empty folder is fine
    (dst / "mine.txt").write_text("keep me")
    with pytest.raises(DatasetError, match="Dataset003_Liver: exists and is not empty.*overwrite=True"):
        convert_msd(src, dst, progress=False)
    assert (dst / "mine.txt").read_text() == "keep me"
    convert_msd(src, dst, progress=False, overwrite=True)
    assert not (dst / "mine.txt").exists() and validate_dataset(dst, progress=False)[1] == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["Dataset003_Liver", "Task03_Liver"]


@pytest.mark.parametrize("name", ["Liver", "Dataset3_Liver", "Dataset003_", "Dataset003_Li ver"])
def test_bad_output_name(tmp_path, name):
    src = make_msd(tmp_path / "Task03_Liver", n=1)
    with pytest.raises(ValueError, match="DatasetNNN_Name"):
        convert_msd(src, tmp_path / name, progress=False)
    assert not (tmp_path / name).exists()


def test_failure_midway_leaves_nothing(tmp_path, monkeypatch):
    src = make_msd(tmp_path / "Task03_Liver", n=3)
    real, calls = convert._copy_or_convert, []

    def flaky(kind, source, target):
        calls.append(source)
        if len(calls) == 4:
            raise OSError("disk full")
        real(kind, source, target)

    monkeypatch.setattr(convert, "_copy_or_convert", flaky)
    with pytest.raises(OSError, match="disk full"):
        convert_msd(src, tmp_path / "Dataset003_Liver", progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["Task03_Liver"]
    # With overwrite, a failure keeps the previous dataset as it was.
    monkeypatch.setattr(convert, "_copy_or_convert", real)
    dst = convert_msd(src, tmp_path / "Dataset003_Liver", progress=False)
    before = {p: p.read_bytes() for p in dst.rglob("*") if p.is_file()}
    monkeypatch.setattr(convert, "_copy_or_convert", flaky)
    calls.clear()
    with pytest.raises(OSError):
        convert_msd(src, dst, progress=False, overwrite=True)
    assert {p: p.read_bytes() for p in dst.rglob("*") if p.is_file()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["Dataset003_Liver", "Task03_Liver"]


def test_msd_layout_errors_name_the_source(tmp_path):
    src = tmp_path / "NotMSD"
    src.mkdir()
    with pytest.raises(DatasetError, match="NotMSD: does not look like an MSD Task03_Liver folder"):
        convert_msd(src, tmp_path / "Dataset003_Liver", progress=False)
    src = make_msd(tmp_path / "Task03_Liver", n=2)
    dj = json.loads((src / "dataset.json").read_text())
    (src / "labelsTr" / "liver_1.nii.gz").unlink()
    (src / "imagesTs" / "liver_132.nii.gz").unlink()
    with pytest.raises(DatasetError) as err:
        convert_msd(src, tmp_path / "Dataset003_Liver", progress=False)
    assert len(err.value.problems) == 2
    assert f"{(src / 'labelsTr' / 'liver_1.nii.gz').resolve()}: listed in" in err.value.problems[0]
    assert "liver_132.nii.gz: test image" in err.value.problems[1]
    (src / "dataset.json").write_text(json.dumps(dict(dj, labels={"0": "background", "1": "spleen"})))
    with pytest.raises(DatasetError, match="not the Task03_Liver labels"):
        convert_msd(src, tmp_path / "Dataset003_Liver", progress=False)
    assert not (tmp_path / "Dataset003_Liver").exists()


def test_lits_layout_errors_name_the_files(tmp_path):
    src = tmp_path / "LiTS"
    src.mkdir()
    with pytest.raises(DatasetError, match="LiTS: no LiTS volume-N.nii"):
        convert_lits(src, tmp_path / "Dataset004_LiTS", progress=False)
    make_lits(src)
    (src / "Training Batch 2" / "segmentation-2.nii").rename(src / "Training Batch 2" / "segmentation-7.nii")
    shutil.copyfile(src / "Training Batch 1" / "volume-0.nii", src / "volume-0.nii")
    with pytest.raises(DatasetError) as err:
        convert_lits(src, tmp_path / "Dataset004_LiTS", progress=False)
    text = "\n".join(err.value.problems)
    assert len(err.value.problems) == 3, text
    assert "volume-0.nii: duplicate of" in text
    assert "volume-2.nii: no matching segmentation-2.nii" in text
    assert "segmentation-7.nii: no matching volume-7.nii" in text
    assert not (tmp_path / "Dataset004_LiTS").exists()


def test_non_integer_label_is_refused(tmp_path):
    src = make_lits(tmp_path / "LiTS")
    image, label, geom = _pair(1)
    write_image(src / "Training Batch 1" / "segmentation-1.nii", label.astype(np.float32) * 0.5, geom)
    with pytest.raises(DatasetError, match="segmentation-1.nii: label values .* are not integers"):
        convert_lits(src, tmp_path / "Dataset004_LiTS", progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["LiTS"]


def test_truncated_source_is_refused(tmp_path):
    src = make_msd(tmp_path / "Task03_Liver", n=2)
    path = src / "imagesTr" / "liver_1.nii.gz"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(DatasetError, match="liver_1.nii.gz: truncated"):
        convert_msd(src, tmp_path / "Dataset003_Liver", progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["Task03_Liver"]
