"""Checks of MetaImage (.mha/.mhd) and NRRD (.nrrd/.nhdr) headers before ITK reads them.

ITK trusts these headers: ``NDims = 100`` aborts the interpreter inside its reader, a header
declaring billions of voxels makes it allocate them, a detached data file (``ElementDataFile``,
NRRD ``data file:``) may name any path on the machine, a NaN origin is read as 0 and a corrupt
zlib stream as garbage voxels. The header is plain text at the start of the file; it is read (at
most ``MAX_HEADER_BYTES``) and refused, with a message naming the file and the field, unless:
1 to 4 dimensions, every size a positive integer, a voxel count this machine can hold
(``autoliver.io.limits``), voxel sizes within ``MIN_SPACING_MM``..``MAX_SPACING_MM``, a finite
origin, finite orthonormal direction cosines, a detached data file that is a plain name beside
the header, and voxel data of exactly the declared size (``autoliver.io.text_data``).
"""

from __future__ import annotations

import math
import re
from pathlib import Path

from autoliver.core.errors import ImageReadError
from autoliver.core.geometry import direction_problems, spacing_problems
from autoliver.io.limits import MAX_VOXELS, voxel_budget_problem
from autoliver.io.text_data import BZIP2, RAW, ZLIB, check_data_size

MAX_HEADER_BYTES = 64 * 1024
__all__ = ["MAX_VOXELS", "check_text_header"]
MAX_DIMS = 4
META_SUFFIXES = (".mha", ".mhd")
NRRD_SUFFIXES = (".nrrd", ".nhdr")


META_ITEMSIZE = {"MET_CHAR": 1, "MET_UCHAR": 1, "MET_SHORT": 2, "MET_USHORT": 2, "MET_INT": 4, "MET_UINT": 4, "MET_LONG": 4,
                 "MET_ULONG": 4, "MET_LONG_LONG": 8, "MET_ULONG_LONG": 8, "MET_FLOAT": 4, "MET_DOUBLE": 8}
NRRD_ITEMSIZE = {
    **dict.fromkeys(("signed char", "int8", "int8_t", "uchar", "unsigned char", "uint8", "uint8_t"), 1),
    **dict.fromkeys(("short", "short int", "signed short", "signed short int", "int16", "int16_t", "ushort", "unsigned short",
                     "unsigned short int", "uint16", "uint16_t"), 2),
    **dict.fromkeys(("int", "signed int", "int32", "int32_t", "uint", "unsigned int", "uint32", "uint32_t", "float"), 4),
    **dict.fromkeys(("longlong", "long long", "long long int", "signed long long", "signed long long int", "int64", "int64_t", "ulonglong",
                     "unsigned long long", "unsigned long long int", "uint64", "uint64_t", "double"), 8),
}
NRRD_ENCODINGS = {"raw": RAW, "gzip": ZLIB, "gz": ZLIB, "bzip2": BZIP2, "bz2": BZIP2}
_FIX = "fix the header or re-export the image"


def _header(path: Path, nrrd: bool) -> tuple[list[str], int | None]:
    """The header's lines and where the attached data starts (None if the header does not end
    within ``MAX_HEADER_BYTES``)."""
    with open(path, "rb") as f:
        head = f.read(MAX_HEADER_BYTES)
    lines, pos = [], 0
    while pos < len(head):
        end = head.find(b"\n", pos)
        if end < 0:
            return lines, None
        raw, pos = head[pos:end], end + 1
        if nrrd and raw.strip() == b"":  # a blank line ends a NRRD header
            return lines, pos
        try:
            line = raw.decode("ascii").strip()
        except UnicodeDecodeError:
            return lines, None  # binary data before the header ended
        lines.append(line)
        if not nrrd and line.lower().startswith("elementdatafile"):  # the last MetaImage field
            return lines, pos
    return lines, None
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


def _check_sizes(path: Path, field: str, sizes: list[int], ndims: int | None, itemsize: int = 4) -> None:
    if ndims is not None and not 1 <= ndims <= MAX_DIMS:
        raise ImageReadError(f"{path}: header declares {ndims} dimensions; a CT volume has 3 (at most {MAX_DIMS}): re-export the image")
    if ndims is not None and len(sizes) != ndims:
        raise ImageReadError(f"{path}: header field {field} lists {len(sizes)} sizes for {ndims} dimensions; re-export the image")
    if not sizes or any(s < 1 for s in sizes):
        raise ImageReadError(f"{path}: header field {field} = {sizes} has a size below 1; re-export the image")
    problem = voxel_budget_problem(sizes, itemsize)
    if problem:
        raise ImageReadError(f"{path}: header {problem}")


