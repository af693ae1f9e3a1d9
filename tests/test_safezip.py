"""Safe zip access: zip-slip, symlinks, corrupt and truncated archives, zip bombs, temporary extraction."""

from __future__ import annotations

import stat
import struct
import zipfile
from pathlib import Path

import pytest

from ctdiff.data.safezip import SafeZip, UnsafeZipError, safe_extract, temporary_extract

LIMITS = {"max_members": 100, "max_unzipped_bytes": 10 * 1024**2}


def make_zip(path: Path, members: dict[str, bytes], compression: int = zipfile.ZIP_DEFLATED) -> Path:
    with zipfile.ZipFile(path, "w", compression) as zf:
        for name, data in members.items():
            zf.writestr(zipfile.ZipInfo(name), data, compress_type=compression)
    return path


def open_error(path: Path, **limits) -> str:
    with pytest.raises(UnsafeZipError) as info:
        SafeZip(path, **{**LIMITS, **limits}).close()
    return str(info.value)


def read_error(path: Path, **limits) -> str:
    with pytest.raises(UnsafeZipError) as info, SafeZip(path, **{**LIMITS, **limits}) as zf:
        for member in zf.members:
            zf.read(member)
    return str(info.value)


def test_members_are_read_in_memory_and_junk_is_skipped(tmp_path):
    path = make_zip(tmp_path / "ok.zip", {
        "case_001/": b"",
        "case_001/1/a.dcm": b"first",
        "case_001\\2\\b": b"second",  # made on Windows
        "./case_001/2/./c": b"third",
        "__MACOSX/case_001/1/._a.dcm": b"resource fork",
        "case_001/.DS_Store": b"finder",
    })
    with SafeZip(path, **LIMITS) as zf:
        assert [m.name for m in zf.members] == ["case_001/1/a.dcm", "case_001/2/b", "case_001/2/c"]
        assert [zf.read(m) for m in zf.members] == [b"first", b"second", b"third"]
        assert zf.read_head(zf.members[0], 3) == b"fir"
        assert zf.bytes_read == len(b"firstsecondthird") + 3


@pytest.mark.parametrize("name", ["../evil", "/etc/evil", "C:/evil", "c:evil", "a/../../evil", "..\\evil",
                                  "a/b/../../../evil", "\\\\server\\share\\evil"])
def test_zip_slip_is_refused_and_nothing_is_written(tmp_path, name):
    path = make_zip(tmp_path / "slip.zip", {"case/1/ok": b"fine", name: b"owned"})
    assert "zip-slip" in open_error(path)
    dest = tmp_path / "dest" / "inner"
    with pytest.raises(UnsafeZipError):
        safe_extract(path, dest, **LIMITS)
    assert [p.name for p in tmp_path.rglob("*") if p.is_file()] == ["slip.zip"]


def test_symlink_member_is_refused(tmp_path):
    path = tmp_path / "link.zip"
    with zipfile.ZipFile(path, "w") as zf:
        info = zipfile.ZipInfo("case/1/link")
        info.create_system = 3
        info.external_attr = (stat.S_IFLNK | 0o777) << 16
        zf.writestr(info, "/etc/passwd")
    assert "symbolic link" in open_error(path)


def test_duplicate_and_encrypted_members_are_refused(tmp_path):
    path = tmp_path / "dup.zip"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("a/b", b"1")
        zf.writestr("a\\b", b"2")
    assert "duplicates an earlier name" in open_error(path)
    path = make_zip(tmp_path / "enc.zip", {"a/b": b"secret"})
    data = bytearray(path.read_bytes())
    data[6] |= 0x1  # general purpose flag bit 0 (encrypted): local header ...
    data[data.rfind(b"PK\x01\x02") + 8] |= 0x1  # ... and central directory
    path.write_bytes(bytes(data))
    assert "encrypted" in open_error(path)


