"""MetaImage (.mha/.mhd) and NRRD (.nrrd/.nhdr) files with hostile header fields and damaged data.

A valid file is written by SimpleITK and split into its header fields and voxel bytes; a few
operations then rewrite fields, truncate, extend or corrupt the data. What the reader must do
follows from the final file (the oracle reads the header as its format defines it):

- untouched: the same voxels and geometry;
- a NaN/Inf or out-of-range voxel size, origin or direction, or data shorter than declared:
  refused;
- compressed data corrupted or extended, raw data extended, a geometry field rewritten to
  another valid value: the same voxels (or refused), never other voxels;
- anything else (sizes, types, encodings rewritten): refused, or a self-consistent image.
"""

from __future__ import annotations

import math
import re
import zlib

import numpy as np
import SimpleITK as sitk
from hypothesis import given, settings
from hypothesis import strategies as st

from autoliver.io.images import write_image
from autoliver.io.validate import read_checked_image
from fuzz.conftest import scaled
from fuzz.counting import count
from fuzz.strategies import check_image, flip_byte, hostile_floats, images, outcome, same_image, scratch

META_GEOMETRY = ("ElementSpacing", "Offset", "TransformMatrix", "CenterOfRotation", "AnatomicalOrientation")
META_OTHER = ("NDims", "DimSize", "ElementType", "CompressedData", "CompressedDataSize", "BinaryDataByteOrderMSB",
              "ElementNumberOfChannels", "HeaderSize", "ElementDataFile", "ObjectType")
NRRD_GEOMETRY = ("space directions", "space origin", "spacings", "space")
NRRD_OTHER = ("type", "dimension", "sizes", "encoding", "endian", "kinds", "byte skip", "line skip", "data file")
DATA_NAMES = ("data.raw", "../data.raw", "/etc/hostname", "a/b.raw", "", "LIST", "slice%03d.raw 0 3 1", "x" * 300, "a\x00b", ".", "LOCAL")

number = st.one_of(hostile_floats, st.integers(-3, 3), st.floats(-500, 500, allow_nan=False))
word = st.text(st.characters(min_codepoint=32, max_codepoint=126), max_size=12)


def _fmt(v) -> str:
    return repr(v) if isinstance(v, float) and not math.isfinite(v) else str(v)


numbers_text = st.lists(number, min_size=0, max_size=10).map(lambda vs: " ".join(_fmt(v) for v in vs))
ints_text = st.lists(st.one_of(st.integers(-2, 8), st.sampled_from((0, 2**31, 10**12))), min_size=0, max_size=6).map(lambda vs: " ".join(map(str, vs)))
vectors_text = st.lists(st.one_of(st.just("none"), st.lists(number, min_size=1, max_size=4).map(lambda vs: "(" + ",".join(_fmt(v) for v in vs) + ")")),
                        min_size=0, max_size=4).map(" ".join)
meta_values = {
    "ElementType": st.sampled_from(("MET_UCHAR", "MET_SHORT", "MET_FLOAT", "MET_DOUBLE", "MET_LONG", "MET_ULONG_LONG", "MET_NONE", "short", "")),
    "CompressedData": st.sampled_from(("True", "False", "maybe", "")), "BinaryDataByteOrderMSB": st.sampled_from(("True", "False", "")),
    "ElementDataFile": st.sampled_from(DATA_NAMES), "AnatomicalOrientation": st.sampled_from(("RAI", "LPS", "XYZ", "")),
}
nrrd_values = {
    "type": st.sampled_from(("short", "uchar", "float", "double", "int64", "block", "complex", "")),
    "encoding": st.sampled_from(("raw", "gzip", "bzip2", "ascii", "hex", "zz", "")), "endian": st.sampled_from(("little", "big", "middle")),
    "space": st.sampled_from(("left-posterior-superior", "RAS", "3D-right-handed", "nowhere")), "data file": st.sampled_from(DATA_NAMES),
    "kinds": st.sampled_from(("domain domain domain", "vector domain domain", "")), "space directions": vectors_text, "space origin": vectors_text,
}


