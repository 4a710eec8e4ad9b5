"""Read untrusted zip and tar(.gz) archives member by member, within limits. Nothing is extracted.

Two passes over an archive: ``SafeArchive.members()`` lists the entries (names, kinds, declared
sizes) and applies the archive-wide checks; ``SafeArchive.read(names)`` then yields the bytes of
the wanted regular files, one at a time, through bounded readers. Entries are never written to
disk, so a hostile name cannot escape anywhere; names are still checked, and an archive with an
unsafe one is refused as hostile.

Refused (``ArchiveRefused``, the whole archive):

* not a zip, tar or gzip-compressed tar; a truncated or corrupt archive;
* an entry name with ``..``, an absolute path, a drive letter or a NUL byte;
* more than ``max_entries`` entries (for zip read from the end-of-central-directory record before
  the directory is parsed; the directory's size is bounded too);
* zip entries whose compressed ranges overlap (the "overlapping files" zip bomb, where one small
  file declares a huge total);
* a declared total uncompressed size over ``max_total_bytes``; and while reading, more actual
  bytes than that, or than an entry declared;
* a gzip stream that inflates more than ``max_ratio`` times (counted on the actual bytes);
* tar pax / GNU long-name headers over 1 MiB (tarfile would hold them in memory).

Per entry (the caller skips it): ``Member.kind`` tells symlinks, hard links and device entries
apart from regular files, and ``Member.ratio`` is the declared compression ratio of a zip entry.
"""

from __future__ import annotations

import gzip
import itertools
import stat
import tarfile
import zipfile
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from core.datasets import sniff_archive

READ_CHUNK = 1 << 20
MAX_TAR_HEADER_BYTES = 1 << 20
ZIP_LOCAL_HEADER = 30
ZIP_CENTRAL_RECORD_BUDGET = 512  # bytes of central directory allowed per entry (names included)


class ArchiveRefused(Exception):
    """The archive as a whole is refused; the message says why."""


class MemberTooLarge(Exception):
    """A regular file is larger than the caller's per-file limit (it is skipped)."""


@dataclass(frozen=True)
class Limits:
    """Archive limits, see ``core.config.Settings`` (max_dataset_*)."""

    max_entries: int
    max_total_bytes: int
    max_ratio: float
    max_file_bytes: int


@dataclass(frozen=True)
class Member:
    """One archive entry.

    Attributes:
        name: normalised path (``/`` separators, no ``.`` parts, no leading ``./``).
        kind: ``file``, ``dir``, ``symlink``, ``hardlink``, ``device`` (char/block device, fifo,
            socket) or ``other``.
        size: declared uncompressed size, bytes.
        compressed: compressed size for zip entries, else None.
    """

    name: str
    kind: str
    size: int
    compressed: int | None = None

    @property
    def ratio(self) -> float:
        """Declared uncompressed/compressed size (1.0 when not compressed per entry)."""
        if self.compressed is None or self.size == 0:
            return 1.0
        return self.size / max(self.compressed, 1)


