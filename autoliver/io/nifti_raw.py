"""Raw NIfTI header checks that ITK's reader hides.

ITK's NIfTI reader fills the missing part of a truncated file with zeros, replaces a zero or
NaN voxel size by 1.0, reads NaN/Inf voxels as 0 and reads files whose header is not a valid
NIfTI header at all, all without an error. These functions parse the header with nibabel
(``Nifti1Header`` / ``Nifti2Header``, either byte order), refuse headers that are not NIfTI or
declare an impossible image, and stream the raw bytes (never the whole image) so validation and
reading can report such files.

Refused, with an ``ImageReadError`` naming the file and the field (``check_nifti_header``):

- ``sizeof_hdr`` neither 348 (NIfTI-1) nor 540 (NIfTI-2) in either byte order, or a magic other
  than ``n+1`` / ``n+2`` (single-file NIfTI), or fewer bytes than a header;
- ``dim[0]`` outside 1..7, a dimension size below 1, more than ``MAX_VOXELS`` voxels, an unknown
  ``datatype`` (all before anything is allocated);
- ``vox_offset`` NaN, infinite, negative, fractional or above ``MAX_VOX_OFFSET``;
- (``check_nifti_complete``) a ``vox_offset`` inside the header and its 4 extension bytes (below
  352 / 544) in a file that does not hold its voxels right after the header: ITK then reads them
  from the header's end, 4 bytes early;
- a spatial ``pixdim`` (voxel size) that is NaN, infinite or outside
  ``[MIN_PIXDIM, MAX_PIXDIM]`` (zero, negative, 1e-38...);
- a NaN/Inf in the quaternion/offset (``qform_code > 0``) or the ``srow_*`` rows
  (``sform_code > 0``): the transforms ITK uses for origin and direction;
- an intensity scaling readers disagree on: ``scl_slope`` 0 with a non-zero ``scl_inter`` (the
  NIfTI standard: no scaling; ITK adds the intercept), or a usable ``scl_slope`` with a NaN/Inf
  ``scl_inter`` (ITK drops it, nibabel refuses), or a slope so small or large (beyond 1e±30)
  that ITK ignores it while nibabel applies it.

The voxel count is checked against what this machine can hold (``autoliver.io.limits``).
"""

from __future__ import annotations

import gzip
import math
import os
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from nibabel.nifti1 import Nifti1Header
from nibabel.nifti2 import Nifti2Header

from autoliver.core.errors import ImageReadError
from autoliver.core.geometry import MAX_SPACING_MM, MIN_SPACING_MM
from autoliver.io.limits import MAX_VOXELS, voxel_budget_problem

__all__ = ["MAX_VOXELS", "MAX_VOX_OFFSET", "MIN_PIXDIM", "MAX_PIXDIM", "NiftiHeader", "check_nifti_header", "check_nifti_complete",
           "nifti_header_spacing", "nifti_nonfinite_count"]

MAX_VOX_OFFSET = 2**31 - 1  # ITK's NIfTI-1 reader keeps the data offset in a C int
MIN_PIXDIM, MAX_PIXDIM = MIN_SPACING_MM, MAX_SPACING_MM  # plausible voxel sizes (mm, or m / um by xyzt_units)

_HEADER_CLASSES = ((Nifti1Header, b"n+1", b"ni1"), (Nifti2Header, b"n+2", b"ni2"))  # class, single-file magic, pair magic
_QFORM_FIELDS = ("quatern_b", "quatern_c", "quatern_d", "qoffset_x", "qoffset_y", "qoffset_z")
_SFORM_FIELDS = ("srow_x", "srow_y", "srow_z")
_HEAD_BYTES = max(cls.sizeof_hdr for cls, _, _ in _HEADER_CLASSES)  # 540


def _suffix(path: Path) -> str | None:
    name = path.name.lower()
    return ".nii.gz" if name.endswith(".nii.gz") else ".nii" if name.endswith(".nii") else None