def field_value(key: str):
    table = {**meta_values, **nrrd_values}
    if key in table:
        return st.one_of(table[key], word)
    if key in ("NDims", "DimSize", "dimension", "sizes", "ElementNumberOfChannels", "HeaderSize", "CompressedDataSize", "byte skip", "line skip"):
        return st.one_of(ints_text, word)
    return st.one_of(numbers_text, word)


def split_file(raw: bytes, nrrd: bool) -> tuple[list[tuple[str, str]], bytes]:
    """A SimpleITK-written file as (header fields in order, data bytes)."""
    if nrrd:
        head, data = raw.split(b"\n\n", 1)
        lines = head.decode().split("\n")
        return [("", lines[0])] + [tuple(line.split(": ", 1)) if ": " in line else ("#", line) for line in lines[1:]], data
    end = raw.index(b"ElementDataFile = LOCAL\n") + len(b"ElementDataFile = LOCAL\n")
    return [tuple(line.split(" = ", 1)) for line in raw[:end].decode().strip().split("\n")], raw[end:]


def join_file(fields: list[tuple[str, str]], data: bytes, nrrd: bool) -> bytes:
    if nrrd:
        lines = [v if k in ("", "#") else f"{k}: {v}" for k, v in fields]
        return ("\n".join(lines) + "\n\n").encode("latin-1") + data
    order = [f for f in fields if f[0] != "ElementDataFile"] + [f for f in fields if f[0] == "ElementDataFile"]
    return "".join(f"{k} = {v}\n" for k, v in order).encode("latin-1") + data


def _tokens(text: str) -> list[float | None]:
    out = []
    for t in re.split(r"[\s,()]+", text):
        if t and t != "none":
            try:
                out.append(float(t))
            except ValueError:
                out.append(None)
    return out


def must_refuse_geometry(fields: dict[str, str], nrrd: bool) -> bool:
    """The final header declares a non-finite or out-of-range voxel size or a non-finite origin
    or direction (as the format defines these fields)."""
    spacing_keys = ("spacings",) if nrrd else ("ElementSpacing",)
    finite_keys = ("space origin", "space directions") if nrrd else ("Offset", "TransformMatrix")
    for key in spacing_keys:
        values = _tokens(fields.get(key, ""))
        if all(v is not None for v in values) and any(not (math.isfinite(v) and v >= 1e-6) and not (nrrd and math.isnan(v)) for v in values):
            return True
    return any(v is not None and not math.isfinite(v) for key in finite_keys for v in _tokens(fields.get(key, "")))


operations = st.lists(st.one_of(
    st.tuples(st.just("set"), st.data()),
    st.tuples(st.just("delete"), st.integers(0, 30)),
    st.tuples(st.just("truncate"), st.floats(0, 0.999)),
    st.tuples(st.just("extend"), st.binary(min_size=1, max_size=40)),
    st.tuples(st.just("flip"), st.tuples(st.integers(0, 10**6), st.integers(1, 255))),
), min_size=0, max_size=3)


