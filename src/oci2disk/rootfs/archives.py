"""A rootfs tar or newc cpio archive, compressed or not, read as a :class:`Tree`.

The archive is read once, as a stream; every regular file's sha256 is computed on the
way, so the entries carry their ``digest``. ``open()`` reads a file's content again from
the archive file (a tree made from a pipe with ``from_stream`` has no file to go back
to, and says so).

Hard links: a tar link entry, and every name of a cpio inode with more than one name,
becomes an entry of its target's kind, size, digest and metadata in one ``link_group``
(the first of its names in archive order). A path that appears twice keeps its last
entry, at the place of its first.

Host tools: none.
"""

from __future__ import annotations

import hashlib
import io
import os
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import BinaryIO

from oci2disk.bytestreams import CHUNK, RunReader, sha256_stream
from oci2disk.compression import Compression, decompressed
from oci2disk.errors import VerifyError
from oci2disk.rootfs.model import (
    ENCODING,
    ERRORS,
    NS,
    Entry,
    Kind,
    normalize_path,
    pax_xattrs,
)

_TAR_KINDS = {
    tarfile.REGTYPE: Kind.FILE,
    tarfile.AREGTYPE: Kind.FILE,
    tarfile.CONTTYPE: Kind.FILE,
    tarfile.DIRTYPE: Kind.DIR,
    tarfile.SYMTYPE: Kind.SYMLINK,
    tarfile.CHRTYPE: Kind.CHAR,
    tarfile.BLKTYPE: Kind.BLOCK,
    tarfile.FIFOTYPE: Kind.FIFO,
}
CPIO_HEADER = 110
CPIO_MAGICS = (b"070701", b"070702")
CPIO_TRAILER = "TRAILER!!!"


@dataclass(frozen=True)
class _Data:
    """Where a regular file's content lies in the (decompressed) archive."""

    offset: int
    size: int


class _ArchiveTree:
    """Entries read once from an archive; content read again from the archive file."""

    def __init__(self, entries: dict[str, Entry], data: dict[str, _Data], source: Path | None):
        self._entries = entries
        self._data = data
        self._source = source

    def entries(self) -> Iterator[Entry]:
        yield from self._entries.values()

    def lookup(self, path: str) -> Entry | None:
        return self._entries.get(normalize_path(path))

    def open(self, path: str) -> BinaryIO:
        key = normalize_path(path)
        entry = self._entries.get(key)
        if entry is None or entry.kind is not Kind.FILE:
            raise VerifyError(f"the archive has no regular file {key!r}")
        if entry.size == 0:
            return io.BytesIO(b"")
        data = self._data.get(key)
        if data is None:
            raise VerifyError(f"cannot read {key!r} again: it is stored as a sparse file")
        if self._source is None:
            raise VerifyError(
                f"cannot read {key!r} again: the archive was read from a stream",
                hint="open the archive from its file to read file content",
            )
        with self._source.open("rb") as raw:
            compression = Compression.detect(raw.read(8))
        if compression is Compression.NONE:
            fd = os.open(os.fspath(self._source), os.O_RDONLY | os.O_CLOEXEC)
            return io.BufferedReader(RunReader(fd, [(data.size, data.offset)], close_fd=True))
        with self._source.open("rb") as raw, decompressed(raw, compression) as stream:
            _skip(stream, data.offset)
            return io.BytesIO(stream.read(data.size))


def _skip(stream: BinaryIO, count: int) -> None:
    while count:
        got = len(stream.read(min(CHUNK, count)))
        if not got:
            raise VerifyError("the archive ends before a file it lists")
        count -= got


# ---------------------------------------------------------------- tar


class TarTree(_ArchiveTree):
    """A rootfs tar (plain, gzip, zstd or xz) as a Tree: ``TarTree(path)``."""

    def __init__(self, path: Path) -> None:
        with Path(path).open("rb") as raw, decompressed(raw) as stream:
            entries, data = _read_tar(stream)
        super().__init__(entries, data, Path(path))

    @classmethod
    def from_stream(cls, stream: BinaryIO) -> TarTree:
        """The tree of an uncompressed tar read from ``stream`` (a pipe will do);
        its entries carry digests but its content cannot be opened again."""
        tree = cls.__new__(cls)
        entries, data = _read_tar(stream)
        _ArchiveTree.__init__(tree, entries, data, None)
        return tree


