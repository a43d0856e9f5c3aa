"""DICOM series (written with SimpleITK's writer) with missing, duplicated, truncated or
reordered slices and hostile slice positions, orientations, pixel spacings and sizes.

Tags are rewritten in the written files' bytes (implicit VR little endian, as the writer
stores them), so values the writer itself refuses (NaN, skewed orientations) can be tried.
The oracle: an untouched or merely reordered series reads back exactly; a missing inner slice,
a duplicated slice, a truncated slice, or a NaN/zero/negative/1e-38 pixel spacing or a
non-orthonormal orientation is refused; anything else is refused or self-consistent.
"""

from __future__ import annotations

import shutil
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import SimpleITK as sitk
from hypothesis import given, settings
from hypothesis import strategies as st

from autoliver.io.images import Geometry
from autoliver.io.validate import read_checked_image
from fuzz.conftest import scaled
from fuzz.counting import count
from fuzz.strategies import check_image, outcome, same_image, scratch

UID = "1.2.826.0.1.3680043.2.1125.1.77"
TAGS = {"pixel_spacing": (0x0028, 0x0030), "orientation": (0x0020, 0x0037), "position": (0x0020, 0x0032),
        "rows": (0x0028, 0x0010), "columns": (0x0028, 0x0011)}
HOSTILE_SPACING = ("nan\\0.8", "0\\0.8", "-0.7\\0.8", "1e-38\\0.8", "inf\\inf", "0.7", "", "abc\\1")
HOSTILE_ORIENTATION = ("1\\0\\0\\0.5\\1\\0", "2\\0\\0\\0\\1\\0", "1\\0\\0\\1\\0\\0", "nan\\0\\0\\0\\1\\0", "1\\0\\0", "")
HOSTILE_POSITION = ("nan\\0\\0", "0\\0", "1e308\\1e308\\1e308", "", "x\\y\\z")
MUST_REFUSE_SPACING = HOSTILE_SPACING[:5]


def write_series(folder: Path, array: np.ndarray, spacing: tuple[float, float, float]) -> list[Path]:
    """One file per slice (z, y, x array; spacing z, y, x mm), axial, identity orientation."""
    folder.mkdir(parents=True, exist_ok=True)
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    files = []
    for k in range(array.shape[0]):
        image = sitk.GetImageFromArray(array[k : k + 1])
        image.SetSpacing((spacing[2], spacing[1], spacing[0]))
        image.SetOrigin((-10.0, 20.0, 5.0 + spacing[0] * k))
        for key, value in {"0008|0060": "CT", "0020|000d": UID + ".0", "0020|000e": UID, "0008|0018": f"{UID}.{k + 1}",
                           "0020|0013": str(k + 1), "0008|0016": "1.2.840.10008.5.1.4.1.1.2"}.items():
            image.SetMetaData(key, value)
        files.append(folder / f"slice{k:03d}.dcm")
        writer.SetFileName(str(files[-1]))
        writer.Execute(image)
    return files


def patch_tag(path: Path, tag: tuple[int, int], value: str) -> None:
    """Rewrite one top-level element of an implicit-VR little-endian file."""
    data = path.read_bytes()
    key = struct.pack("<HH", *tag)
    i = data.find(key, 132 + 200)  # past the preamble and file meta group
    if i < 0:
        return
    n = struct.unpack("<I", data[i + 4 : i + 8])[0]
    encoded = value.encode("latin-1")
    if tag in (TAGS["rows"], TAGS["columns"]):
        encoded = struct.pack("<H", int(value) & 0xFFFF)
    elif len(encoded) % 2:
        encoded += b" "
    path.write_bytes(data[: i + 4] + struct.pack("<I", len(encoded)) + encoded + data[i + 8 + n :])


mutation = st.one_of(
    st.tuples(st.just("drop"), st.integers(0, 100)),
    st.tuples(st.just("duplicate"), st.integers(0, 100)),
    st.tuples(st.just("truncate"), st.tuples(st.integers(0, 100), st.floats(0.0, 0.95))),
    st.tuples(st.just("rename"), st.integers(0, 2**16)),
    st.tuples(st.just("pixel_spacing"), st.sampled_from(HOSTILE_SPACING)),
    st.tuples(st.just("orientation"), st.sampled_from(HOSTILE_ORIENTATION)),
    st.tuples(st.just("position"), st.tuples(st.integers(0, 100), st.sampled_from(HOSTILE_POSITION))),
    st.tuples(st.just("rows"), st.tuples(st.integers(0, 100), st.sampled_from(("0", "1", "65535")))),
)