def _fuzz(nrrd: bool, image, compress: bool, detached: bool, ops) -> None:
    array, geometry = image
    suffix = (".nhdr" if detached else ".nrrd") if nrrd else (".mhd" if detached else ".mha")
    with scratch() as folder:
        whole = folder / f"whole{'.nrrd' if nrrd else '.mha'}"
        write_image(whole, array, geometry, compress=compress)
        fields, data = split_file(whole.read_bytes(), nrrd)
        whole.unlink()
        original_len, changed_meaning, same_voxels = len(data), False, True
        geometry_kept = True
        for op, arg in ops:
            if op == "set":
                keys = (NRRD_GEOMETRY + NRRD_OTHER) if nrrd else (META_GEOMETRY + META_OTHER)
                key = arg.draw(st.sampled_from(keys))
                value = arg.draw(field_value(key))
                fields = [f for f in fields if f[0] != key] + [(key, value)]
                changed_meaning |= key in (NRRD_OTHER if nrrd else META_OTHER)
                geometry_kept = False
            elif op == "delete":
                removable = [i for i, f in enumerate(fields) if f[0] not in ("", "#", "ElementDataFile")]
                if removable:
                    key = fields[removable[arg % len(removable)]][0]
                    fields = [f for f in fields if f[0] != key]
                    changed_meaning |= key in (NRRD_OTHER if nrrd else META_OTHER)
                    geometry_kept = False
            elif op == "truncate":
                data = data[: int(len(data) * arg)]
                same_voxels &= compress  # raw bytes appended later are other voxels
            elif op == "extend":
                data = data + arg
            elif op == "flip":
                data = flip_byte(data, *arg)
                same_voxels &= compress  # a flipped raw byte is another voxel value: nothing can tell
        final = dict(fields)
        path = folder / f"image{suffix}"
        if detached:
            name = "voxels.raw" + (".gz" if nrrd and compress else "")
            key = "data file" if nrrd else "ElementDataFile"
            final.setdefault(key, name)
            if key not in dict(fields) or dict(fields)[key] in ("LOCAL",):
                fields = [f for f in fields if f[0] != key] + [(key, name)]
                final[key] = name
            target = final[key].split(" ")[0] if final[key] else ""
            if target and "/" not in target and "\x00" not in target and target not in (".", "..", "LOCAL", "LIST") and len(target) < 200:
                (folder / target).write_bytes(data)
            path.write_bytes(join_file(fields, b"", nrrd))
        else:
            path.write_bytes(join_file(fields, data, nrrd))
        result, error = outcome(read_checked_image, path)
        count("nrrd" if nrrd else "mha")
        truncated = len(data) < original_len and not changed_meaning
        if must_refuse_geometry(final, nrrd) or truncated:
            assert error is not None, f"{path.name}: a hostile header or truncated data was read: {final}"
        elif result is not None and not changed_meaning and same_voxels:
            same_image(result, array, geometry, exact_geometry=geometry_kept)
        elif result is not None:
            check_image(result)


@settings(max_examples=scaled(400))
@given(image=images(), compress=st.booleans(), detached=st.booleans(), ops=operations)
def test_metaimage_reader_refuses_or_reads_correctly(image, compress, detached, ops):
    _fuzz(False, image, compress, detached, ops)


@settings(max_examples=scaled(400))
@given(image=images(), compress=st.booleans(), detached=st.booleans(), ops=operations)
def test_nrrd_reader_refuses_or_reads_correctly(image, compress, detached, ops):
    _fuzz(True, image, compress, detached, ops)


def test_corrupt_compressed_metaimage_is_refused_not_read_as_garbage(tmp_path):
    """The known case from the issue: a flipped byte inside the zlib stream."""
    array = np.arange(4 * 5 * 6, dtype=np.int16).reshape(4, 5, 6)
    sitk.WriteImage(sitk.GetImageFromArray(array), str(tmp_path / "a.mha"), True)
    fields, data = split_file((tmp_path / "a.mha").read_bytes(), nrrd=False)
    assert zlib.decompress(data) == array.tobytes()
    path = tmp_path / "corrupt.mha"
    path.write_bytes(join_file(fields, flip_byte(data, 10, 0xFF), nrrd=False))
    assert sitk.GetArrayFromImage(sitk.ReadImage(str(path))).sum() != array.sum()  # what ITK alone makes of it
    _, error = outcome(read_checked_image, path)
    assert error is not None and "compressed voxel data" in str(error)


def test_nan_offset_is_refused_where_itk_reads_it_as_zero(tmp_path):
    array = np.zeros((2, 3, 4), dtype=np.int16)
    sitk.WriteImage(sitk.GetImageFromArray(array), str(tmp_path / "a.mha"))
    fields, data = split_file((tmp_path / "a.mha").read_bytes(), nrrd=False)
    path = tmp_path / "nan_offset.mha"
    path.write_bytes(join_file([(k, "nan 0 0" if k == "Offset" else v) for k, v in fields], data, nrrd=False))
    assert sitk.ReadImage(str(path)).GetOrigin() == (0.0, 0.0, 0.0)  # ITK alone: silently 0
    _, error = outcome(read_checked_image, path)
    assert error is not None and "Offset" in str(error)
