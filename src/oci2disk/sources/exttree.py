"""The one adapter between the ext reader and the rootfs vocabulary.

Everything in ``sources/`` reads ext filesystems and partition tables through this
module only. Today the reader is :mod:`oci2disk.extfs` with its own ``ExtEntry``; when
it becomes ``oci2disk.diskimage.extfs`` (whose ``ExtFs`` is a :class:`Tree` itself) and
``oci2disk.diskimage.partitions``, this module shrinks to re-exports.

Host tools: none.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

from oci2disk.errors import ImageError, VerifyError
from oci2disk.extfs import EXT_MAGIC, SUPERBLOCK_OFFSET, ExtEntry, ExtFs, Partition
from oci2disk.extfs import find_partitions as _find_partitions
from oci2disk.rootfs.model import Entry, Kind, normalize_path

__all__ = ["EXT_MAGIC", "SUPERBLOCK_OFFSET", "ExtTree", "Partition", "find_partitions"]


def find_partitions(disk: Path) -> list[Partition]:
    """The partitions of ``disk``'s MBR or GPT ([] without a table)."""
    try:
        return _find_partitions(disk)
    except VerifyError as exc:
        raise ImageError(exc.message, hint=exc.hint) from None


class ExtTree:
    """An ext2/3/4 filesystem at ``offset`` of ``image``, as a rootfs :class:`Tree`.

    Hard links: the paths of one inode with more than one name share a ``link_group``,
    the first of them in canonical order (the reader walks in that order).
    """

    def __init__(self, image: Path, offset: int = 0) -> None:
        try:
            self._fs = ExtFs(image, offset)
        except VerifyError as exc:
            raise ImageError(exc.message, hint=exc.hint) from None
        self._groups: dict[int, str] | None = None

    @property
    def fs_type(self) -> str:
        return self._fs.fs_type

    @property
    def size(self) -> int:
        """Bytes the filesystem spans (its block count times its block size)."""
        return int(self._fs.size)

    @property
    def label(self) -> str:
        return str(self._fs.label)

    def close(self) -> None:
        self._fs.close()

    def __enter__(self) -> ExtTree:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def entries(self) -> Iterator[Entry]:
        groups = self._link_groups()
        try:
            for found in self._fs.walk():
                yield _entry(found, groups)
        except VerifyError as exc:
            raise ImageError(exc.message, hint=exc.hint) from None

    def lookup(self, path: str) -> Entry | None:
        try:
            found = self._fs.lookup(normalize_path(path))
        except VerifyError as exc:
            raise ImageError(exc.message, hint=exc.hint) from None
        if found is None:
            return None
        groups = self._link_groups() if found.kind == "file" and found.nlink > 1 else {}
        return _entry(found, groups)

    def open(self, path: str) -> BinaryIO:
        try:
            return self._fs.open(normalize_path(path))
        except VerifyError as exc:
            raise ImageError(exc.message, hint=exc.hint) from None

    def _link_groups(self) -> dict[int, str]:
        """Inode -> the first of its names, for files with more than one name."""
        if self._groups is None:
            first: dict[int, str] = {}
            names: dict[int, int] = {}
            try:
                for found in self._fs.walk():
                    if found.kind == "file" and found.nlink > 1:
                        first.setdefault(found.inode, found.path)
                        names[found.inode] = names.get(found.inode, 0) + 1
            except VerifyError as exc:
                raise ImageError(exc.message, hint=exc.hint) from None
            self._groups = {inode: path for inode, path in first.items() if names[inode] > 1}
        return self._groups


def _entry(found: ExtEntry, groups: dict[int, str]) -> Entry:
    kind = Kind(found.kind)
    return Entry(
        path=found.path,
        kind=kind,
        mode=found.mode,
        uid=found.uid,
        gid=found.gid,
        size=found.size if kind is Kind.FILE else 0,
        mtime_ns=found.mtime_ns,
        linkname=found.linkname,
        devmajor=found.devmajor,
        devminor=found.devminor,
        xattrs=found.xattrs,
        link_group=groups.get(found.inode, "") if kind is Kind.FILE else "",
    )