@settings(max_examples=scaled(120))
@given(shape=st.tuples(st.integers(2, 5), st.integers(2, 6), st.integers(2, 6)), seed=st.integers(0, 2**32 - 1),
       spacing=st.tuples(st.sampled_from((1.0, 2.5, 5.0)), st.sampled_from((0.5, 0.7, 0.8)), st.sampled_from((0.5, 0.7, 0.8))),
       mutations=st.lists(mutation, max_size=2))
def test_dicom_series_reader_refuses_or_reads_correctly(shape, seed, spacing, mutations):
    array = np.random.default_rng(seed).integers(-1024, 2000, shape).astype(np.int16)
    geometry = Geometry(shape, spacing, (-10.0, 20.0, 5.0), (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0))
    with scratch() as root:
        folder = root / "series"
        files = write_series(folder, array, spacing)
        must_refuse, exact, moved = False, True, False  # moved: a slice position rewritten
        truncated = False  # a slice cut to its first bytes is no DICOM file: GDCM leaves it out, as if dropped
        slices = list(enumerate(files))  # (position index, file), whatever the files' names
        for kind, arg in mutations:
            if kind == "drop":
                if len(slices) > 1:
                    slices.pop(arg % len(slices))[1].unlink()
                    exact = False
            elif kind == "duplicate":
                k, f = slices[arg % len(slices)]
                slices.append((k, Path(shutil.copy(f, folder / f"copy{len(slices)}_{arg}.dcm"))))
                exact = False
            elif kind == "truncate":
                f = slices[arg[0] % len(slices)][1]
                data = f.read_bytes()
                f.write_bytes(data[: 200 + int((len(data) - 200) * arg[1])])
                exact, truncated = False, True
            elif kind == "rename":
                i = arg % len(slices)
                k, f = slices[i]
                slices[i] = (k, f.rename(folder / f"z{arg:05d}_{f.name}"))
            elif kind in ("pixel_spacing", "orientation"):
                for f in folder.iterdir():
                    patch_tag(f, TAGS[kind], arg)
                must_refuse |= arg in MUST_REFUSE_SPACING or arg in HOSTILE_ORIENTATION[:4]
                exact = False
            else:
                patch_tag(slices[arg[0] % len(slices)][1], TAGS[kind], arg[1])
                moved |= kind == "position"
                exact = False
        indices = sorted(k for k, _ in slices)
        unique = sorted(set(indices))
        gap = len(unique) >= 3 and len(set(np.diff(unique).tolist())) > 1  # two slices left cannot show a gap
        must_refuse |= not (moved or truncated) and (len(unique) != len(indices) or gap)
        result, error = outcome(read_checked_image, folder)
        count("dicom")
        if must_refuse:
            assert error is not None, f"a damaged series was read: {mutations}"
        elif result is not None and exact:
            same_image(result, array, geometry)
        elif result is not None:
            check_image(result)


def test_a_known_fatal_header_does_not_kill_the_process(tmp_path):
    """NDims = 100 aborts ITK's MetaImage reader (a native crash no try/except can catch); the
    header check refuses it before ITK runs, so the process lives and reports the file."""
    path = tmp_path / "fatal.mha"
    path.write_bytes(b"ObjectType = Image\nNDims = 100\nDimSize = " + b"2 " * 100 + b"\nElementType = MET_SHORT\nElementDataFile = LOCAL\n" + b"\0" * 64)
    code = ("import sys\nfrom autoliver.io.validate import read_checked_image\nfrom autoliver.core.errors import AutoliverError\n"
            f"try:\n    read_checked_image({str(path)!r})\nexcept AutoliverError as e:\n    print('refused:', e)\n    sys.exit(3)\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=Path(__file__).resolve().parents[2])
    assert done.returncode == 3, (done.returncode, done.stderr[-2000:])
    assert "refused:" in done.stdout and str(path) in done.stdout and "100 dimensions" in done.stdout
