"""Zip archives from elsewhere, read and extracted safely: the one zip reader of the project.

A zip a user hands over (a model package, a submission, an exported model) may be hostile or
damaged. :func:`open_checked` reads only the central directory and refuses, listing every
problem at once, an archive with:

- a member name that is absolute (``/x``, ``C:x``), holds a ``..`` / ``.`` / empty component,
  a backslash, a control character, or is too long;
- a symbolic link, device or other non-regular member (Unix mode in the external attributes);
- two members with the same name (also when they differ only in case, or one is a file and
  another sits below it as if it were a folder);
- an encrypted member, or a compression other than stored / deflated;
- more than ``max_members`` members, a member larger than ``max_member_bytes``, more than
  ``max_total_bytes`` in all, or a deflated member above ``ratio_min_bytes`` that inflates more
  than ``max_ratio`` times (zip bombs, refused before anything is inflated), or members whose
  data overlap (the non-recursive bomb).

Reading a member (:func:`iter_member`) decompresses it in bounded chunks and stops as soon as
it inflates past its declared size; a bad CRC, a broken or truncated deflate stream or a local
header that disagrees with the directory is an :class:`DamagedArchiveError` naming the archive
and the member, never a traceback. :func:`safe_extract` writes into a temporary folder beside
the target and moves it into place only when every member is complete and checked
(``autoliver.io.atomic.atomic_dir``), so nothing half-extracted remains. Extracted files get
ordinary permissions (no executable or set-id bits, whatever the archive says).
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import stat
import struct
import zipfile
import zlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from autoliver.core.errors import AutoliverError
from autoliver.io.atomic import atomic_dir, atomic_path

KiB, MiB, GiB = 1 << 10, 1 << 20, 1 << 30
CHUNK = 1 * MiB  # compressed bytes read, and at most decompressed bytes produced, per step
MAX_NAME_LENGTH = 1024
_LOCAL_HEADER = struct.Struct("<4s5H3L2H")  # signature, version, flags, method, time, date, crc, csize, usize, name len, extra len
_LOCAL_SIGNATURE = b"PK\x03\x04"
_DRIVE = re.compile(r"^[A-Za-z]:")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_ALLOWED_TYPES = (0, stat.S_IFREG, stat.S_IFDIR)  # 0: no Unix mode recorded


class ArchiveError(AutoliverError):
    """A zip archive is refused or cannot be read; ``problems`` lists every reason."""

    def __init__(self, problems: Sequence[str] | str):
        self.problems = [problems] if isinstance(problems, str) else list(problems)
        text = self.problems[0] if len(self.problems) == 1 else f"{len(self.problems)} problems:\n" + "\n".join(f"  - {p}" for p in self.problems)
        super().__init__(text)


class UnsafeArchiveError(ArchiveError):
    """The archive's layout is unsafe (escaping paths, links, duplicates) or exceeds the limits."""


class DamagedArchiveError(ArchiveError):
    """A member's data is damaged: bad CRC, broken deflate stream, wrong size, bad header."""