@dataclass(frozen=True)
class NiftiHeader:
    """A parsed, structurally valid NIfTI header and what autoliver needs of it."""

    header: Nifti1Header | Nifti2Header  # nibabel's view of the raw header (check=False: nothing fixed)
    shape: tuple[int, ...]  # dim[1..ndim], (x, y, z, ...)
    dtype: np.dtype  # voxel type from ``datatype``, in the header's byte order
    pixdim: tuple[float, ...]  # pixdim[1..ndim], raw
    offset: int  # where the voxels start: vox_offset, at least the header size (as ITK)

    @property
    def version(self) -> int:
        return 2 if isinstance(self.header, Nifti2Header) else 1

    @property
    def n_voxels(self) -> int:
        return math.prod(self.shape)

    @property
    def n_bytes(self) -> int:
        """Bytes the (decompressed) file must hold: header and extensions, then every voxel."""
        return self.offset + self.n_voxels * self.dtype.itemsize


class _NotNifti(ValueError):
    """The bytes are not a usable NIfTI header; the message says why (without the file name)."""


def _fix_hint(text: str) -> str:
    return f"{text}; the file is damaged or was written wrongly: re-export it (or re-copy it)"


def _parse(head: bytes) -> NiftiHeader:
    """Parse the first bytes of a NIfTI file (up to 540) with nibabel; raise _NotNifti if they
    are not a single-file NIfTI-1/-2 header or declare an image that cannot exist."""
    header = None
    for cls, single, pair in _HEADER_CLASSES:
        size = cls.sizeof_hdr
        if len(head) < size:
            continue
        for order in ("<", ">"):
            candidate = cls(head[:size], endianness=order, check=False)
            if int(candidate["sizeof_hdr"]) == size:
                header, magics = candidate, (single, pair)
                break
        if header is not None:
            break
    if header is None:
        if len(head) < Nifti1Header.sizeof_hdr:
            raise _NotNifti(f"not a valid NIfTI header: only {len(head)} bytes, fewer than the 348 of a NIfTI-1 header; "
                            "the file is truncated or not NIfTI: re-copy or re-export it")
        got = struct.unpack("<i", head[:4])[0]
        raise _NotNifti(_fix_hint(f"not a valid NIfTI header: sizeof_hdr is {got} (byte-swapped {struct.unpack('>i', head[:4])[0]}), "
                                  "not 348 (NIfTI-1) or 540 (NIfTI-2) in either byte order"))
    magic = np.asarray(header["magic"]).item()
    if magic != magics[0]:
        what = "the header of a .hdr/.img pair, not of a single .nii file" if magic == magics[1] else f"not {magics[0]!r}"
        raise _NotNifti(_fix_hint(f"not a valid NIfTI header: magic is {magic!r}, {what}"))

    dim = [int(d) for d in header["dim"]]
    ndim = dim[0]
    if not 1 <= ndim <= 7:
        raise _NotNifti(_fix_hint(f"not a valid NIfTI header: dim[0] (number of dimensions) is {ndim}, not 1 to 7"))
    shape = tuple(dim[1 : ndim + 1])
    if min(shape) < 1:
        raise _NotNifti(_fix_hint(f"header declares dimension sizes {shape} (dim[1..{ndim}]); every size must be at least 1"))
    datatype = int(header["datatype"])
    try:
        dtype = header.get_data_dtype()
    except KeyError:
        dtype = None
    if dtype is None or dtype.itemsize == 0:
        raise _NotNifti(_fix_hint(f"header's datatype code {datatype} is not a NIfTI voxel type"))
    problem = voxel_budget_problem(shape, dtype.itemsize)
    if problem:
        raise _NotNifti(f"header {problem}")

    vox_offset = float(header["vox_offset"])
    if not (math.isfinite(vox_offset) and 0 <= vox_offset <= MAX_VOX_OFFSET and vox_offset == int(vox_offset)):
        raise _NotNifti(_fix_hint(f"header's vox_offset (where the voxels start) is {vox_offset!r}, not a whole number of bytes "
                                  f"from 0 to {MAX_VOX_OFFSET}"))
    pixdim = tuple(float(v) for v in header["pixdim"][1 : ndim + 1])
    return NiftiHeader(header, shape, dtype, pixdim, max(int(vox_offset), header.sizeof_hdr))


