"""Zip archives written byte by byte, for the tests of the safe archive reader: members with any
name, Unix mode, method, CRC and declared sizes (which may lie), and deflate streams of zeros
that inflate to gigabytes from a few hundred kilobytes in milliseconds."""

from __future__ import annotations

import stat
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path

STORED, DEFLATED = 0, 8
_ZERO_BLOCK = 16 << 20


@dataclass
class Member:
    name: str
    data: bytes  # as stored in the archive (deflated already for DEFLATED)
    crc: int
    size: int  # declared uncompressed size
    method: int = STORED
    mode: int = stat.S_IFREG | 0o644


def stored(name: str, content: bytes, **kw) -> Member:
    return Member(name, content, zlib.crc32(content), len(content), STORED, **kw)


def deflated(name: str, content: bytes, **kw) -> Member:
    c = zlib.compressobj(6, zlib.DEFLATED, -zlib.MAX_WBITS)
    return Member(name, c.compress(content) + c.flush(), zlib.crc32(content), len(content), DEFLATED, **kw)


def zeros_deflated(name: str, n_blocks: int, declared: int | None = None) -> Member:
    """``n_blocks`` x 16 MiB of zeros as one deflate stream (one 16 MiB block compressed once,
    each block flushed so its bytes repeat), with its true CRC unless ``declared`` lies."""
    c = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    block = c.compress(bytes(_ZERO_BLOCK)) + c.flush(zlib.Z_FULL_FLUSH)
    end = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS).flush()  # an empty final block
    crc, zero = 0, bytes(_ZERO_BLOCK)
    for _ in range(n_blocks):
        crc = zlib.crc32(zero, crc)
    size = n_blocks * _ZERO_BLOCK
    return Member(name, block * n_blocks + end, crc, size if declared is None else declared, DEFLATED)


def write_zip(path: Path, members: list[Member]) -> Path:
    """A zip of ``members`` in order (no zip64: sizes below 4 GiB)."""
    out, central = bytearray(), bytearray()
    for m in members:
        name = m.name.encode("utf-8")
        offset = len(out)
        out += struct.pack("<4s5H3L2H", b"PK\x03\x04", 20, 0x800, m.method, 0, 0x21, m.crc, len(m.data), m.size, len(name), 0) + name + m.data
        central += struct.pack("<4s6H3L5H2L", b"PK\x01\x02", 0x031E, 20, 0x800, m.method, 0, 0x21, m.crc, len(m.data), m.size,
                               len(name), 0, 0, 0, 0, (m.mode & 0xFFFF) << 16, offset) + name
    out += central + struct.pack("<4s4H2LH", b"PK\x05\x06", 0, 0, len(members), len(members), len(central), len(out), 0)
    path = Path(path)
    path.write_bytes(bytes(out))
    return path