@dataclass(frozen=True)
class ArchiveLimits:
    """Bounds on what an archive may unpack to (bytes are uncompressed sizes).

    ``max_ratio``: a deflated member larger than ``ratio_min_bytes`` may inflate at most this
    many times its compressed size (None: no ratio bound, e.g. for label maps, whose empty
    volumes legitimately compress a thousandfold)."""

    max_total_bytes: int = 20 * GiB
    max_member_bytes: int = 8 * GiB
    max_members: int = 10_000
    max_ratio: float | None = 200.0
    ratio_min_bytes: int = 4 * MiB

    def __post_init__(self) -> None:
        for name in ("max_total_bytes", "max_member_bytes", "max_members", "ratio_min_bytes"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 0:
                raise ValueError(f"ArchiveLimits.{name} must be a non-negative integer, got {getattr(self, name)!r}")
        if self.max_ratio is not None and not self.max_ratio >= 1:
            raise ValueError(f"ArchiveLimits.max_ratio must be at least 1 (or None), got {self.max_ratio!r}")


DEFAULT_LIMITS = ArchiveLimits()


@dataclass(frozen=True)
class ArchiveMember:
    """One checked member: its name (``/``-separated, relative), declared sizes and CRC."""

    name: str
    size: int
    compressed_size: int
    crc: int
    is_dir: bool
    info: zipfile.ZipInfo

    @property
    def parts(self) -> tuple[str, ...]:
        return PurePosixPath(self.name.rstrip("/")).parts


def _size(n: int) -> str:
    for unit, scale in (("GiB", GiB), ("MiB", MiB), ("KiB", KiB)):
        if n >= scale:
            return f"{n / scale:.1f} {unit} ({n} bytes)"
    return f"{n} bytes"


def name_problem(name: str) -> str | None:
    """Why a member name is unsafe to extract, or None when it is a plain relative path."""
    if not name:
        return "an empty name"
    if len(name) > MAX_NAME_LENGTH:
        return f"a name of {len(name)} characters (at most {MAX_NAME_LENGTH})"
    if _CONTROL.search(name):
        return "a control character in its name"
    if "\\" in name:
        return "a backslash in its name (a Windows path that may escape the folder)"
    if name.startswith("/") or _DRIVE.match(name):
        return "an absolute path"
    parts = name[:-1].split("/") if name.endswith("/") else name.split("/")
    if ".." in parts:
        return "a '..' component (it would escape the folder)"
    if "." in parts or "" in parts:
        return "an empty or '.' component"
    return None


def _type_problem(info: zipfile.ZipInfo) -> str | None:
    mode = info.external_attr >> 16
    kind = stat.S_IFMT(mode)
    if kind == stat.S_IFLNK:
        return "a symbolic link"
    if kind not in _ALLOWED_TYPES:
        return f"not a regular file (Unix file type {oct(kind)})"
    if info.flag_bits & 0x1:
        return "encrypted"
    if info.compress_type not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED):
        return f"compression method {info.compress_type} (only stored and deflated are read)"
    return None


def _limit_problems(archive: Path, infos: list[zipfile.ZipInfo], limits: ArchiveLimits) -> list[str]:
    problems = []
    total = sum(i.file_size for i in infos)
    if total > limits.max_total_bytes:
        problems.append(f"{archive}: unpacks to {_size(total)}, more than the limit of {_size(limits.max_total_bytes)}; "
                        "refused before extracting (a zip bomb, or raise the limit if the archive is genuine)")
    for i in infos:
        where = f"{archive}: member {i.filename!r}"
        if i.file_size > limits.max_member_bytes:
            problems.append(f"{where} unpacks to {_size(i.file_size)}, more than the limit of {_size(limits.max_member_bytes)} per member; refused before extracting")
        elif i.compress_type == zipfile.ZIP_STORED and i.file_size != i.compress_size:
            problems.append(f"{where} is stored uncompressed but declares {i.compress_size} bytes stored for {i.file_size} unpacked; the archive is damaged")
        elif (limits.max_ratio is not None and i.compress_type == zipfile.ZIP_DEFLATED and i.file_size > limits.ratio_min_bytes
              and i.file_size > limits.max_ratio * max(i.compress_size, 1)):
            problems.append(f"{where} inflates {_size(i.compress_size)} to {_size(i.file_size)} (ratio {i.file_size / max(i.compress_size, 1):.0f}, "
                            f"limit {limits.max_ratio:g}); refused before extracting as a likely zip bomb")
    return problems


def _duplicate_problems(archive: Path, infos: list[zipfile.ZipInfo]) -> list[str]:
    problems, seen, files = [], {}, set()
    for i in infos:
        key = i.filename.rstrip("/").casefold()
        if key in seen:
            same = "the same name" if seen[key] == i.filename else f"a name differing only in case from {seen[key]!r}"
            problems.append(f"{archive}: member {i.filename!r} has {same}; refused (which one would be extracted is ambiguous)")
        seen.setdefault(key, i.filename)
        if not i.is_dir():
            files.add(key)
    for i in infos:
        parents = PurePosixPath(i.filename.rstrip("/").casefold()).parents
        clash = next((str(p) for p in parents if str(p) in files), None)
        if clash is not None:
            problems.append(f"{archive}: member {i.filename!r} lies below {clash!r}, which is a file; refused")
    return problems