def _geometry_problems(parsed: NiftiHeader) -> list[str]:
    """Voxel size and the transforms ITK takes origin and direction from; one message per bad field."""
    out = []
    for i, v in enumerate(parsed.pixdim[:3], start=1):
        if not (math.isfinite(v) and MIN_PIXDIM <= v <= MAX_PIXDIM):
            out.append(f"pixdim[{i}] (voxel size along {'xyz'[i - 1]}) is {v!r}, not a finite size from {MIN_PIXDIM:g} to {MAX_PIXDIM:g}; "
                       "fix the file's header (voxel size) and re-export it")
    header = parsed.header
    for code, fields in (("qform_code", _QFORM_FIELDS), ("sform_code", _SFORM_FIELDS)):
        if int(header[code]) <= 0:
            continue  # a transform with code 0 is not used by ITK
        for field in fields:
            values = np.atleast_1d(np.asarray(header[field], dtype=np.float64))
            if not np.isfinite(values).all():
                shown = values.tolist() if values.size > 1 else values[0]
                out.append(f"{field} ({code} {int(header[code])}: origin/direction) is {shown}, not finite; "
                           "fix the file's orientation and re-export it")
    slope, inter = float(header["scl_slope"]), float(header["scl_inter"])
    if slope == 0 and math.isfinite(inter) and inter != 0:
        out.append(f"scl_slope is 0 with scl_inter {inter!r}: readers disagree whether to scale the voxels (NIfTI: no scaling; ITK adds "
                   "the intercept); set scl_slope 1 (or scl_inter 0) and re-export it")
    elif math.isfinite(slope) and slope != 0 and not 1e-30 <= abs(slope) <= 1e30:
        out.append(f"scl_slope is {slope!r}: an intensity scaling readers disagree on (ITK ignores such a slope, nibabel applies it); "
                   "set scl_slope 1 and re-export it")
    elif math.isfinite(slope) and slope != 0 and not math.isfinite(inter):
        out.append(f"scl_slope is {slope!r} with scl_inter {inter!r}: the intensity scaling is not a finite line; "
                   "set scl_inter 0 and re-export it")
    return out


def _nifti_head(path: Path) -> bytes:
    opener = gzip.open if _suffix(path) == ".nii.gz" else open
    with opener(path, "rb") as f:
        return f.read(_HEAD_BYTES)


def _read_head(path: Path) -> bytes:
    """The first bytes of a NIfTI file (decompressed); ImageReadError if they cannot be read."""
    try:
        return _nifti_head(path)
    except EOFError:
        raise ImageReadError(f"{path}: truncated: its gzip stream ends inside the header; re-copy or re-export the file") from None
    except (OSError, zlib.error) as exc:
        raise ImageReadError(f"{path}: cannot be decompressed ({exc}); the file is damaged or not gzip: re-copy or re-export it") from None


def check_nifti_header(path: str | os.PathLike) -> NiftiHeader | None:
    """The parsed header of a .nii/.nii.gz file (None for other files); raises ImageReadError,
    naming the file and every bad field, for a header ITK would read wrongly or silently fix."""
    path = Path(path)
    if _suffix(path) is None:
        return None
    try:
        parsed = _parse(_read_head(path))
    except _NotNifti as exc:
        raise ImageReadError(f"{path}: {exc}") from None
    problems = _geometry_problems(parsed)
    if problems:
        raise ImageReadError([f"{path}: {p}" for p in problems])
    return parsed


