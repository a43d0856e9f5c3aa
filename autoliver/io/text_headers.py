"""Checks of MetaImage (.mha/.mhd) and NRRD (.nrrd/.nhdr) headers before ITK reads them.

ITK trusts these headers: ``NDims = 100`` aborts the interpreter inside its reader, a header
declaring billions of voxels makes it allocate them, and a detached data file (``ElementDataFile``,
NRRD ``data file:``) may name any path on the machine. The header is plain text at the start of
the file; it is read (at most ``MAX_HEADER_BYTES``) and refused, with a message naming the file
and the field, unless: 1 to 4 dimensions, every size a positive integer, at most ``MAX_VOXELS``
voxels, finite positive spacing, and a detached data file that is a plain name beside the header.
"""

from __future__ import annotations

import math
from pathlib import Path

from autoliver.core.errors import ImageReadError

MAX_HEADER_BYTES = 64 * 1024
MAX_VOXELS = 2**31  # about 8 GiB of float32: far beyond any CT (LiTS: 512 x 512 x 1000 = 2.6e8)
MAX_DIMS = 4
META_SUFFIXES = (".mha", ".mhd")
NRRD_SUFFIXES = (".nrrd", ".nhdr")


def _header_lines(path: Path, nrrd: bool) -> list[str]:
    with open(path, "rb") as f:
        head = f.read(MAX_HEADER_BYTES)
    lines = []
    for raw in head.split(b"\n"):
        if nrrd and raw.strip() == b"":  # a blank line ends a NRRD header
            break
        try:
            line = raw.decode("ascii").strip()
        except UnicodeDecodeError:
            break  # the binary data has started
        lines.append(line)
        if not nrrd and line.lower().startswith("elementdatafile"):  # the last MetaImage field
            break
    return lines


def _fields(lines: list[str], sep: str) -> dict[str, str]:
    out = {}
    for line in lines:
        if sep in line and not line.startswith("#"):
            key, value = line.split(sep, 1)
            out[key.strip().lower()] = value.strip()
    return out


def _ints(path: Path, field: str, text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split()]
    except ValueError:
        raise ImageReadError(f"{path}: header field {field} = {text[:60]!r} is not a list of integers; re-export the image") from None
    return values


def _check_sizes(path: Path, field: str, sizes: list[int], ndims: int | None) -> None:
    if ndims is not None and not 1 <= ndims <= MAX_DIMS:
        raise ImageReadError(f"{path}: header declares {ndims} dimensions; a CT volume has 3 (at most {MAX_DIMS}): re-export the image")
    if ndims is not None and len(sizes) != ndims:
        raise ImageReadError(f"{path}: header field {field} lists {len(sizes)} sizes for {ndims} dimensions; re-export the image")
    if not sizes or any(s < 1 for s in sizes):
        raise ImageReadError(f"{path}: header field {field} = {sizes} has a size below 1; re-export the image")
    total = math.prod(sizes)
    if total > MAX_VOXELS:
        raise ImageReadError(f"{path}: header declares {' x '.join(map(str, sizes))} = {total} voxels, more than {MAX_VOXELS} "
                             "(far beyond a CT); the file is damaged or not a CT volume")


def _check_spacing(path: Path, field: str, text: str | None, allow_nan: bool = False) -> None:
    """Voxel sizes must be finite and positive (NRRD marks a non-spatial axis with nan)."""
    if text is None:
        return
    try:
        values = [float(v) for v in text.split()]
    except ValueError:
        raise ImageReadError(f"{path}: header field {field} = {text[:60]!r} is not a list of numbers; fix the header") from None
    if any(not (allow_nan and math.isnan(v)) and not (math.isfinite(v) and v > 0) for v in values):
        raise ImageReadError(f"{path}: header field {field} = {text[:60]!r} holds a zero, negative or non-finite voxel size; fix the header")


def _check_detached(path: Path, field: str, value: str) -> None:
    """A detached data file must be a plain file name in the header's own folder."""
    name = value.split()[0] if value.split() else value
    if name.upper() in ("LOCAL",) or not name:
        return
    if "%" in name or name.upper() == "LIST":
        raise ImageReadError(f"{path}: header field {field} = {value[:60]!r} (a list or pattern of data files) is not supported; "
                             "save the image as one file (.nii.gz or .mha)")
    candidate = Path(name)
    if candidate.is_absolute() or len(candidate.parts) != 1 or name in (".", ".."):
        raise ImageReadError(f"{path}: header field {field} = {name!r} points outside the header's folder; keep the data file "
                             "beside its header (a plain file name) or save the image as one file")
    if not (path.parent / name).is_file():
        raise ImageReadError(f"{path}: its data file {name!r} is missing beside the header; copy it there")


def check_text_header(path: str | Path) -> None:
    """Refuse a MetaImage or NRRD file whose header ITK could not survive or would misread
    (see the module docstring); other files pass untouched."""
    path = Path(path)
    name = path.name.lower()
    if name.endswith(META_SUFFIXES):
        f = _fields(_header_lines(path, nrrd=False), "=")
        ndims = _ints(path, "NDims", f["ndims"])[0] if "ndims" in f and f["ndims"] else None
        if ndims is None or "dimsize" not in f:
            raise ImageReadError(f"{path}: not a MetaImage header (no NDims or DimSize); re-export the image")
        _check_sizes(path, "DimSize", _ints(path, "DimSize", f["dimsize"]), ndims)
        _check_spacing(path, "ElementSpacing", f.get("elementspacing") or f.get("elementsize"))
        if "elementdatafile" not in f:
            raise ImageReadError(f"{path}: MetaImage header has no ElementDataFile; re-export the image")
        _check_detached(path, "ElementDataFile", f["elementdatafile"])
    elif name.endswith(NRRD_SUFFIXES):
        lines = _header_lines(path, nrrd=True)
        if not lines or not lines[0].startswith("NRRD"):
            raise ImageReadError(f"{path}: not a NRRD file (no NRRD magic); re-export the image")
        f = _fields(lines[1:], ":")
        if "dimension" not in f or "sizes" not in f:
            raise ImageReadError(f"{path}: NRRD header has no dimension or sizes; re-export the image")
        ndims = _ints(path, "dimension", f["dimension"])[0]
        _check_sizes(path, "sizes", _ints(path, "sizes", f["sizes"]), ndims)
        _check_spacing(path, "spacings", f.get("spacings"), allow_nan=True)
        for key in ("data file", "datafile"):
            if key in f:
                _check_detached(path, key, f[key])
