"""Raw NIfTI header checks that ITK's reader hides.

ITK's NIfTI reader fills the missing part of a truncated file with zeros, replaces a zero or
NaN voxel size by 1.0 and reads NaN/Inf voxels as 0, all without an error; these functions
look at the header and the raw bytes so validation can report such files.
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

from autoliver.core.errors import ImageReadError


def _suffix(path: Path) -> str | None:
    name = path.name.lower()
    return ".nii.gz" if name.endswith(".nii.gz") else ".nii" if name.endswith(".nii") else None


@dataclass(frozen=True)
class _NiftiHeader:
    order: str  # "<" or ">"
    shape: tuple[int, ...]  # dim[1..ndim], (x, y, z, ...)
    datatype: int
    bitpix: int
    pixdim: tuple[float, ...]  # pixdim[1..ndim]
    offset: int  # vox_offset

    @property
    def n_bytes(self) -> int:
        """Bytes the file must hold: header and extensions, then every voxel."""
        return self.offset + math.prod(self.shape) * self.bitpix // 8


_NIFTI_FLOATS = {16: "f4", 64: "f8"}  # NIfTI datatype codes of float32 / float64


def _parse_nifti(head: bytes) -> _NiftiHeader | None:
    """The fields autoliver needs from a NIfTI-1/-2 header, or None if ``head`` is not one."""
    for order in ("<", ">"):
        if len(head) >= 348 and struct.unpack(order + "i", head[:4])[0] == 348:
            dims = struct.unpack(order + "8h", head[40:56])
            datatype, bitpix = struct.unpack(order + "2h", head[70:74])
            pixdim = struct.unpack(order + "8f", head[76:108])
            offset = max(int(struct.unpack(order + "f", head[108:112])[0]), 348)
            break
        if len(head) >= 540 and struct.unpack(order + "i", head[:4])[0] == 540:
            datatype, bitpix = struct.unpack(order + "2h", head[12:16])
            dims = struct.unpack(order + "8q", head[16:80])
            pixdim = struct.unpack(order + "8d", head[104:168])
            offset = max(struct.unpack(order + "q", head[168:176])[0], 540)
            break
    else:
        return None
    if not 1 <= dims[0] <= 7 or bitpix <= 0:
        return None
    n = dims[0]
    return _NiftiHeader(order, tuple(max(int(d), 1) for d in dims[1 : n + 1]), int(datatype), int(bitpix), tuple(float(v) for v in pixdim[1 : n + 1]), int(offset))


def _nifti_head(path: Path) -> bytes:
    if _suffix(path) == ".nii.gz":
        with gzip.open(path, "rb") as f:
            return f.read(540)
    with open(path, "rb") as f:
        return f.read(540)


def _read_nifti_header(path: Path) -> _NiftiHeader | None:
    if _suffix(path) not in (".nii", ".nii.gz"):
        return None
    try:
        return _parse_nifti(_nifti_head(path))
    except (OSError, EOFError, zlib.error):
        return None


def nifti_header_spacing(path: str | os.PathLike) -> tuple[float, ...] | None:
    """The raw voxel size (pixdim, x, y, z...) stored in a NIfTI header; None for other files.

    ITK replaces a zero or NaN pixdim by 1.0 without a warning, so a validator must look here.
    """
    header = _read_nifti_header(Path(path))
    return None if header is None else header.pixdim


def nifti_nonfinite_count(path: str | os.PathLike, chunk_bytes: int = 1 << 24) -> int | None:
    """How many NaN/Inf voxels a float NIfTI file stores; None for other files and types.

    ITK's NIfTI reader turns NaN and Inf into 0 on read, so they can only be seen in the raw
    voxel bytes, which this streams in chunks of ``chunk_bytes`` (memory stays bounded).
    """
    path = Path(path)
    header = _read_nifti_header(path)
    if header is None or header.datatype not in _NIFTI_FLOATS:
        return None
    dtype = np.dtype(header.order + _NIFTI_FLOATS[header.datatype])
    chunk_bytes -= chunk_bytes % dtype.itemsize
    opener = gzip.open if _suffix(path) == ".nii.gz" else open
    count = 0
    with opener(path, "rb") as f:
        f.seek(header.offset)
        remaining = header.n_bytes - header.offset
        while remaining > 0 and (data := f.read(min(chunk_bytes, remaining))):
            usable = len(data) - len(data) % dtype.itemsize
            count += int(np.count_nonzero(~np.isfinite(np.frombuffer(data[:usable], dtype))))
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
    """Raise ImageReadError if a .nii/.nii.gz file holds fewer voxel bytes than its header says.

    ITK's NIfTI reader fills the missing part of a truncated file with zeros without an error,
    so this is checked here. For .nii.gz the gzip trailer (uncompressed size) is compared first,
    which costs nothing for an intact file; only a mismatch decompresses the stream to decide.
    """
    path = Path(path)
    suffix = _suffix(path)
    if suffix not in (".nii", ".nii.gz"):
        return
    try:
        parsed = _parse_nifti(_nifti_head(path))
        if parsed is None:
            return  # not a NIfTI header: the reader reports it
        expected = parsed.n_bytes
        if suffix == ".nii":
            have, complete = path.stat().st_size, True
        else:
            with open(path, "rb") as f:
                f.seek(-4, os.SEEK_END)
                if struct.unpack("<I", f.read(4))[0] == expected % (1 << 32):
                    return
            have, complete = _gzip_stream_size(path)
    except EOFError:
        raise ImageReadError(f"{path}: truncated: its gzip stream ends inside the header; re-copy or re-export the file") from None
    except (OSError, zlib.error) as exc:
        raise ImageReadError(f"{path}: cannot be decompressed ({exc}); the file is damaged or not gzip: re-copy or re-export it") from None
    if have < expected or not complete:
        raise ImageReadError(
            f"{path}: truncated: holds {have} of the {expected} bytes its header announces"
            f"{'' if complete else ' and its gzip stream ends early'}; re-copy or re-export the file"
        )


