"""autoliver.io.archive: hostile and damaged zips are refused with a message naming the archive
and the member, before anything is inflated where the directory already says so, and an
extraction that fails leaves nothing behind."""

import stat
import zipfile

import pytest
from zip_crafting import DEFLATED, Member, deflated, stored, write_zip, zeros_deflated

from autoliver.core.errors import AutoliverError
from autoliver.io import archive
from autoliver.io.archive import (
    CHUNK,
    ArchiveLimits,
    DamagedArchiveError,
    UnsafeArchiveError,
    extract_member,
    iter_member,
    name_problem,
    open_checked,
    read_member,
    safe_extract,
)

GOOD = [stored("plans.json", b'{"a": 1}'), deflated("2d/fold_0/weights.bin", bytes(range(256)) * 400), stored("2d/", b"", mode=stat.S_IFDIR | 0o755)]


def leftovers(folder):
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


def test_round_trip_matches_zipfile(tmp_path):
    zpath = write_zip(tmp_path / "good.zip", GOOD)
    members = open_checked(zpath)
    assert [m.name for m in members] == ["plans.json", "2d/fold_0/weights.bin", "2d/"]
    out = safe_extract(zpath, tmp_path / "out")
    with zipfile.ZipFile(zpath) as zf:  # the standard library as the reference reader
        for m in members:
            if not m.is_dir:
                assert (out / m.name).read_bytes() == zf.read(m.name)
    assert stat.S_IMODE((out / "plans.json").stat().st_mode) & 0o111 == 0
    assert leftovers(tmp_path) == []
    assert read_member(zpath, members[0]) == b'{"a": 1}'
    with pytest.raises(UnsafeArchiveError, match="more than 4 bytes expected"):
        read_member(zpath, members[0], max_bytes=4)
    assert extract_member(zpath, "2d/fold_0/weights.bin", tmp_path / "w.bin").read_bytes() == bytes(range(256)) * 400


@pytest.mark.parametrize("name, why", [
    ("../x", "'..'"), ("a/../../x", "'..'"), ("/etc/passwd", "absolute"), ("C:/Windows/x", "absolute"), ("C:x", "absolute"),
    ("..\\x", "backslash"), ("a\\..\\..\\x", "backslash"), ("a//b", "empty or '.'"), ("./a", "empty or '.'"), ("a\x00b", "control"),
    ("a\nb", "control"), ("", "empty name"),
])
def test_unsafe_names(name, why):
    assert why in name_problem(name)


@pytest.mark.parametrize("name", ["plans.json", "3d_fullres/fold_all/checkpoint_final.pt", "a/", "x..y", "..hidden-ish"])
def test_plain_names_pass(name):
    assert name_problem(name) is None


def test_zip_slip_absolute_and_symlink_refused_all_listed_nothing_written(tmp_path):
    evil = [stored("ok.txt", b"fine"), stored("../escaped.txt", b"x"), stored("/tmp/abs.txt", b"x"),
            stored("link", b"/etc/passwd", mode=stat.S_IFLNK | 0o777), stored("fifo", b"", mode=stat.S_IFIFO | 0o644)]
    zpath = write_zip(tmp_path / "evil.zip", evil)
    with pytest.raises(UnsafeArchiveError) as err:
        safe_extract(zpath, tmp_path / "out" / "target")
    problems = err.value.problems
    assert len(problems) == 4 and all(str(zpath) in p for p in problems)
    for name, fragment in (("../escaped.txt", "'..'"), ("/tmp/abs.txt", "absolute"), ("link", "symbolic link"), ("fifo", "not a regular file")):
        assert any(repr(name) in p and fragment in p for p in problems), (name, problems)
    assert not (tmp_path / "escaped.txt").exists() and not (tmp_path / "out" / "target").exists()
    assert isinstance(err.value, AutoliverError)


def test_symlink_written_by_zipfile_is_refused(tmp_path):
    zpath = tmp_path / "link.zip"
    with zipfile.ZipFile(zpath, "w") as zf:
        info = zipfile.ZipInfo("models/current")
        info.external_attr = (stat.S_IFLNK | 0o777) << 16
        zf.writestr(info, "../../../home")
    with pytest.raises(UnsafeArchiveError, match="symbolic link"):
        open_checked(zpath)


def test_duplicates_case_clash_and_file_below_file(tmp_path):
    zpath = write_zip(tmp_path / "dup.zip", [stored("a.json", b"1"), stored("a.json", b"2"), stored("B.txt", b"1"), stored("b.txt", b"2"),
                                              stored("c", b"file"), stored("c/d", b"below")])
    with pytest.raises(UnsafeArchiveError) as err:
        open_checked(zpath)
    text = str(err.value)
    assert "'a.json' has the same name" in text and "differing only in case" in text and "'c/d' lies below 'c'" in text


def test_declared_bomb_refused_before_inflating(tmp_path, monkeypatch):
    bomb = write_zip(tmp_path / "bomb.zip", [zeros_deflated("zeros.bin", 64)])  # 1 GiB of zeros in ~1 MB
    assert bomb.stat().st_size < 2 << 20
    inflated = []
    monkeypatch.setattr(archive, "iter_member", lambda *a, **k: inflated.append(a) or iter(()))
    with pytest.raises(UnsafeArchiveError) as err:
        safe_extract(bomb, tmp_path / "out")
    assert "ratio 1028" in str(err.value) and "1.0 GiB (1073741824 bytes)" in str(err.value) and "limit 200" in str(err.value)
    with pytest.raises(UnsafeArchiveError, match=r"more than the limit of 512.0 MiB \(536870912 bytes\) per member"):
        open_checked(bomb, ArchiveLimits(max_member_bytes=512 << 20, max_ratio=None))
    with pytest.raises(UnsafeArchiveError, match=r"unpacks to 1.0 GiB .* more than the limit of 100.0 MiB"):
        open_checked(bomb, ArchiveLimits(max_total_bytes=100 << 20, max_ratio=None))
    assert inflated == [] and not (tmp_path / "out").exists() and leftovers(tmp_path) == []