def safe_name(raw: str) -> str:
    """Normalise an entry name; raises ``ArchiveRefused`` for ``..``, absolute paths, drive
    letters and NUL bytes."""
    name = raw.replace("\\", "/")
    if "\x00" in name:
        raise ArchiveRefused(f"unsafe entry name {raw!r}: contains a NUL byte")
    if name.startswith("/"):
        raise ArchiveRefused(f"unsafe entry name {raw!r}: absolute path")
    if len(name) >= 2 and name[1] == ":" and name[0].isalpha():
        raise ArchiveRefused(f"unsafe entry name {raw!r}: drive letter")
    parts = [p for p in name.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise ArchiveRefused(f"unsafe entry name {raw!r}: '..' would escape the archive")
    return "/".join(parts)


ZIP_UTF8_FLAG = 0x800  # general purpose bit 11: the name is UTF-8 (APPNOTE.TXT 4.4.4)


def zip_entry_name(info: zipfile.ZipInfo) -> str:
    """The entry's name as its writer meant it. Without the UTF-8 flag, ``zipfile`` decodes a name
    as CP437, as APPNOTE says, but Info-ZIP's ``zip`` on Linux and macOS writes UTF-8 names without
    setting it: 'ship ⛵' came out as 'ship Γ¢╡'. Like ``unzip``, a flagless name whose bytes are
    valid UTF-8 is read as UTF-8 (CP437 maps every byte, so the bytes are recovered exactly)."""
    if info.flag_bits & ZIP_UTF8_FLAG or info.filename.isascii():
        return info.filename
    raw = info.filename.encode("cp437")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return info.filename


def detect_format(path: Path) -> str:
    """``zip``, ``tar`` or ``tar.gz`` from the file's first bytes; raises ``ArchiveRefused``."""
    with open(path, "rb") as f:
        found = sniff_archive(f.read(512))
    if found is None:
        raise ArchiveRefused("not a zip, tar or tar.gz archive (unrecognised content)")
    return found


class SafeArchive:
    """An untrusted archive on disk (see the module docstring).

    Args:
        path: the archive.
        limits: the limits to enforce.
    """

    def __init__(self, path: Path, limits: Limits):
        self.path = Path(path)
        self.limits = limits
        self.format = detect_format(self.path)
        self.bytes_read = 0

    # listing ----------------------------------------------------------------------------------

    def members(self) -> list[Member]:
        """All entries in archive order, after the archive-wide checks. Raises ``ArchiveRefused``."""
        members = self._zip_members() if self.format == "zip" else self._tar_members()
        declared = sum(m.size for m in members if m.kind == "file")
        if declared > self.limits.max_total_bytes:
            raise ArchiveRefused(
                f"the files declare {declared} bytes uncompressed, over the limit of "
                f"{self.limits.max_total_bytes} (MAX_DATASET_UNCOMPRESSED_BYTES)"
            )
        return members

    def _zip_members(self) -> list[Member]:
        with open(self.path, "rb") as f:
            end = zipfile._EndRecData(f)  # the end-of-central-directory record, before parsing
            if end is None:
                raise ArchiveRefused("not a valid zip archive: no end of central directory (truncated?)")
            entries, directory_size = end[zipfile._ECD_ENTRIES_TOTAL], end[zipfile._ECD_SIZE]
            self._check_count(entries)
            if directory_size > self.limits.max_entries * ZIP_CENTRAL_RECORD_BUDGET + (1 << 20):
                raise ArchiveRefused(f"the zip's central directory is {directory_size} bytes: too large")
            try:
                with zipfile.ZipFile(f) as zf:
                    infos = zf.infolist()
                    directory_start = zf.start_dir
            except (zipfile.BadZipFile, zipfile.LargeZipFile, OSError, ValueError, EOFError) as exc:
                raise ArchiveRefused(f"not a valid zip archive: {exc}") from None
        self._check_count(len(infos))
        self._check_zip_overlaps(infos, directory_start)
        members = []
        for info in infos:
            mode = info.external_attr >> 16
            if info.is_dir():
                kind = "dir"
            elif stat.S_ISLNK(mode):
                kind = "symlink"
            elif stat.S_ISCHR(mode) or stat.S_ISBLK(mode) or stat.S_ISFIFO(mode) or stat.S_ISSOCK(mode):
                kind = "device"
            else:
                kind = "file"
            members.append(Member(safe_name(zip_entry_name(info)), kind, info.file_size, info.compress_size))
        return members

    @staticmethod
    def _check_zip_overlaps(infos: list[zipfile.ZipInfo], directory_start: int) -> None:
        """Each entry's local header and compressed data must end before the next entry starts
        (and before the central directory). Overlapping entries are a zip bomb (one compressed
        stream referenced by many entries)."""
        spans = sorted(
            ((i.header_offset, i.header_offset + ZIP_LOCAL_HEADER + i.compress_size, i) for i in infos),
            key=lambda span: span[:2],
        )
        for (_, end, info), (next_start, _, next_info) in itertools.pairwise(spans):
            if next_start < end:
                raise ArchiveRefused(
                    f"zip entries {info.filename!r} and {next_info.filename!r} overlap "
                    "(an overlapping-entry zip bomb)"
                )
        if spans and spans[-1][1] > directory_start:
            raise ArchiveRefused(f"zip entry {spans[-1][2].filename!r} overlaps the central directory")

    def _check_count(self, count: int) -> None:
        if count > self.limits.max_entries:
            raise ArchiveRefused(
                f"the archive has {count} entries, over the limit of {self.limits.max_entries} "
                "(MAX_DATASET_ENTRIES)"
            )

    def _tar_members(self) -> list[Member]:
        members = []
        for info, _ in self._tar_walk(read=frozenset()):
            members.append(_tar_member(info))
            self._check_count(len(members))
        return members

    # reading ----------------------------------------------------------------------------------

    def read(self, names: set[str]) -> Iterator[tuple[str, bytes | MemberTooLarge]]:
        """Yield (name, bytes) for each regular file in ``names``, in archive order.

        A file over ``max_file_bytes`` (declared or actual) yields a ``MemberTooLarge`` instead of
        its bytes. Raises ``ArchiveRefused`` for corrupt data or a limit of the whole archive.
        """
        if self.format == "zip":
            yield from self._zip_read(names)
        else:
            for info, data in self._tar_walk(read=names):
                if data is not None:
                    yield safe_name(info.name), data

    def _zip_read(self, names: set[str]) -> Iterator[tuple[str, bytes | MemberTooLarge]]:
        try:
            with zipfile.ZipFile(self.path) as zf:
                for info in zf.infolist():
                    name = safe_name(zip_entry_name(info))
                    if name not in names or info.is_dir():
                        continue
                    if info.file_size > self.limits.max_file_bytes:
                        yield name, MemberTooLarge(f"{info.file_size} bytes")
                        continue
                    with zf.open(info) as stream:
                        yield name, self._bounded_read(stream, name, info.file_size, info.compress_size)
        except (zipfile.BadZipFile, zlib.error, OSError, EOFError, ValueError, NotImplementedError) as exc:
            if isinstance(exc, OSError) and exc.errno is not None:
                raise
            raise ArchiveRefused(f"corrupt zip archive: {exc}") from None

    def _bounded_read(
        self, stream: BinaryIO, name: str, declared: int, compressed: int | None
    ) -> bytes | MemberTooLarge:
        """Read one entry, counting actual bytes against its declared size, the per-file limit,
        the compression ratio and the archive's total."""
        limit = min(declared, self.limits.max_file_bytes)
        chunks, size = [], 0
        while True:
            chunk = stream.read(min(READ_CHUNK, limit + 1 - size))
            if not chunk:
                break
            size += len(chunk)
            self._count(len(chunk))
            if size > declared:
                raise ArchiveRefused(f"entry {name!r} inflates beyond its declared size of {declared} bytes")
            if compressed is not None and size > self.limits.max_ratio * max(compressed, 1) + READ_CHUNK:
                raise ArchiveRefused(f"entry {name!r} inflates over {self.limits.max_ratio:g}:1 (zip bomb)")
            if size > self.limits.max_file_bytes:
                return MemberTooLarge(f"over {self.limits.max_file_bytes} bytes")
            chunks.append(chunk)
            if size >= limit + 1:
                break
        return b"".join(chunks)

    def _count(self, n: int) -> None:
        self.bytes_read += n
        if self.bytes_read > self.limits.max_total_bytes:
            raise ArchiveRefused(
                f"the archive inflates to more than {self.limits.max_total_bytes} bytes "
                "(MAX_DATASET_UNCOMPRESSED_BYTES)"
            )

    def _tar_walk(self, read: frozenset[str] | set[str]) -> Iterator[tuple[tarfile.TarInfo, object]]:
        """Stream through the tar once; yields (info, bytes | MemberTooLarge | None)."""
        with open(self.path, "rb") as raw:
            source: BinaryIO = raw
            if self.format == "tar.gz":
                source = _InflateGuard(gzip.GzipFile(fileobj=raw, mode="rb"), raw, self.limits)
            try:
                with tarfile.open(fileobj=source, mode="r|", tarinfo=_GuardedTarInfo) as tf:
                    for info in tf:
                        tf.members = []  # stream mode: do not keep every header in memory
                        data = None
                        name = safe_name(info.name)
                        if info.isreg() and name in read:
                            if info.size > self.limits.max_file_bytes:
                                data = MemberTooLarge(f"{info.size} bytes")
                            else:
                                stream = tf.extractfile(info)
                                data = self._bounded_read(stream, name, info.size, None)
                        yield info, data
            except ArchiveRefused:
                raise
            except (tarfile.TarError, EOFError, zlib.error, gzip.BadGzipFile, ValueError) as exc:
                raise ArchiveRefused(f"corrupt or truncated {self.format} archive: {exc}") from None
            except OSError as exc:
                if exc.errno is not None:  # a real I/O error (disk), not a format error
                    raise
                raise ArchiveRefused(f"corrupt or truncated {self.format} archive: {exc}") from None


def _tar_member(info: tarfile.TarInfo) -> Member:
    if info.isreg():
        kind = "file"
    elif info.isdir():
        kind = "dir"
    elif info.issym():
        kind = "symlink"
    elif info.islnk():
        kind = "hardlink"
    elif info.ischr() or info.isblk() or info.isfifo():
        kind = "device"
    else:
        kind = "other"
    return Member(safe_name(info.name), kind, info.size if info.isreg() else 0)


class _GuardedTarInfo(tarfile.TarInfo):
    """Refuses pax / GNU long-name headers over 1 MiB, which tarfile would read into memory."""

    def _proc_member(self, tarfile_):
        special = (tarfile.GNUTYPE_LONGNAME, tarfile.GNUTYPE_LONGLINK, tarfile.XHDTYPE, tarfile.XGLTYPE)
        if self.type in special and self.size > MAX_TAR_HEADER_BYTES:
            raise ArchiveRefused(f"a tar extended header of {self.size} bytes (limit {MAX_TAR_HEADER_BYTES})")
        return super()._proc_member(tarfile_)


class _InflateGuard:
    """A read-only stream over a gzip stream that counts the actual inflated bytes: more than
    ``max_total_bytes`` in all, or more than ``max_ratio`` times the compressed bytes consumed
    (plus 1 MiB of slack), raises ``ArchiveRefused``."""

    def __init__(self, inflated: BinaryIO, raw: BinaryIO, limits: Limits):
        self.inflated, self.raw, self.limits = inflated, raw, limits
        self.total = 0

    def read(self, size: int = -1) -> bytes:
        data = self.inflated.read(size if size is not None and size >= 0 else READ_CHUNK)
        self.total += len(data)
        if self.total > self.limits.max_total_bytes:
            raise ArchiveRefused(
                f"the gzip stream inflates to more than {self.limits.max_total_bytes} bytes "
                "(MAX_DATASET_UNCOMPRESSED_BYTES)"
            )
        if self.total > self.limits.max_ratio * max(self.raw.tell(), 1) + READ_CHUNK:
            raise ArchiveRefused(f"the gzip stream inflates over {self.limits.max_ratio:g}:1 (a gzip bomb)")
        return data