def _read_tar(stream: BinaryIO) -> tuple[dict[str, Entry], dict[str, _Data]]:
    entries: dict[str, Entry] = {}
    data: dict[str, _Data] = {}
    group_of: dict[str, str] = {}
    try:
        with tarfile.open(fileobj=stream, mode="r|", encoding=ENCODING, errors=ERRORS) as archive:
            for member in archive:
                path = normalize_path(member.name)
                group_of.pop(path, None)
                if member.islnk():
                    target = normalize_path(member.linkname)
                    if target not in entries:
                        raise VerifyError(
                            f"tar entry {path!r} is a hard link to {target!r}, "
                            "which does not come before it in the tar"
                        )
                    group_of[path] = group_of.setdefault(target, target)
                    entries[path] = replace(entries[target], path=path)
                    if target in data:
                        data[path] = data[target]
                    continue
                kind = _TAR_KINDS.get(member.type)
                if kind is None:
                    raise VerifyError(
                        f"tar entry {member.name!r} has type {member.type!r}, "
                        "which no filesystem can hold"
                    )
                digest = ""
                size = 0
                if kind is Kind.FILE:
                    content = archive.extractfile(member)
                    if content is None:
                        raise VerifyError(f"tar entry {path!r} has no readable content")
                    digest = sha256_stream(content)
                    size = member.size
                    data[path] = _Data(member.offset_data, size)
                elif kind is Kind.SYMLINK:
                    size = len(member.linkname.encode(ENCODING, ERRORS))
                entries[path] = Entry(
                    path=path,
                    kind=kind,
                    mode=member.mode & 0o7777,
                    uid=member.uid,
                    gid=member.gid,
                    size=size,
                    mtime_ns=_tar_mtime_ns(member),
                    linkname=member.linkname if kind is Kind.SYMLINK else "",
                    devmajor=member.devmajor if kind.is_device else 0,
                    devminor=member.devminor if kind.is_device else 0,
                    xattrs=pax_xattrs(member.pax_headers),
                    digest=digest,
                )
                if kind is not Kind.FILE or member.issparse():
                    data.pop(path, None)  # a sparse member's data is not one run
    except tarfile.TarError as exc:
        raise VerifyError(f"cannot read the tar stream: {exc}") from exc
    return _with_groups(entries, group_of), data


def _tar_mtime_ns(member: tarfile.TarInfo) -> int:
    text = member.pax_headers.get("mtime")
    if text:
        seconds, _, fraction = text.partition(".")
        try:
            whole = int(seconds)
            nanos = int((fraction + "000000000")[:9]) if fraction else 0
        except ValueError:
            return int(member.mtime * NS)
        return whole * NS - nanos if whole < 0 else whole * NS + nanos
    return int(member.mtime) * NS


def _with_groups(entries: dict[str, Entry], group_of: dict[str, str]) -> dict[str, Entry]:
    members: dict[str, int] = {}
    for root in group_of.values():
        members[root] = members.get(root, 0) + 1
    for path, root in group_of.items():
        if members[root] > 1:
            entries[path] = replace(entries[path], link_group=root)
    return entries


# ---------------------------------------------------------------- cpio


class CpioTree(_ArchiveTree):
    """A newc cpio archive (plain, gzip, zstd or xz; an initramfs) as a Tree.

    A newc archive holds no xattrs: every entry's ``xattrs`` is empty.
    """

    def __init__(self, path: Path) -> None:
        with Path(path).open("rb") as raw, decompressed(raw) as stream:
            entries, data = _read_cpio(stream)
            self.trailing = _after_trailer(stream, raw)
        super().__init__(entries, data, Path(path))

    @classmethod
    def from_stream(cls, stream: BinaryIO) -> CpioTree:
        """The tree of an uncompressed newc archive read from ``stream``."""
        tree = cls.__new__(cls)
        entries, data = _read_cpio(stream)
        _ArchiveTree.__init__(tree, entries, data, None)
        return tree


def _after_trailer(stream: BinaryIO, raw: BinaryIO) -> int | None:
    """Where data other than zero padding follows the trailer (None: nothing does).

    The kernel unpacks every archive concatenated to an initramfs, compressed or not,
    so anything there would be unpacked over the first archive's files.
    """
    try:
        while chunk := stream.read(CHUNK):
            if chunk.strip(b"\0"):
                return raw.tell()
    except (OSError, EOFError, ValueError):  # not more of the compressed stream: another one
        return raw.tell()
    return None