def _numbers(path: Path, field: str, text: str) -> list[float]:
    try:
        return [float(v) for v in re.split(r"[\s,()]+", text) if v]
    except ValueError:
        raise ImageReadError(f"{path}: header field {field} = {text[:60]!r} is not a list of numbers; {_FIX}") from None


def _check_spacing(path: Path, field: str, text: str | None, allow_nan: bool = False) -> None:
    """Voxel sizes must be finite and plausible (NRRD marks a non-spatial axis with nan)."""
    if text is None:
        return
    values = [v for v in _numbers(path, field, text) if not (allow_nan and math.isnan(v))]
    if spacing_problems(values):
        raise ImageReadError(f"{path}: header field {field} = {text[:60]!r} holds a zero, negative, out-of-range or non-finite voxel size; "
                             "fix the header (voxel size) and re-export the image")


def _check_finite(path: Path, field: str, text: str | None, n: int | None = None) -> list[float]:
    """An origin or direction field: finite numbers (``n`` of them when given)."""
    if text is None:
        return []
    values = _numbers(path, field, text)
    if not all(math.isfinite(v) for v in values) or (n is not None and len(values) != n):
        raise ImageReadError(f"{path}: header field {field} = {text[:60]!r} is not {n or 'a list of'} finite numbers; "
                             "fix the image's position/orientation and re-export it")
    return values


def _check_direction(path: Path, field: str, text: str | None, ndims: int) -> None:
    values = _check_finite(path, field, text, ndims * ndims)
    if values and direction_problems(values):
        raise ImageReadError(f"{path}: header field {field} = {text[:80]!r} is not an orthonormal direction matrix (scaled, skewed "
                             "or degenerate axes); fix the image's orientation and re-export it")


def _check_nrrd_directions(path: Path, text: str | None, ndims: int | None) -> None:
    """``space directions``: one vector per axis (``none`` only for the component axis of a 4D
    vector image); the spatial ones finite, of a plausible length, and orthogonal."""
    if text is None:
        return
    if "none" in text.lower().split() and (ndims or 0) < 4:
        raise ImageReadError(f"{path}: header field space directions = {text[:80]!r} gives an axis of a {ndims}D volume no voxel size; "
                             "fix the header (voxel size) and re-export the image")
    vectors = []
    for item in re.findall(r"\([^)]*\)|none", text):
        if item != "none":
            vectors.append(_check_finite(path, "space directions", item.strip("()")))
    lengths = [math.sqrt(sum(c * c for c in v)) for v in vectors]
    if spacing_problems(lengths) or len({len(v) for v in vectors}) > 1:
        raise ImageReadError(f"{path}: header field space directions = {text[:80]!r} holds a zero, out-of-range or non-finite voxel size; "
                             "fix the header (voxel size) and re-export the image")
    units = [[c / n for c in v] for v, n in zip(vectors, lengths)]
    if any(abs(sum(a * b for a, b in zip(u, w))) > 1e-3 for i, u in enumerate(units) for w in units[i + 1 :]):
        raise ImageReadError(f"{path}: header field space directions = {text[:80]!r} are not orthogonal (skewed axes); "
                             "fix the image's orientation and re-export it")


def _check_detached(path: Path, field: str, value: str) -> None:
    """A detached data file must be a plain file name in the header's own folder."""
    name = value.split()[0] if value.split() else ""
    if name.upper() == "LOCAL":
        return
    if not name:
        raise ImageReadError(f"{path}: header field {field} is empty; name the data file beside the header (or save the image as one file)")
    if "%" in name or name.upper() == "LIST":
        raise ImageReadError(f"{path}: header field {field} = {value[:60]!r} (a list or pattern of data files) is not supported; "
                             "save the image as one file (.nii.gz or .mha)")
    if "\x00" in name or len(name) > 255:
        raise ImageReadError(f"{path}: header field {field} = {name[:60]!r} is not a usable file name; re-export the image")
    candidate = Path(name)
    if candidate.is_absolute() or len(candidate.parts) != 1 or name in (".", ".."):
        raise ImageReadError(f"{path}: header field {field} = {name!r} points outside the header's folder; keep the data file "
                             "beside its header (a plain file name) or save the image as one file")
    if not (path.parent / name).is_file():
        raise ImageReadError(f"{path}: its data file {name!r} is missing beside the header; copy it there")


def _positive_int(path: Path, field: str, text: str | None, default: int) -> int:
    if text is None:
        return default
    values = _ints(path, field, text)
    if len(values) != 1 or values[0] < 0:
        raise ImageReadError(f"{path}: header field {field} = {text[:60]!r} is not a non-negative integer; {_FIX}")
    return values[0]