def test_lying_bomb_stops_at_declared_size(tmp_path):
    bomb = write_zip(tmp_path / "liar.zip", [zeros_deflated("small.bin", 64, declared=1000)])  # says 1000 bytes, inflates to 1 GiB
    (member,) = open_checked(bomb)
    produced = 0
    with pytest.raises(DamagedArchiveError, match=r"'small.bin': inflates past its declared size of 1000 bytes"):
        for data in iter_member(bomb, member):
            produced += len(data)
    assert produced <= 1000
    with pytest.raises(DamagedArchiveError, match="inflates past"):
        safe_extract(bomb, tmp_path / "out")
    assert not (tmp_path / "out").exists() and leftovers(tmp_path) == []


def test_bad_crc_broken_and_truncated_deflate_named(tmp_path):
    content = b"liver " * 5000
    good = deflated("seg.nii", content)
    cases = {
        "bad CRC": Member("seg.nii", good.data, good.crc ^ 1, good.size, DEFLATED),
        "broken deflate stream": Member("seg.nii", b"\xff" + good.data[1:], good.crc, good.size, DEFLATED),  # block type 3 is invalid
        "truncated": Member("seg.nii", good.data[: len(good.data) // 2], good.crc, good.size, DEFLATED),
        "holds 29999 bytes, its directory entry says 30000": Member("seg.nii", deflated("x", content[:-1]).data, good.crc, good.size, DEFLATED),
    }
    for fragment, member in cases.items():
        zpath = write_zip(tmp_path / "damaged.zip", [stored("ok.txt", b"ok"), member])
        with pytest.raises(DamagedArchiveError) as err:
            safe_extract(zpath, tmp_path / "out")
        assert fragment in str(err.value) and f"{zpath}: member 'seg.nii'" in str(err.value), str(err.value)
        assert not (tmp_path / "out").exists() and leftovers(tmp_path) == []
    stored_flip = stored("seg.nii", content)
    stored_flip.data = b"X" + stored_flip.data[1:]
    with pytest.raises(DamagedArchiveError, match="'seg.nii': bad CRC"):
        safe_extract(write_zip(tmp_path / "s.zip", [stored_flip]), tmp_path / "out")


def test_not_a_zip_and_too_many_members(tmp_path):
    junk = tmp_path / "junk.zip"
    junk.write_bytes(b"not a zip at all" * 10)
    with pytest.raises(DamagedArchiveError, match="not a readable zip archive"):
        open_checked(junk)
    many = write_zip(tmp_path / "many.zip", [stored(f"f{i}", b"") for i in range(6)])
    with pytest.raises(UnsafeArchiveError, match="6 members, more than the limit of 5"):
        safe_extract(many, tmp_path / "out", ArchiveLimits(max_members=5))
    assert len(list(safe_extract(many, tmp_path / "out", ArchiveLimits(max_members=6)).iterdir())) == 6


def test_overlapping_members_refused(tmp_path):
    zpath = write_zip(tmp_path / "o.zip", [stored("a", b"x" * 100), stored("b", b"y")])
    raw = bytearray(zpath.read_bytes())
    cd = raw.index(b"PK\x01\x02", 100)
    second = raw.index(b"PK\x01\x02", cd + 4)
    raw[second + 42: second + 46] = (0).to_bytes(4, "little")  # b's data claims to start at a's header
    zpath.write_bytes(bytes(raw))
    with pytest.raises(UnsafeArchiveError, match="share their data"):
        open_checked(zpath)


def test_check_refusal_keeps_existing_target(tmp_path):
    target = tmp_path / "model"
    target.mkdir()
    (target / "old.txt").write_text("old")
    zpath = write_zip(tmp_path / "good.zip", GOOD)

    def refuse(folder):
        assert (folder / "plans.json").is_file()  # called on the complete folder
        raise AutoliverError("refused by the caller")

    with pytest.raises(AutoliverError, match="refused by the caller"):
        safe_extract(zpath, target, check=refuse)
    assert sorted(p.name for p in target.iterdir()) == ["old.txt"] and leftovers(tmp_path) == []
    safe_extract(zpath, target)
    assert sorted(p.name for p in target.iterdir()) == ["2d", "plans.json"]


def test_streaming_memory_is_bounded(tmp_path):
    zpath = write_zip(tmp_path / "z.zip", [zeros_deflated("z", 2)])  # 32 MiB
    (member,) = open_checked(zpath, ArchiveLimits(max_ratio=None))
    sizes = [len(d) for d in iter_member(zpath, member)]
    assert sum(sizes) == 32 << 20 and max(sizes) <= CHUNK


def test_limits_validated():
    with pytest.raises(ValueError, match="max_ratio"):
        ArchiveLimits(max_ratio=0.5)
    with pytest.raises(ValueError, match="max_members"):
        ArchiveLimits(max_members=-1)