class _Counted:
    """Reads exactly what is asked for, counting the offset, or fails naming it."""

    def __init__(self, stream: BinaryIO) -> None:
        self.stream = stream
        self.offset = 0

    def read(self, n: int) -> bytes:
        data = self.stream.read(n)
        if len(data) != n:
            raise VerifyError(f"the cpio archive ends early (at byte {self.offset + len(data)})")
        self.offset += n
        return data

    def pad(self, n: int) -> None:
        if n % 4:
            self.read(4 - n % 4)


def _read_cpio(stream: BinaryIO) -> tuple[dict[str, Entry], dict[str, _Data]]:
    entries: dict[str, Entry] = {}
    data: dict[str, _Data] = {}
    inode_of: dict[str, tuple[int, int, int]] = {}
    carrier: dict[tuple[int, int, int], str] = {}  # the name holding a link set's data
    reader = _Counted(stream)
    while True:
        header = reader.read(CPIO_HEADER)
        at = reader.offset - CPIO_HEADER
        if header[:6] not in CPIO_MAGICS:
            raise VerifyError(f"not a newc cpio archive: bad magic {header[:6]!r} at byte {at}")
        try:
            f = [int(header[6 + 8 * i : 14 + 8 * i], 16) for i in range(13)]
        except ValueError:
            raise VerifyError(f"bad cpio header at byte {at}") from None
        ino, mode, uid, gid, nlink, mtime, size, dmaj, dmin, rmaj, rmin, namesize, _ = f
        name = reader.read(namesize).rstrip(b"\0").decode(ENCODING, ERRORS)
        reader.pad(CPIO_HEADER + namesize)
        if name == CPIO_TRAILER:
            break
        path = normalize_path(name)
        kind = Kind.from_mode(mode)
        if kind is None:
            raise VerifyError(f"cpio entry {path!r} has an unknown file type (mode {mode:o})")
        start = reader.offset
        digest, target = _cpio_content(reader, size, keep=kind is Kind.SYMLINK)
        reader.pad(size)
        entries[path] = Entry(
            path=path,
            kind=kind,
            mode=mode & 0o7777,
            uid=uid,
            gid=gid,
            size=size if kind in (Kind.FILE, Kind.SYMLINK) else 0,
            mtime_ns=mtime * NS,
            linkname=target.decode(ENCODING, ERRORS),
            devmajor=rmaj if kind.is_device else 0,
            devminor=rmin if kind.is_device else 0,
            digest=digest if kind is Kind.FILE else "",
        )
        data.pop(path, None)
        if kind is Kind.FILE:
            data[path] = _Data(start, size)
        inode_of.pop(path, None)
        if kind is Kind.FILE and nlink > 1:
            key = (dmaj, dmin, ino)
            inode_of[path] = key
            if size or key not in carrier:
                carrier[key] = path
    return _cpio_groups(entries, data, inode_of, carrier), data


def _cpio_content(reader: _Counted, size: int, *, keep: bool) -> tuple[str, bytes]:
    digest = hashlib.sha256()
    kept = b""
    remaining = size
    while remaining:
        chunk = reader.read(min(CHUNK, remaining))
        remaining -= len(chunk)
        if keep:
            kept += chunk
        else:
            digest.update(chunk)
    return digest.hexdigest(), kept


def _cpio_groups(
    entries: dict[str, Entry],
    data: dict[str, _Data],
    inode_of: dict[str, tuple[int, int, int]],
    carrier: dict[tuple[int, int, int], str],
) -> dict[str, Entry]:
    # Names of one inode: each gets the content of the name that carries the data.
    names: dict[tuple[int, int, int], list[str]] = {}
    for path in entries:  # archive order, so the group is named by its first name
        key = inode_of.get(path)
        if key is not None:
            names.setdefault(key, []).append(path)
    for key, paths in names.items():
        if len(paths) < 2:
            continue
        source = entries[carrier[key]]
        for path in paths:
            entries[path] = replace(
                entries[path], size=source.size, digest=source.digest, link_group=paths[0]
            )
            data[path] = data[carrier[key]]
    return entries
