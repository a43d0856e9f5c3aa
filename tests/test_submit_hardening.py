"""`autoliver submit --check` on hostile and subtly wrong submissions: zip bombs (declared and
lying), damaged members, escaping names, and segmentations whose stored voxel type is not uint8
labels even when their values look right."""

import struct

import numpy as np
import pytest
from zip_crafting import DEFLATED, Member, deflated, stored, write_zip, zeros_deflated

from autoliver.cli import main
from autoliver.core.errors import DatasetError
from autoliver.evaluate import submit
from autoliver.evaluate.submit import MAX_SEGMENTATION_BYTES, build_submission, check_submission
from autoliver.io.archive import CHUNK
from autoliver.io.images import Geometry, write_image

G = Geometry(shape=(4, 10, 12), spacing=(2.0, 0.8, 0.8), origin=(0.0, 0.0, 0.0), direction=(1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0))


def labels() -> np.ndarray:
    seg = np.zeros(G.shape, np.uint8)
    seg[1:3, 2:8, 2:9] = 1
    seg[2, 4:6, 4:6] = 2
    return seg


def nifti_bytes(tmp_path, array, name="seg.nii") -> bytes:
    path = tmp_path / "src" / name
    write_image(path, array, G, compress=False)
    return path.read_bytes()


@pytest.fixture()
def test_dir(tmp_path):
    folder = tmp_path / "LiTS_test"
    write_image(folder / "test-volume-0.nii", np.full(G.shape, -100, np.int16), G, compress=False)
    return folder


@pytest.fixture()
def counted(monkeypatch):
    """Bytes the check inflates, member by member."""
    produced = {}
    original = submit.iter_member

    def counting(path, member, *a, **k):
        for data in original(path, member, *a, **k):
            produced[member.name] = produced.get(member.name, 0) + len(data)
            yield data

    monkeypatch.setattr(submit, "iter_member", counting)
    return produced


def test_valid_zip_passes(tmp_path, test_dir, counted):
    zpath = write_zip(tmp_path / "ok.zip", [deflated("test-segmentation-0.nii", nifti_bytes(tmp_path, labels()))])
    assert check_submission(zpath, test_dir, progress=False) == []
    assert check_submission(zpath, n_cases=1, progress=False) == []
    assert counted["test-segmentation-0.nii"] == 2 * (352 + labels().size)  # inflated once per check, in full


def test_declared_gigabyte_bomb_is_reported_not_inflated(tmp_path, test_dir, counted):
    good = deflated("test-segmentation-1.nii", nifti_bytes(tmp_path, labels()))
    zpath = write_zip(tmp_path / "bomb.zip", [zeros_deflated("test-segmentation-0.nii", 64), good])  # 1 GiB in ~1 MB
    assert zpath.stat().st_size < 2 << 20
    problems = check_submission(zpath, n_cases=2, progress=False)
    assert len(problems) == 1, problems
    assert "test-segmentation-0.nii: declares 1073741824 bytes" in problems[0] and "not extracted" in problems[0]
    assert f"{MAX_SEGMENTATION_BYTES // (1 << 20)} MiB" in problems[0]
    assert "test-segmentation-0.nii" not in counted and counted["test-segmentation-1.nii"] == good.size  # the other case is still checked
    with_volume = check_submission(zpath, test_dir, progress=False)  # against the volume: far more than its 832 uint8 bytes
    assert any("declares 1073741824 bytes" in p and "832 bytes" in p for p in with_volume), with_volume


def test_lying_bomb_stops_at_the_declared_size(tmp_path, test_dir, counted):
    expected = 352 + int(np.prod(G.shape))
    zpath = write_zip(tmp_path / "liar.zip", [zeros_deflated("test-segmentation-0.nii", 64, declared=expected)])
    (problem,) = check_submission(zpath, test_dir, progress=False)
    assert "'test-segmentation-0.nii': inflates past its declared size of 832 bytes" in problem
    assert counted.get("test-segmentation-0.nii", 0) <= expected <= CHUNK


