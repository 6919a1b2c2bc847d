"""The rootfs vocabulary: one type for a path in a root filesystem, one protocol for a tree.

Every source and every read-back speaks it: the flattened image (:mod:`.flat`), an ext
filesystem in a disk image (:mod:`oci2disk.diskimage.extfs`), a tar or cpio archive
(:mod:`.archives`) and a directory (:mod:`.directory`). ``verify``, the kernel finder
and ``boot`` work on :class:`Tree` and never ask which one they hold.

Host tools: none.
"""

from __future__ import annotations

import enum
import stat
from base64 import b64decode
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import BinaryIO, Protocol, runtime_checkable
from urllib.parse import unquote_to_bytes

ENCODING = "utf-8"
ERRORS = "surrogateescape"  # non-UTF-8 names round-trip byte for byte
NS = 1_000_000_000
SCHILY_XATTR = "SCHILY.xattr."
LIBARCHIVE_XATTR = "LIBARCHIVE.xattr."

Xattrs = tuple[tuple[str, bytes], ...]


class Kind(enum.Enum):
    """What a path is. A hard link is not a kind: it is a file in a link group."""

    FILE = "file"
    DIR = "dir"
    SYMLINK = "symlink"
    CHAR = "char"
    BLOCK = "block"
    FIFO = "fifo"
    SOCKET = "socket"

    @property
    def s_ifmt(self) -> int:
        return _IFMT_OF[self]

    @classmethod
    def from_mode(cls, mode: int) -> Kind | None:
        """The kind the type bits of a stat mode say; None when they name none."""
        return _KIND_OF.get(stat.S_IFMT(mode))

    @property
    def is_device(self) -> bool:
        return self in (Kind.CHAR, Kind.BLOCK)


_IFMT_OF = {
    Kind.FILE: stat.S_IFREG,
    Kind.DIR: stat.S_IFDIR,
    Kind.SYMLINK: stat.S_IFLNK,
    Kind.CHAR: stat.S_IFCHR,
    Kind.BLOCK: stat.S_IFBLK,
    Kind.FIFO: stat.S_IFIFO,
    Kind.SOCKET: stat.S_IFSOCK,
}
_KIND_OF = {bits: kind for kind, bits in _IFMT_OF.items()}


@dataclass(frozen=True, slots=True)
class Entry:
    """One path of a root filesystem with everything a rootfs tar would carry.

    ``path`` is relative, without a leading "./" ("." for the root). ``mode`` holds the
    permission bits only (``& 0o7777``). Paths that are hard links of each other share
    a ``link_group``: the first of their paths in canonical order (each reader fills it
    once it knows the whole set; "" when the file has one name). ``digest`` is the
    sha256 (hex) of a regular file's content when the reader knows it without reading
    the file again ("" otherwise; :func:`with_digests` fills it).
    """

    path: str
    kind: Kind
    mode: int
    uid: int = 0
    gid: int = 0
    size: int = 0
    mtime_ns: int = 0
    linkname: str = ""  # a symlink's target
    devmajor: int = 0
    devminor: int = 0
    xattrs: Xattrs = ()
    link_group: str = ""
    digest: str = ""

    @property
    def mtime(self) -> float:
        return self.mtime_ns / NS

    @property
    def hardlink_to(self) -> str:
        """The path this one is a further name of ("" for the first or only name)."""
        return self.link_group if self.link_group and self.link_group != self.path else ""

    @property
    def is_file(self) -> bool:
        return self.kind is Kind.FILE

    @property
    def st_mode(self) -> int:
        return self.kind.s_ifmt | self.mode


@runtime_checkable
class Tree(Protocol):
    """A read-only root filesystem: entries in canonical order, lookups, file content."""

    def entries(self) -> Iterator[Entry]:
        """Every path, parents before children."""
        ...

    def lookup(self, path: str) -> Entry | None:
        """The entry at ``path`` (symlinks are not followed), or None."""
        ...

    def open(self, path: str) -> BinaryIO:
        """The content of the regular file at ``path`` (a hard link's file)."""
        ...


@dataclass(frozen=True)
class ExtraFile:
    """A file oci2disk itself adds or replaces in an output (e.g. etc/fstab)."""

    path: str
    data: bytes
    mode: int = 0o644
    uid: int = 0
    gid: int = 0


@dataclass(frozen=True)
class RootfsStats:
    entries: int
    files: int
    dirs: int
    symlinks: int
    hardlinks: int
    specials: int
    data_bytes: int


def normalize_path(name: str) -> str:
    """ "./etc/", "/etc" and "etc" all become "etc"; the root becomes "."."""
    parts = [part for part in name.split("/") if part not in ("", ".")]
    return "/".join(parts) or "."


def pax_xattrs(pax: Mapping[str, str]) -> Xattrs:
    """The xattrs a PAX header carries (``SCHILY.xattr.*`` and ``LIBARCHIVE.xattr.*``).

    tarfile decodes PAX values as UTF-8 with surrogateescape: that is undone exactly.
    SCHILY wins when both name one attribute. Sorted by the name's bytes.
    """
    found: dict[str, bytes] = {}
    for key, value in pax.items():
        if key.startswith(SCHILY_XATTR):
            found[key[len(SCHILY_XATTR) :]] = value.encode(ENCODING, ERRORS)
    for key, value in pax.items():
        if key.startswith(LIBARCHIVE_XATTR):
            name = unquote_to_bytes(key[len(LIBARCHIVE_XATTR) :]).decode(ENCODING, ERRORS)
            found.setdefault(name, b64decode(value + "=" * (-len(value) % 4)))
    return tuple(sorted(found.items(), key=lambda kv: kv[0].encode(ENCODING, ERRORS)))


def with_digests(tree: Tree) -> Iterator[Entry]:
    """``tree``'s entries with every regular file's sha256, read once per link group."""
    from dataclasses import replace

    from oci2disk.bytestreams import sha256_stream

    known: dict[str, str] = {}
    for entry in tree.entries():
        if entry.kind is Kind.FILE and not entry.digest:
            key = entry.link_group or entry.path
            digest = known.get(key)
            if digest is None:
                with tree.open(entry.path) as content:
                    digest = sha256_stream(content)
                if entry.link_group:
                    known[key] = digest
            entry = replace(entry, digest=digest)
        yield entry


def follow(tree: Tree, path: str, *, max_links: int = 40) -> Entry | None:
    """The entry ``path`` names with every symlink followed, inside ``tree``.

    Absolute targets resolve against the tree's root, never the host's; ``..`` stops
    at the root; more than ``max_links`` links (as Linux's path lookup) is None.
    """
    parts = [p for p in path.split("/") if p not in ("", ".")]
    resolved: list[str] = []
    links = 0
    while parts:
        part = parts.pop(0)
        if part == "..":
            if resolved:
                resolved.pop()
            continue
        candidate = "/".join([*resolved, part])
        entry = tree.lookup(candidate)
        if entry is None:
            return None
        if entry.kind is Kind.SYMLINK:
            links += 1
            if links > max_links:
                return None
            target = [p for p in entry.linkname.split("/") if p not in ("", ".")]
            if entry.linkname.startswith("/"):
                resolved = []
            parts = target + parts
            continue
        resolved.append(part)
    return tree.lookup("/".join(resolved) or ".")