def nifti_header_spacing(path: str | os.PathLike) -> tuple[float, ...] | None:
    """The raw voxel size (pixdim, x, y, z...) stored in a NIfTI header; None for other files.

    ITK replaces a zero or NaN pixdim by 1.0 without a warning, so a validator must look here.
    A file whose header is not a usable NIfTI header also gives None: reading its voxels
    (``check_nifti_complete``, called by every read) refuses it with the reason.
    """
    path = Path(path)
    if _suffix(path) is None:
        return None
    try:
        return _parse(_nifti_head(path)).pixdim
    except (_NotNifti, OSError, EOFError, zlib.error):
        return None


def nifti_nonfinite_count(path: str | os.PathLike, chunk_bytes: int = 1 << 24) -> int | None:
    """How many NaN/Inf voxels a float NIfTI file stores; None for other files and types.

    ITK's NIfTI reader turns NaN and Inf into 0 on read, so they can only be seen in the raw
    voxel bytes, which this streams in chunks of ``chunk_bytes`` (memory stays bounded). An
    invalid header raises ImageReadError (see ``check_nifti_header``).
    """
    path = Path(path)
    parsed = check_nifti_header(path)
    if parsed is None or parsed.dtype.kind != "f" or parsed.dtype.itemsize not in (4, 8):
        return None  # float32 / float64 only, as ITK reads them
    dtype = parsed.dtype
    chunk_bytes = max(chunk_bytes - chunk_bytes % dtype.itemsize, dtype.itemsize)
    opener = gzip.open if _suffix(path) == ".nii.gz" else open
    count = 0
    with opener(path, "rb") as f:
        f.seek(parsed.offset)
        remaining = parsed.n_bytes - parsed.offset
        while remaining > 0 and (data := f.read(min(chunk_bytes, remaining))):
            usable = len(data) - len(data) % dtype.itemsize
            values = np.frombuffer(data, dtype, count=usable // dtype.itemsize)
            count += values.size - int(np.count_nonzero(np.isfinite(values)))
            remaining -= len(data)
    return count


def _gzip_stream_size(path: Path) -> tuple[int, bool]:
    """Decompressed size of a (possibly multi-member) gzip file and whether its stream is complete."""
    total = 0
    decoder = zlib.decompressobj(16 + zlib.MAX_WBITS)
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            while chunk:
                total += len(decoder.decompress(chunk))
                chunk = decoder.unused_data if decoder.eof else b""
                if decoder.eof and chunk:
                    decoder = zlib.decompressobj(16 + zlib.MAX_WBITS)
    return total, decoder.eof


def check_nifti_complete(path: str | os.PathLike) -> None:
    """Raise ImageReadError if a .nii/.nii.gz file's header is invalid (``check_nifti_header``),
    the file holds fewer voxel bytes than its header says, or its gzip stream is damaged.

    ITK's NIfTI reader fills the missing part of a truncated file with zeros without an error,
    and reads a .nii.gz without checking the gzip checksum (a flipped byte in the stream becomes
    wrong voxels), so the whole stream is decompressed here (streamed, never held) and its CRC
    and length checked by zlib.
    """
    path = Path(path)
    parsed = check_nifti_header(path)
    if parsed is None:
        return
    expected = parsed.n_bytes
    try:
        if _suffix(path) == ".nii":
            have, complete = path.stat().st_size, True
        else:
            have, complete = _gzip_stream_size(path)
    except (OSError, zlib.error) as exc:
        raise ImageReadError(f"{path}: cannot be decompressed ({exc}); the file is damaged or not gzip: re-copy or re-export it") from None
    if have < expected or not complete:
        raise ImageReadError(
            f"{path}: truncated: holds {have} of the {expected} bytes its header announces"
            f"{'' if complete else ' and its gzip stream ends early'}; re-copy or re-export the file"
        )
    size = parsed.header.sizeof_hdr
    if float(parsed.header["vox_offset"]) < size + 4 and have != expected:
        raise ImageReadError(
            f"{path}: vox_offset {float(parsed.header['vox_offset'])!r} lies inside the header, but the voxels do not start right after "
            f"it ({have} bytes for {expected} from byte {size}): readers disagree where they start; fix vox_offset (at least {size + 4}) "
            "and re-export the file"
        )
