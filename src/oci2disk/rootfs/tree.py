"""The merged tree the flattener builds: one node per inode, directories by name.

Memory grows with the number of entries only (about 200 bytes each), never with file
sizes: a regular file is remembered as (layer, data offset, size).

Host tools: none.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import NamedTuple

from oci2disk.rootfs.model import ENCODING, ERRORS, Kind, Xattrs

IMPLIED_DIR_MODE = 0o755
LAYER_BITS = 16  # Node.where packs (data offset << LAYER_BITS) | layer index
LAYER_MASK = (1 << LAYER_BITS) - 1


class Meta(NamedTuple):
    """Metadata that many nodes share; interned, so each distinct value is stored once."""

    kind: Kind
    mode: int
    uid: int
    gid: int
    xattrs: Xattrs = ()
    linkname: str = ""  # a symlink's target
    devmajor: int = 0
    devminor: int = 0


IMPLIED_META = Meta(Kind.DIR, IMPLIED_DIR_MODE, 0, 0)


class Node:
    """One inode of the merged tree. A hard-linked file is one node under several names.

    ``where`` packs the layer that last wrote the node (its low bits) and, for a
    regular file, where its data starts in that layer's uncompressed tar.
    """

    __slots__ = ("meta", "mtime", "size", "where")

    def __init__(self, meta: Meta, mtime: int, size: int, where: int) -> None:
        self.meta = meta
        self.mtime = mtime  # nanoseconds
        self.size = size
        self.where = where

    @property
    def layer(self) -> int:
        return self.where & LAYER_MASK

    @property
    def offset(self) -> int:
        return self.where >> LAYER_BITS


class Dir(Node):
    __slots__ = ("children",)

    def __init__(self, meta: Meta, mtime: int, where: int) -> None:
        super().__init__(meta, mtime, 0, where)
        self.children: dict[bytes, Node] = {}


class Sparse(Node):
    """A sparse regular file: ``segments`` (file offset, length) are stored back to back."""

    __slots__ = ("segments",)

    def __init__(
        self, meta: Meta, mtime: int, size: int, where: int, segments: tuple[tuple[int, int], ...]
    ) -> None:
        super().__init__(meta, mtime, size, where)
        self.segments = segments


def extents(node: Node) -> Iterator[tuple[int, int | None]]:
    """A file's content as (length, offset in its layer or None for zeros)."""
    if not isinstance(node, Sparse):
        if node.size:
            yield node.size, node.offset
        return
    pos, stored = 0, node.offset
    for start, length in node.segments:
        if start > pos:
            yield start - pos, None
        yield length, stored
        stored += length
        pos = start + length
    if node.size > pos:
        yield node.size - pos, None


def components(name: str) -> list[bytes] | None:
    """A tar member name as normalized components; None if ``..`` escapes the root."""
    parts: list[bytes] = []
    for part in name.encode(ENCODING, ERRORS).split(b"/"):
        if part in (b"", b"."):
            continue
        if part == b"..":
            if not parts:
                return None
            parts.pop()
        else:
            parts.append(part)
    return parts


def by_name(item: tuple[bytes, object]) -> bytes:
    return item[0]


def show(parts: Sequence[bytes]) -> str:
    return b"/".join(parts).decode(ENCODING, ERRORS) or "."