def test_damaged_members_are_problem_lines(tmp_path, test_dir):
    good = deflated("test-segmentation-0.nii", nifti_bytes(tmp_path, labels()))
    bad_crc = Member(good.name, good.data, good.crc ^ 0xFF, good.size, DEFLATED)
    broken = Member("test-segmentation-1.nii", b"\xff" + good.data[1:], good.crc, good.size, DEFLATED)
    zpath = write_zip(tmp_path / "damaged.zip", [bad_crc, broken])
    problems = check_submission(zpath, n_cases=2, progress=False)
    assert len(problems) == 2
    assert "member 'test-segmentation-0.nii': bad CRC" in problems[0]
    assert "member 'test-segmentation-1.nii': broken deflate stream" in problems[1]
    assert main(["submit", "--check", "-i", str(zpath), "-t", str(test_dir), "--no-progress"]) == 1


def test_escaping_names_refuse_the_zip(tmp_path):
    content = nifti_bytes(tmp_path, labels())
    zpath = write_zip(tmp_path / "slip.zip", [stored("../test-segmentation-0.nii", content), stored("test-segmentation-0.nii", content),
                                              stored("test-segmentation-0.nii", content)])
    problems = check_submission(zpath, n_cases=1, progress=False)
    assert any("'..'" in p for p in problems) and any("has the same name" in p for p in problems)
    assert not (tmp_path / "test-segmentation-0.nii").exists()


def _patched(content: bytes, offset: int, fmt: str, value) -> bytes:
    out = bytearray(content)
    struct.pack_into(fmt, out, offset, value)
    return bytes(out)


@pytest.mark.parametrize("kind, fragments", [
    ("float32 labels", ["32-bit float", "float32 in the NIfTI header"]),
    ("all NaN", ["float32 in the NIfTI header", "NaN/Inf voxels"]),
    ("non-integer", ["float32 in the NIfTI header", "non-integer values"]),
    ("scaled uint8", ["value scaling (scl_slope 2"]),
])
def test_stored_type_not_just_values(tmp_path, test_dir, kind, fragments):
    seg = labels()
    if kind == "float32 labels":
        content = nifti_bytes(tmp_path, seg.astype(np.float32))  # values 0/1/2, but not uint8
    elif kind == "all NaN":
        content = nifti_bytes(tmp_path, np.full(G.shape, np.nan, np.float32))
    elif kind == "non-integer":
        content = nifti_bytes(tmp_path, seg.astype(np.float32) * 0.5)
    else:
        content = _patched(nifti_bytes(tmp_path, seg), 112, "<f", 2.0)  # scl_slope
    assert (struct.unpack_from("<h", content, 70)[0] == 2) == (kind == "scaled uint8")  # NIfTI datatype 2: uint8
    zpath = write_zip(tmp_path / "typed.zip", [deflated("test-segmentation-0.nii", content)])
    problems = check_submission(zpath, test_dir, progress=False)
    for fragment in fragments:
        assert any("test-segmentation-0.nii" in p and fragment in p for p in problems), (fragment, problems)
    folder = tmp_path / "folder"
    folder.mkdir()
    (folder / "test-segmentation-0.nii").write_bytes(content)
    in_folder = check_submission(folder, test_dir, progress=False)
    assert [p.replace(str(folder), str(zpath)) for p in in_folder] == problems  # a folder is checked the same way


def test_build_refuses_a_nan_prediction(tmp_path, test_dir):
    pred = tmp_path / "pred"
    write_image(pred / "test-volume-0.nii.gz", np.full(G.shape, np.nan, np.float32), G)  # ITK would read it as all background
    with pytest.raises(DatasetError, match="holds 480 NaN/Inf voxels"):
        build_submission(pred, tmp_path / "s.zip", test_dir, progress=False)
    assert not (tmp_path / "s.zip").exists()
