"""The canonical rootfs tar of any :class:`~oci2disk.rootfs.model.Tree`.

The same stream :meth:`oci2disk.rootfs.flat.FlatRootfs.write_tar` writes for a flattened
image, for the trees other sources give (an ext filesystem in a disk image, ...): PAX,
entries sorted by path components ("." first), mode fields with permission bits only,
every further name of a hard-link group a ``LNKTYPE`` entry that carries its file's
metadata (mke2fs applies a link entry's header to the shared inode, and reads a link
entry whose mode field has type bits as an empty file), xattrs as ``SCHILY.xattr.*``
and mtimes clamped to ``SOURCE_DATE_EPOCH`` when one is given.

Host tools: none.
"""

from __future__ import annotations

import logging
import tarfile
from collections.abc import Iterable
from dataclasses import dataclass
from typing import BinaryIO

from oci2disk.bytestreams import CHUNK, BatchingWriter
from oci2disk.errors import ImageError
from oci2disk.rootfs.model import ENCODING, ERRORS, NS, SCHILY_XATTR, Entry, Kind, Tree

log = logging.getLogger("oci2disk.rootfs.tarwriter")

BLOCK = tarfile.BLOCKSIZE
RECORD = tarfile.RECORDSIZE
_TYPES = {
    Kind.FILE: tarfile.REGTYPE,
    Kind.DIR: tarfile.DIRTYPE,
    Kind.SYMLINK: tarfile.SYMTYPE,
    Kind.CHAR: tarfile.CHRTYPE,
    Kind.BLOCK: tarfile.BLKTYPE,
    Kind.FIFO: tarfile.FIFOTYPE,
}


@dataclass(frozen=True)
class TarStats:
    entries: int
    hardlinks: int
    data_bytes: int
    skipped_sockets: int  # a tar cannot hold a socket; the kernel makes them at bind()


def canonical_key(path: str) -> tuple[bytes, ...]:
    """The sort key of the canonical order: path components as bytes, "." first."""
    if path == ".":
        return ()
    return tuple(path.encode(ENCODING, ERRORS).split(b"/"))


def write_tree_tar(tree: Tree, out: BinaryIO, *, source_date_epoch: int | None = None) -> TarStats:
    """Write ``tree`` to ``out`` as the canonical rootfs tar; nothing is read twice."""
    ordered = sorted(tree.entries(), key=lambda e: canonical_key(e.path))
    return write_entries_tar(tree, ordered, out, source_date_epoch=source_date_epoch)


def write_entries_tar(
    tree: Tree,
    entries: Iterable[Entry],
    out: BinaryIO,
    *,
    source_date_epoch: int | None = None,
) -> TarStats:
    """Write ``entries`` (already in canonical order) with file content from ``tree``."""
    limit = None if source_date_epoch is None else source_date_epoch * NS
    sink = TarSink(out)
    leaders: dict[str, str] = {}  # link group -> the name written as the file
    count = hardlinks = data = sockets = 0
    for entry in entries:
        if entry.kind is Kind.SOCKET:
            sockets += 1
            continue
        link = ""
        if entry.kind is Kind.FILE and entry.link_group:
            link = leaders.setdefault(entry.link_group, entry.path)
            if link == entry.path:
                link = ""
        info = tarinfo(entry, link, limit)
        sink.write(info.tobuf(tarfile.PAX_FORMAT, ENCODING, ERRORS))
        count += 1
        if link:
            hardlinks += 1
        elif entry.kind is Kind.FILE and entry.size:
            _copy(tree, entry, sink)
            data += entry.size
    sink.finish()
    if sockets:
        log.warning("a tar cannot hold sockets: left out %d socket(s)", sockets)
    return TarStats(count, hardlinks, data, sockets)


def tarinfo(entry: Entry, hardlink_to: str = "", limit: int | None = None) -> tarfile.TarInfo:
    """The canonical PAX header of ``entry``: permission bits only in the mode field (so
    mke2fs links hard links right), a link entry with its file's metadata, SCHILY xattrs,
    nanosecond mtimes (clamped to ``limit``)."""
    info = tarfile.TarInfo(entry.path)
    info.type = tarfile.LNKTYPE if hardlink_to else _TYPES[entry.kind]
    info.linkname = hardlink_to or entry.linkname
    info.mode = entry.mode & 0o7777
    info.uid = entry.uid
    info.gid = entry.gid
    info.uname = info.gname = ""
    info.size = entry.size if info.type == tarfile.REGTYPE else 0
    info.devmajor = entry.devmajor
    info.devminor = entry.devminor
    pax = {SCHILY_XATTR + name: value.decode(ENCODING, ERRORS) for name, value in entry.xattrs}
    mtime = entry.mtime_ns if limit is None else min(entry.mtime_ns, limit)
    info.mtime = mtime // NS
    if mtime % NS:
        whole, frac = divmod(abs(mtime), NS)
        sign = "-" if mtime < 0 else ""
        pax["mtime"] = f"{sign}{whole}.{frac:09d}".rstrip("0")
    info.pax_headers = pax
    return info


def _copy(tree: Tree, entry: Entry, sink: TarSink) -> None:
    remaining = entry.size
    with tree.open(entry.path) as content:
        while remaining:
            chunk = content.read(min(CHUNK, remaining))
            if not chunk:
                raise ImageError(
                    f"{entry.path}: the file ended {remaining} bytes before its size "
                    f"({entry.size})",
                    hint="the source is damaged or changed while oci2disk was reading it",
                )
            sink.write(chunk)
            remaining -= len(chunk)
    sink.pad(entry.size)


class TarSink(BatchingWriter):
    """The tar stream: 512-byte blocks, closed by the end-of-archive marker."""

    def __init__(self, out: BinaryIO) -> None:
        super().__init__(out, BLOCK)

    def finish(self) -> None:
        self.write(bytes(2 * BLOCK))
        if self.written % RECORD:
            self.write(bytes(RECORD - self.written % RECORD))
        self.flush()
        self.out.flush()