def _overlap_problems(archive: Path, infos: list[zipfile.ZipInfo]) -> list[str]:
    """Members whose data ranges overlap (several names for the same compressed bytes)."""
    problems = []
    ordered = sorted(infos, key=lambda i: i.header_offset)
    for a, b in zip(ordered, ordered[1:]):
        name_bytes = len(a.orig_filename.encode("utf-8" if a.flag_bits & 0x800 else "cp437", "replace"))
        end = a.header_offset + _LOCAL_HEADER.size + name_bytes + a.compress_size
        if end > b.header_offset:
            problems.append(f"{archive}: members {a.filename!r} and {b.filename!r} share their data; refused (an overlapping-member zip bomb)")
    return problems


def _read_infos(archive: Path) -> list[zipfile.ZipInfo]:
    if not archive.is_file():
        raise ArchiveError(f"{archive}: not found or not a file; give the path of the .zip")
    try:
        with zipfile.ZipFile(archive) as zf:
            return zf.infolist()
    except (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError, ValueError, struct.error) as exc:
        raise DamagedArchiveError(f"{archive}: not a readable zip archive ({exc}); download or copy it again") from None
    except OSError as exc:
        raise ArchiveError(f"{archive}: cannot be read ({exc.strerror or exc}); check the file's permissions") from None


def open_checked(zip_path: str | os.PathLike, limits: ArchiveLimits = DEFAULT_LIMITS) -> list[ArchiveMember]:
    """The members of ``zip_path`` (in archive order) after checking the central directory;
    UnsafeArchiveError listing every problem otherwise. Nothing is decompressed."""
    archive = Path(zip_path)
    infos = _read_infos(archive)
    if len(infos) > limits.max_members:
        raise UnsafeArchiveError(f"{archive}: {len(infos)} members, more than the limit of {limits.max_members}; refused before extracting")
    problems = []
    for i in infos:
        why = name_problem(i.filename) or _type_problem(i)
        if why is not None:
            problems.append(f"{archive}: member {i.filename!r} is refused: {why}")
    problems += _duplicate_problems(archive, infos)
    problems += _limit_problems(archive, infos, limits)
    problems += _overlap_problems(archive, infos)
    if problems:
        raise UnsafeArchiveError(problems)
    return [ArchiveMember(i.filename, i.file_size, i.compress_size, i.CRC, i.is_dir(), i) for i in infos]


def _data_offset(f, archive: Path, info: zipfile.ZipInfo) -> int:
    where = f"{archive}: member {info.filename!r}"
    f.seek(info.header_offset)
    head = f.read(_LOCAL_HEADER.size)
    if len(head) != _LOCAL_HEADER.size or head[:4] != _LOCAL_SIGNATURE:
        raise DamagedArchiveError(f"{where}: no local header where the directory says; the archive is damaged: download or copy it again")
    fields = _LOCAL_HEADER.unpack(head)
    name_len, extra_len = fields[9], fields[10]
    raw = f.read(name_len)
    name = raw.decode("utf-8" if fields[2] & 0x800 else "cp437", "replace")
    if name != info.orig_filename:
        raise DamagedArchiveError(f"{where}: its local header names it {name!r}; the archive is damaged or forged: refused")
    return info.header_offset + _LOCAL_HEADER.size + name_len + extra_len