def _check_meta(path: Path) -> None:
    lines, data_start = _header(path, nrrd=False)
    f = _fields(lines, "=")
    ndims = _ints(path, "NDims", f["ndims"])[0] if f.get("ndims") else None
    if ndims is None or "dimsize" not in f:
        raise ImageReadError(f"{path}: not a MetaImage header (no NDims or DimSize); re-export the image")
    sizes = _ints(path, "DimSize", f["dimsize"])
    channels = _positive_int(path, "ElementNumberOfChannels", f.get("elementnumberofchannels"), 1)
    element = f.get("elementtype", "").upper()
    itemsize = META_ITEMSIZE.get(element)
    _check_sizes(path, "DimSize", sizes, ndims, (itemsize or 8) * max(channels, 1))
    if channels < 1:
        raise ImageReadError(f"{path}: header field ElementNumberOfChannels is 0; {_FIX}")
    _check_spacing(path, "ElementSpacing", f.get("elementspacing") or f.get("elementsize"))
    for key, name in (("offset", "Offset"), ("origin", "Origin"), ("position", "Position"), ("centerofrotation", "CenterOfRotation")):
        _check_finite(path, name, f.get(key), ndims)
    for key, name in (("transformmatrix", "TransformMatrix"), ("rotation", "Rotation"), ("orientation", "Orientation")):
        _check_direction(path, name, f.get(key), ndims)
    if "elementdatafile" not in f or data_start is None:
        raise ImageReadError(f"{path}: MetaImage header has no ElementDataFile; re-export the image")
    _check_detached(path, "ElementDataFile", f["elementdatafile"])
    if itemsize is None:
        raise ImageReadError(f"{path}: header field ElementType = {element[:40]!r} is not a MetaImage voxel type; {_FIX}")
    local = f["elementdatafile"].split()[0].upper() == "LOCAL"
    skip = _positive_int(path, "HeaderSize", f.get("headersize"), 0) if f.get("headersize", "0").strip() != "-1" else -1
    if skip:
        return  # data placed by HeaderSize: ITK's reader checks it
    compressed = f.get("compresseddata", "false").lower() == "true"
    data = path if local else path.parent / f["elementdatafile"].split()[0]
    offset = data_start if local else 0
    check_data_size(path, data, offset, math.prod(sizes) * itemsize * channels, ZLIB if compressed else RAW)


def _check_nrrd(path: Path) -> None:
    lines, data_start = _header(path, nrrd=True)
    if not lines or not lines[0].startswith("NRRD"):
        raise ImageReadError(f"{path}: not a NRRD file (no NRRD magic); re-export the image")
    f = _fields(lines[1:], ":")
    if "dimension" not in f or "sizes" not in f:
        raise ImageReadError(f"{path}: NRRD header has no dimension or sizes; re-export the image")
    ndims = _ints(path, "dimension", f["dimension"])[0] if f["dimension"] else None
    itemsize = NRRD_ITEMSIZE.get(" ".join(f.get("type", "").lower().split()))
    _check_sizes(path, "sizes", _ints(path, "sizes", f["sizes"]), ndims, itemsize or 8)
    _check_spacing(path, "spacings", f.get("spacings"), allow_nan=(ndims or 0) >= 4)  # nan: a 4D image's component axis
    _check_finite(path, "space origin", f.get("space origin"))
    _check_nrrd_directions(path, f.get("space directions"), ndims)
    detached = next((f[k] for k in ("data file", "datafile") if k in f), None)
    if detached is not None:
        _check_detached(path, "data file", detached)
    encoding = NRRD_ENCODINGS.get(f.get("encoding", "").lower())
    skips = any(f.get(k, "0").strip() not in ("", "0") for k in ("byte skip", "byteskip", "line skip", "lineskip"))
    if encoding is None or itemsize is None or skips or (detached is None and data_start is None):
        return  # text encodings, skipped bytes: teem's reader counts what it reads
    data = path if detached is None or detached.split()[0].upper() == "LOCAL" else path.parent / detached.split()[0]
    offset = data_start if data == path else 0
    check_data_size(path, data, offset or 0, math.prod(_ints(path, "sizes", f["sizes"])) * itemsize, encoding)


def check_text_header(path: str | Path) -> None:
    """Refuse a MetaImage or NRRD file whose header ITK could not survive or would misread, or
    whose voxel data is not what the header declares (see the module docstring); other files
    pass untouched."""
    path = Path(path)
    name = path.name.lower()
    try:
        if name.endswith(META_SUFFIXES):
            _check_meta(path)
        elif name.endswith(NRRD_SUFFIXES):
            _check_nrrd(path)
    except OSError as exc:
        raise ImageReadError(f"{path}: cannot be read ({exc.strerror or exc}); check the file and its permissions") from None
