"""The ext reader and partition tables as ``sources/`` uses them.

:class:`~oci2disk.diskimage.extfs.ExtFs` is a rootfs :class:`~oci2disk.rootfs.Tree`
already; here its "damaged filesystem" errors (raised as verify errors, since verify
is its first user) become image errors, which is what they are for a source.

Host tools: none.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import BinaryIO

from oci2disk.diskimage.extfs import EXT_MAGIC, SUPERBLOCK_OFFSET, ExtFs
from oci2disk.diskimage.partitions import Partition, read_partitions
from oci2disk.errors import ImageError, Oci2DiskError, VerifyError
from oci2disk.rootfs.model import Entry, Kind, normalize_path

LOST_FOUND = "lost+found"

__all__ = ["EXT_MAGIC", "SUPERBLOCK_OFFSET", "ExtTree", "Partition", "find_partitions"]


def find_partitions(disk: Path) -> list[Partition]:
    """The partitions of ``disk``'s MBR or GPT ([] without a table)."""
    try:
        return read_partitions(disk)
    except (VerifyError, ImageError):
        raise
    except Oci2DiskError as exc:
        raise ImageError(exc.message, hint=exc.hint) from None


class ExtTree:
    """An ext2/3/4 filesystem at ``offset`` of ``image``, as a rootfs :class:`Tree`."""

    def __init__(self, image: Path, offset: int = 0) -> None:
        try:
            self._fs = ExtFs(image, offset)
        except VerifyError as exc:
            raise ImageError(exc.message, hint=exc.hint) from None

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
        hidden = self._bookkeeping()
        try:
            for entry in self._fs.entries():
                if entry.path not in hidden:
                    yield _plain(entry)
        except VerifyError as exc:
            raise ImageError(exc.message, hint=exc.hint) from None

    def lookup(self, path: str) -> Entry | None:
        path = normalize_path(path)
        if path in self._bookkeeping():
            return None
        try:
            found = self._fs.lookup(path)
        except VerifyError as exc:
            raise ImageError(exc.message, hint=exc.hint) from None
        return None if found is None else _plain(found)

    def _bookkeeping(self) -> frozenset[str]:
        """The filesystem's own empty /lost+found (mke2fs makes it; every ext output gets
        a new one): not part of the rootfs. One that e2fsck filled is kept."""
        found = self._fs.lookup(LOST_FOUND)
        if found is not None and found.kind is Kind.DIR and not self._fs.children(LOST_FOUND):
            return frozenset({LOST_FOUND})
        return frozenset()

    def open(self, path: str) -> BinaryIO:
        try:
            return self._fs.open(normalize_path(path))
        except VerifyError as exc:
            raise ImageError(exc.message, hint=exc.hint) from None


def _plain(entry: Entry) -> Entry:
    """Sizes only for regular files, as an image's canonical entries carry them."""
    return entry if entry.kind is Kind.FILE or not entry.size else replace(entry, size=0)