def iter_member(zip_path: str | os.PathLike, member: ArchiveMember, chunk: int = CHUNK) -> Iterator[bytes]:
    """The uncompressed bytes of ``member`` (from :func:`open_checked`), in chunks of at most
    ``chunk`` bytes; DamagedArchiveError (naming the archive and member) when it inflates past
    its declared size, its deflate stream is broken or truncated, or its CRC is wrong."""
    archive, info = Path(zip_path), member.info
    where = f"{archive}: member {member.name!r}"
    crc, produced = 0, 0
    with open(archive, "rb") as f:
        f.seek(_data_offset(f, archive, info))
        left = info.compress_size
        inflater = zlib.decompressobj(-zlib.MAX_WBITS) if info.compress_type == zipfile.ZIP_DEFLATED else None
        while True:
            data = b""
            if left > 0 and (inflater is None or not inflater.unconsumed_tail):  # new input only once the last is used up
                data = f.read(min(chunk, left))
                if not data:
                    raise DamagedArchiveError(f"{where}: the archive ends inside its data ({left} bytes missing); the archive is truncated: download or copy it again")
                left -= len(data)
            if inflater is not None:
                try:
                    data = inflater.decompress(inflater.unconsumed_tail or data, chunk)
                except zlib.error as exc:
                    raise DamagedArchiveError(f"{where}: broken deflate stream ({exc}) after {produced} bytes; the archive is damaged: download or copy it again") from None
            produced += len(data)
            if produced > member.size:
                raise DamagedArchiveError(f"{where}: inflates past its declared size of {_size(member.size)}; stopped at {_size(produced)} (a zip bomb or a damaged archive): refused")
            crc = zlib.crc32(data, crc)
            if data:
                yield data
            if inflater is None:
                if left == 0:
                    break
            elif inflater.eof or (left == 0 and not data and not inflater.unconsumed_tail):
                break
        if inflater is not None and not inflater.eof:
            raise DamagedArchiveError(f"{where}: its deflate stream is truncated after {produced} bytes; the archive is damaged: download or copy it again")
    if produced != member.size:
        raise DamagedArchiveError(f"{where}: holds {produced} bytes, its directory entry says {member.size}; the archive is damaged: download or copy it again")
    if crc != member.crc:
        raise DamagedArchiveError(f"{where}: bad CRC (0x{crc:08x}, expected 0x{member.crc:08x}); the archive is damaged: download or copy it again")


def read_member(zip_path: str | os.PathLike, member: ArchiveMember, max_bytes: int = 64 * MiB) -> bytes:
    """The whole content of a small member (a manifest, a JSON file); refused above ``max_bytes``."""
    if member.size > max_bytes:
        raise UnsafeArchiveError(f"{zip_path}: member {member.name!r} holds {_size(member.size)}, more than {_size(max_bytes)} expected for it; refused")
    return b"".join(iter_member(zip_path, member))


def _write_member(zip_path: Path, member: ArchiveMember, dest: Path) -> None:
    with open(dest, "wb") as out:
        for data in iter_member(zip_path, member):
            out.write(data)
        out.flush()
        os.fsync(out.fileno())


def extract_member(zip_path: str | os.PathLike, name: str, dest: str | os.PathLike, limits: ArchiveLimits = DEFAULT_LIMITS) -> Path:
    """Extract one member of a checked archive to the file ``dest`` (written atomically)."""
    members = {m.name: m for m in open_checked(zip_path, limits)}
    if name not in members or members[name].is_dir:
        raise ArchiveError(f"{zip_path}: no file member {name!r}")
    with atomic_path(dest) as tmp:
        _write_member(Path(zip_path), members[name], tmp)
    return Path(dest)


def _check_free_space(folder: Path, total: int, archive: Path) -> None:
    with contextlib.suppress(OSError):
        free = shutil.disk_usage(folder).free
        if total > free:
            raise ArchiveError(f"{archive}: unpacks to {_size(total)} but {folder} has {_size(free)} free; free some space or extract elsewhere")


def safe_extract(zip_path: str | os.PathLike, target: str | os.PathLike, limits: ArchiveLimits = DEFAULT_LIMITS,
                 check: Callable[[Path], None] | None = None) -> Path:
    """Extract every member of ``zip_path`` into the folder ``target`` and return it.

    The archive is checked first (:func:`open_checked`); members are written into a temporary
    folder beside ``target``; ``check`` (when given) is called on that complete folder and may
    raise to refuse it; only then does the folder replace ``target`` (an existing ``target`` is
    replaced as a whole). On any error nothing is left behind and ``target`` is unchanged."""
    archive, target = Path(zip_path), Path(target)
    members = open_checked(archive, limits)
    target.parent.mkdir(parents=True, exist_ok=True)
    _check_free_space(target.parent, sum(m.size for m in members), archive)
    with atomic_dir(target) as tmp:
        root = tmp.resolve()
        for m in members:
            dest = root.joinpath(*m.parts)
            if root not in dest.resolve().parents:  # cannot happen after open_checked; a second guard
                raise UnsafeArchiveError(f"{archive}: member {m.name!r} would be written outside {target}; refused")
            if m.is_dir:
                dest.mkdir(parents=True, exist_ok=True)
                continue
            dest.parent.mkdir(parents=True, exist_ok=True)
            _write_member(archive, m, dest)
        if check is not None:
            check(tmp)
    return target