def test_not_a_zip_and_truncated_zips(tmp_path):
    (tmp_path / "text.zip").write_bytes(b"this is not a zip\n" * 10)
    assert "not a readable zip" in open_error(tmp_path / "text.zip")
    whole = make_zip(tmp_path / "whole.zip", {f"case/1/{i}": bytes([i]) * 5000 for i in range(5)}).read_bytes()
    for cut in (10, len(whole) // 2):  # end record lost / central directory and data lost
        (tmp_path / "cut.zip").write_bytes(whole[:-cut])
        assert "not a readable zip" in open_error(tmp_path / "cut.zip")


@pytest.mark.parametrize("compression", [zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED])
def test_corrupt_member_data_is_a_clean_error(tmp_path, compression):
    payload = bytes(range(256)) * 40
    data = bytearray(make_zip(tmp_path / "ok.zip", {"case/1/a": payload}, compression).read_bytes())
    header = 30 + len("case/1/a")  # local header, then the member data
    data[header + 100] ^= 0xFF
    (tmp_path / "bad.zip").write_bytes(bytes(data))
    message = read_error(tmp_path / "bad.zip")
    assert message.startswith("member #0 is corrupt")
    if compression == zipfile.ZIP_STORED:
        assert "CRC mismatch" in message


def test_member_count_bound(tmp_path):
    path = make_zip(tmp_path / "many.zip", {f"case/1/{i}": b"x" for i in range(50)})
    assert open_error(path, max_members=10) == (
        "has 50 members, above the limit of 10 (preprocess.max_zip_members)")


def test_declared_size_bound_with_a_highly_compressible_member(tmp_path):
    path = make_zip(tmp_path / "bomb.zip", {"case/1/zeros": bytes(50 * 1024**2)})
    assert path.stat().st_size < 100 * 1024  # a 50 MB member in a zip of a few tens of KB
    assert "declares 0.05 GB uncompressed, above the 0.01 GB limit" in open_error(path)


def test_a_member_that_lies_about_its_size_is_caught_while_reading(tmp_path):
    path = make_zip(tmp_path / "liar.zip", {"case/1/zeros": bytes(20 * 1024**2)})
    data = bytearray(path.read_bytes())
    # Claim 1000 bytes uncompressed in the local header and in the central directory.
    struct.pack_into("<I", data, 22, 1000)
    central = data.rfind(b"PK\x01\x02")
    struct.pack_into("<I", data, central + 24, 1000)
    path.write_bytes(bytes(data))
    with SafeZip(path, max_members=10, max_unzipped_bytes=1024**2) as zf:
        assert zf.members[0].declared_size == 1000
        with pytest.raises(UnsafeZipError, match="member #0"):
            zf.read(zf.members[0])
        assert zf.bytes_read <= 1001  # never inflated beyond the claim, let alone the 20 MB


def test_inflated_bytes_are_counted_across_reads(tmp_path):
    path = make_zip(tmp_path / "twice.zip", {"case/1/a": bytes(600 * 1024)})
    with SafeZip(path, max_members=10, max_unzipped_bytes=1024**2) as zf:
        zf.read(zf.members[0])
        with pytest.raises(UnsafeZipError, match="inflates to more than"):
            zf.read(zf.members[0])


def test_safe_extract_and_temporary_folder_removal(tmp_path):
    path = make_zip(tmp_path / "ok.zip", {"case/1/a": b"A" * 3000, "case/2/b": b"B", "__MACOSX/x": b"junk"})
    written = safe_extract(path, tmp_path / "out", **LIMITS)
    assert [p.relative_to(tmp_path / "out").as_posix() for p in written] == ["case/1/a", "case/2/b"]
    assert written[0].read_bytes() == b"A" * 3000

    with temporary_extract(path, parent=tmp_path, **LIMITS) as root:
        assert (root / "case" / "2" / "b").read_bytes() == b"B"
        kept = root
    assert not kept.exists()

    with pytest.raises(RuntimeError), temporary_extract(path, parent=tmp_path, **LIMITS) as root:
        kept = root
        raise RuntimeError("the caller failed")
    assert not kept.exists()

    bomb = make_zip(tmp_path / "bomb.zip", {"case/1/zeros": bytes(20 * 1024**2)})
    with pytest.raises(UnsafeZipError), temporary_extract(bomb, parent=tmp_path, **LIMITS):
        pass
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bomb.zip", "ok.zip", "out"]
