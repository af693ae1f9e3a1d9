"""Open untrusted case zips safely: read members into memory, or extract them to a temporary folder.

Raw zips come from a public data set and from users' folders, so every archive is treated as hostile:

- member names that are absolute, carry a drive letter, contain ``..`` or a NUL byte are refused
  (zip-slip), and so are symlink members and encrypted members;
- the member count is checked from the end-of-central-directory record before :mod:`zipfile` parses
  the directory, so a million-entry archive costs nothing;
- the total *declared* uncompressed size is bounded, and the bytes actually inflated are counted
  while reading and reading stops at the same bound, so a header that lies about a member's size (or
  overlapping members that inflate the same data many times) cannot exhaust memory or disk;
- a truncated or corrupt archive (bad central directory, bad local header, broken deflate stream,
  CRC mismatch) becomes one clean :class:`UnsafeZipError`.

Directory entries, ``__MACOSX/`` resource forks and ``.DS_Store`` files are skipped. Error messages
name a member only when its name is the problem (zip-slip, symlink), never for corrupt data, since
file names in clinical archives can carry identifiers.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import stat
import struct
import tempfile
import zipfile
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

# Everything the zip and inflate layers raise on damaged input (OSError covers truncated reads).
_CORRUPT = (zipfile.BadZipFile, zlib.error, EOFError, struct.error, OSError)
_JUNK_DIRS = frozenset({"__MACOSX"})
_JUNK_FILES = frozenset({".DS_Store"})
_DRIVE = re.compile(r"^[A-Za-z]:")
_EXTRACT_CHUNK = 1 << 20


class UnsafeZipError(ValueError):
    """The archive is unsafe, corrupt or over a limit; ``str(exc)`` says which, in one line."""


@dataclass(frozen=True)
class Member:
    """One regular file in the archive."""

    name: str  # normalised relative POSIX path ("case_001/1/IM0001.dcm")
    index: int  # position in the central directory, used in messages instead of the name
    declared_size: int  # uncompressed size claimed by the central directory, bytes
    info: zipfile.ZipInfo | None = field(repr=False, compare=False)  # None for a file of a folder


class SafeZip:
    """A validated zip whose members are read into memory under a byte budget.

    ``max_members`` bounds the number of entries (directories and junk included);
    ``max_unzipped_bytes`` bounds both the total declared uncompressed size and the bytes actually
    inflated by every ``read``/``read_head``/``copy_to`` call on this object together.
    Use as a context manager; raises :class:`UnsafeZipError` on open or on read.
    """

    def __init__(self, zip_path: str | os.PathLike[str], *, max_members: int, max_unzipped_bytes: int) -> None:
        self.max_unzipped_bytes = int(max_unzipped_bytes)
        self.bytes_read = 0
        try:
            self._file: BinaryIO = open(zip_path, "rb")  # closed by close(), also on a failed open below
        except OSError as exc:
            raise UnsafeZipError(f"cannot open the zip: {exc.strerror}") from None
        try:
            declared_entries = _declared_entry_count(self._file)
            if declared_entries is not None and declared_entries > max_members:
                raise UnsafeZipError(_too_many(declared_entries, max_members))
            try:
                self._zip = zipfile.ZipFile(self._file)
            except (*_CORRUPT, ValueError) as exc:
                raise UnsafeZipError(f"not a readable zip (truncated or corrupt): {exc}") from None
            self.members = self._validate(self._zip.infolist(), max_members)
        except BaseException:
            self._file.close()
            raise

    def _validate(self, infos: list[zipfile.ZipInfo], max_members: int) -> tuple[Member, ...]:
        if len(infos) > max_members:
            raise UnsafeZipError(_too_many(len(infos), max_members))
        declared_total = sum(info.file_size for info in infos)
        if declared_total > self.max_unzipped_bytes:
            raise UnsafeZipError(
                f"declares {_gb(declared_total)} uncompressed, above the {_gb(self.max_unzipped_bytes)} limit "
                f"(preprocess.max_unzipped_gb)")
        members: list[Member] = []
        seen: set[str] = set()
        for index, info in enumerate(infos):
            name = safe_member_name(info.filename, index)
            if stat.S_ISLNK(info.external_attr >> 16):
                raise UnsafeZipError(f"member #{index} ({_shown(info.filename)}) is a symbolic link")
            if info.flag_bits & 0x1:
                raise UnsafeZipError(f"member #{index} is encrypted")
            if info.is_dir() or not name or _is_junk(name):
                continue
            if name in seen:
                raise UnsafeZipError(f"member #{index} ({_shown(info.filename)}) duplicates an earlier name")
            seen.add(name)
            members.append(Member(name, index, info.file_size, info))
        return tuple(members)

    # ------------------------------------------------------------------------------------ reading
    def read(self, member: Member) -> bytes:
        """The whole member, CRC-checked."""
        return b"".join(self._chunks(member, None))

    def read_head(self, member: Member, n_bytes: int) -> bytes:
        """The first ``n_bytes`` of the member (fewer if it is shorter); CRC-checked only if whole."""
        with self._open(member) as f:
            data = self._guarded_read(member, f, min(n_bytes, self._budget_left() + 1))
        self._charge(member, len(data))
        return data

    def copy_to(self, member: Member, out: BinaryIO) -> int:
        """Stream the member into ``out`` in chunks (bounded memory); returns the bytes written."""
        written = 0
        for chunk in self._chunks(member, _EXTRACT_CHUNK):
            out.write(chunk)
            written += len(chunk)
        return written

    def _chunks(self, member: Member, chunk_size: int | None) -> Iterator[bytes]:
        """The member's bytes, in chunks of at most ``chunk_size`` (None: in one piece).

        Each read asks for one byte more than may legitimately come, which detects a member that
        inflates beyond its declared size or beyond the budget without ever holding more than that
        in memory (a single unbounded read would inflate a lying member whole before failing).
        """
        got = 0
        with self._open(member) as f:
            while True:
                allowed = min(member.declared_size - got, self._budget_left()) + 1
                data = self._guarded_read(member, f, allowed if chunk_size is None else min(chunk_size, allowed))
                if not data:
                    return
                got += len(data)
                self._charge(member, len(data))
                if got > member.declared_size:
                    raise UnsafeZipError(f"member #{member.index} inflates beyond its declared size "
                                         f"({member.declared_size} bytes): a zip bomb?")
                yield data

    def _open(self, member: Member) -> BinaryIO:
        try:
            return self._zip.open(member.info)
        except NotImplementedError:
            raise UnsafeZipError(
                f"member #{member.index} uses an unsupported compression method ({member.info.compress_type})"
            ) from None
        except (*_CORRUPT, ValueError) as exc:
            raise UnsafeZipError(f"member #{member.index} is corrupt ({exc.__class__.__name__})") from None

    @staticmethod
    def _guarded_read(member: Member, f: BinaryIO, n_bytes: int) -> bytes:
        try:
            return f.read(n_bytes)
        except (*_CORRUPT, ValueError) as exc:
            # zipfile reports a CRC mismatch as BadZipFile("Bad CRC-32 ..."); keep that hint.
            what = "CRC mismatch" if "CRC" in str(exc) else exc.__class__.__name__
            raise UnsafeZipError(f"member #{member.index} is corrupt ({what})") from None

    def _budget_left(self) -> int:
        return max(0, self.max_unzipped_bytes - self.bytes_read)

    def _charge(self, member: Member, n_bytes: int) -> None:
        self.bytes_read += n_bytes
        if self.bytes_read > self.max_unzipped_bytes:
            raise UnsafeZipError(f"inflates to more than the {_gb(self.max_unzipped_bytes)} limit "
                                 f"(preprocess.max_unzipped_gb) while reading member #{member.index}: a zip bomb?")

    def close(self) -> None:
        self._zip.close()
        self._file.close()

    def __enter__(self) -> SafeZip:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def safe_member_name(raw: str, index: int = 0) -> str:
    """Normalise a member name to a relative POSIX path, refusing any that could escape a root.

    Backslashes count as separators (zips made on Windows), ``.`` and empty components are dropped.
    Returns ``""`` for a name that is only separators. Raises :class:`UnsafeZipError` for absolute
    paths, drive letters, ``..`` components and NUL bytes.
    """
    name = raw.replace("\\", "/")
    if "\x00" in name or name.startswith("/") or _DRIVE.match(name):
        raise UnsafeZipError(f"member #{index} ({_shown(raw)}) has an absolute path (zip-slip)")
    parts = [p for p in name.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise UnsafeZipError(f"member #{index} ({_shown(raw)}) points outside the archive root (zip-slip)")
    return "/".join(parts)


# --------------------------------------------------------------------------------------- extraction
def safe_extract(zip_path: str | os.PathLike[str], dest: str | os.PathLike[str], *, max_members: int,
                 max_unzipped_bytes: int) -> list[Path]:
    """Extract the regular, non-junk members of ``zip_path`` under the folder ``dest``.

    ``dest`` is created if missing. Every target is checked to resolve inside ``dest`` after
    following any links already on disk. Returns the written paths in archive order. On error the
    files written so far stay (the caller owns ``dest``; :func:`temporary_extract` cleans up).
    """
    root = Path(dest)
    root.mkdir(parents=True, exist_ok=True)
    real_root = os.path.realpath(root)
    written: list[Path] = []
    with SafeZip(zip_path, max_members=max_members, max_unzipped_bytes=max_unzipped_bytes) as zf:
        for member in zf.members:
            target = root.joinpath(*member.name.split("/"))
            real_parent = os.path.realpath(target.parent)
            if os.path.commonpath([real_root, real_parent]) != real_root:
                raise UnsafeZipError(f"member #{member.index} ({_shown(member.name)}) resolves outside the "
                                     f"extraction folder")
            try:
                target.parent.mkdir(parents=True, exist_ok=True)
                # O_EXCL: never write through a link or over a file an earlier member created.
                fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            except OSError as exc:
                raise UnsafeZipError(f"member #{member.index} cannot be written: {exc.strerror}") from None
            with os.fdopen(fd, "wb") as out:
                zf.copy_to(member, out)
            written.append(target)
    return written


@contextlib.contextmanager
def temporary_extract(zip_path: str | os.PathLike[str], *, max_members: int, max_unzipped_bytes: int,
                      parent: str | os.PathLike[str] | None = None) -> Iterator[Path]:
    """Extract into a fresh temporary folder (under ``parent`` or the system temp dir), yield it, and
    remove it afterwards, also when extraction or the caller's block fails.

    For tools that need files on disk (a GDCM or SimpleITK fallback); the in-memory
    :class:`SafeZip` is the fast path.
    """
    tmp = Path(tempfile.mkdtemp(prefix="ctdiff-unzip-", dir=parent))
    try:
        safe_extract(zip_path, tmp, max_members=max_members, max_unzipped_bytes=max_unzipped_bytes)
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# ------------------------------------------------------------------------------------------ helpers
def _declared_entry_count(f: BinaryIO) -> int | None:
    """Entry count from the end-of-central-directory record (zip64 aware), or None if not found.

    Read before :class:`zipfile.ZipFile` parses (and holds in memory) the whole central directory.
    None leaves the verdict to :mod:`zipfile`, which then reports the archive as corrupt.
    """
    f.seek(0, os.SEEK_END)
    size = f.tell()
    tail_len = min(size, 22 + 0xFFFF)  # the record plus the longest possible comment
    f.seek(size - tail_len)
    tail = f.read(tail_len)
    at = tail.rfind(b"PK\x05\x06")
    if at < 0 or len(tail) - at < 22:
        return None
    (entries,) = struct.unpack("<H", tail[at + 10:at + 12])
    locator = at - 20
    if entries == 0xFFFF and locator >= 0 and tail[locator:locator + 4] == b"PK\x06\x07":
        (offset,) = struct.unpack("<Q", tail[locator + 8:locator + 16])
        f.seek(offset)
        record = f.read(56)
        if record[:4] == b"PK\x06\x06" and len(record) == 56:
            (entries,) = struct.unpack("<Q", record[32:40])
    return entries


def _is_junk(name: str) -> bool:
    parts = name.split("/")
    return parts[-1] in _JUNK_FILES or any(p in _JUNK_DIRS for p in parts[:-1])


def _too_many(n: int, limit: int) -> str:
    return f"has {n} members, above the limit of {limit} (preprocess.max_zip_members)"


def _gb(n_bytes: int) -> str:
    return f"{n_bytes / 1024**3:.2f} GB"


def _shown(name: str) -> str:
    """A member name for a message: printable ASCII, at most 60 characters."""
    text = ascii(name)
    return text if len(text) <= 60 else text[:57] + "..."
