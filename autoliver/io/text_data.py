"""The voxel data of a MetaImage or NRRD file must be exactly what its header declares.

ITK's MetaImage reader turns a corrupt zlib stream into garbage or zero voxels without an error,
and NRRD's gzip reader stops after the declared bytes without checking the stream's checksum.
So before ITK reads the file, the data is streamed here (never held whole): a raw block must hold
at least the declared bytes; a compressed one (zlib/gzip, bzip2) must decompress, checksum
included, to exactly the declared bytes. Otherwise ``ImageReadError`` naming the file.
"""

from __future__ import annotations

import bz2
import zlib
from pathlib import Path

from autoliver.core.errors import ImageReadError

CHUNK = 1 << 20
RAW, ZLIB, BZIP2 = "raw", "zlib", "bzip2"  # ZLIB: zlib or gzip, detected from the stream's header


def _decoder(encoding: str):
    return bz2.BZ2Decompressor() if encoding == BZIP2 else zlib.decompressobj(32 + zlib.MAX_WBITS)


def decompressed_size(path: Path, offset: int, encoding: str, limit: int) -> tuple[int, bool]:
    """(bytes the compressed stream from ``offset`` decodes to, whether it ended properly).
    Stops counting once more than ``limit`` bytes came out. Raises zlib.error / OSError."""
    decoder = _decoder(encoding)
    total, pending = 0, b""
    with open(path, "rb") as f:
        f.seek(offset)
        while not decoder.eof and total <= limit:
            if encoding == BZIP2:
                chunk = f.read(CHUNK) if decoder.needs_input else b""
                if decoder.needs_input and not chunk:
                    break
                total += len(decoder.decompress(chunk, max_length=CHUNK))
                continue
            if not pending:
                pending = f.read(CHUNK)
                if not pending:
                    total += len(decoder.flush())
                    break
            total += len(decoder.decompress(pending, CHUNK))
            pending = decoder.unconsumed_tail
    return total, decoder.eof


def check_data_size(header: Path, data: Path, offset: int, expected: int, encoding: str) -> None:
    """Refuse ``header`` unless ``data`` (from byte ``offset``) holds the ``expected`` voxel
    bytes: raw, at least that many; compressed, a complete stream of exactly that many."""
    fix = "the file is truncated or damaged: re-copy or re-export it"
    try:
        if encoding == RAW:
            have = data.stat().st_size - offset
            if have < expected:
                raise ImageReadError(f"{header}: holds {max(have, 0)} bytes of voxel data where its header declares {expected}; {fix}")
            return
        total, complete = decompressed_size(data, offset, encoding, expected)
    except (zlib.error, OSError, EOFError, ValueError) as exc:
        raise ImageReadError(f"{header}: its compressed voxel data cannot be decompressed ({exc}); {fix}") from None
    if total > expected:
        raise ImageReadError(f"{header}: its compressed voxel data holds more than the {expected} bytes its header declares; {fix}")
    if total != expected or not complete:
        raise ImageReadError(f"{header}: its compressed voxel data {'ends early' if not complete else 'is short'}: {total} of the "
                             f"{expected} bytes its header declares; {fix}")
