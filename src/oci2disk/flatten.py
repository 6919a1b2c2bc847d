"""Layers -> one canonical rootfs: whiteouts, links, xattrs, devices; no extraction.

The flattener reads each layer's tar headers (never file contents) and builds an
in-memory tree of the merged rootfs, as the OCI image spec's "Applying Changesets"
describes it. A regular file is remembered as (layer, data offset, size): an
uncompressed layer blob is read in place, a gzip or zstd layer is decompressed once
into an anonymous temporary file in ``workdir``. :meth:`FlatRootfs.write_tar` then
streams one canonical PAX tar in sorted order, which ``mke2fs -d -``, cpio and
friends consume.

Nothing is ever written to the host except those temporary files (which have no
name, so even a killed run leaves nothing behind), so ownership, modes, device
nodes and xattrs stay exact without privileges. Memory grows with the number of
entries only (about 200 bytes each), never with file sizes.

Layers are applied in stream order. A whiteout hides what the lower layers put at
its path, never what its own layer puts there, wherever the two stand in the tar
(the spec's "whiteout files MUST only apply to resources in lower/parent layers"):
each node carries the index of the layer that last wrote it, and a whiteout keeps
whatever its own layer wrote below the path.

Host tools: none.
"""

from __future__ import annotations

import enum
import hashlib
import io
import logging
import os
import re
import tarfile
import tempfile
import zlib
from base64 import b64decode
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import IO, TYPE_CHECKING, BinaryIO, NamedTuple
from urllib.parse import unquote_to_bytes

from oci2disk.errors import ImageError, LayerError
from oci2disk.oci.layout import (
    LAYER_COMPRESSION,
    Descriptor,
    OciImage,
    open_layer,
    open_verified_blob,
)
from oci2disk.runs import RunReader
from oci2disk.sink import BatchingWriter

if TYPE_CHECKING:
    pass

log = logging.getLogger("oci2disk.flatten")

CHUNK = 1 << 20
BLOCK = tarfile.BLOCKSIZE
RECORD = tarfile.RECORDSIZE
ENCODING = "utf-8"
ERRORS = "surrogateescape"  # non-UTF-8 names round-trip byte for byte
NS = 1_000_000_000

WHITEOUT = b".wh."
OPAQUE = b".wh..wh..opq"
AUFS_META = b".wh..wh."  # aufs bookkeeping (.wh..wh.plnk, .wh..wh.aufs): not image content
# Docker's placeholders: dropped only when they are empty regular files.
PLACEHOLDERS = (b"hosts", b"hostname", b"resolv.conf")
DOCKERENV = b".dockerenv"
IMPLIED_DIR_MODE = 0o755
# One entry's headers (PAX records, GNU long names, sparse maps) may not exceed this:
# a hostile layer must not make the flattener allocate what it likes.
HEADER_LIMIT = 16 << 20
LAYER_BITS = 16  # Node.where packs (data offset << LAYER_BITS) | layer index
LAYER_MASK = (1 << LAYER_BITS) - 1
ZEROS = bytes(CHUNK)


class Kind(enum.Enum):
    FILE = "file"
    DIR = "dir"
    SYMLINK = "symlink"
    HARDLINK = "hardlink"
    CHAR = "char"
    BLOCK = "block"
    FIFO = "fifo"


@dataclass(frozen=True)
class Entry:
    """One path of the flattened rootfs (metadata only)."""

    path: str
    kind: Kind
    mode: int
    uid: int
    gid: int
    size: int
    mtime: float
    linkname: str = ""
    devmajor: int = 0
    devminor: int = 0
    xattrs: tuple[tuple[str, bytes], ...] = ()


@dataclass(frozen=True)
class ExtraFile:
    """A file oci2disk itself adds or replaces in the output (e.g. etc/fstab)."""

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


_TAR_KINDS = {
    tarfile.REGTYPE: Kind.FILE,
    tarfile.AREGTYPE: Kind.FILE,
    tarfile.CONTTYPE: Kind.FILE,
    tarfile.GNUTYPE_SPARSE: Kind.FILE,
    tarfile.DIRTYPE: Kind.DIR,
    tarfile.SYMTYPE: Kind.SYMLINK,
    tarfile.LNKTYPE: Kind.HARDLINK,
    tarfile.CHRTYPE: Kind.CHAR,
    tarfile.BLKTYPE: Kind.BLOCK,
    tarfile.FIFOTYPE: Kind.FIFO,
}
_KIND_TYPES = {
    Kind.FILE: tarfile.REGTYPE,
    Kind.DIR: tarfile.DIRTYPE,
    Kind.SYMLINK: tarfile.SYMTYPE,
    Kind.HARDLINK: tarfile.LNKTYPE,
    Kind.CHAR: tarfile.CHRTYPE,
    Kind.BLOCK: tarfile.BLKTYPE,
    Kind.FIFO: tarfile.FIFOTYPE,
}


# ---------------------------------------------------------------- the merged tree


class _Meta(NamedTuple):
    """Metadata that many nodes share; interned, so each distinct value is stored once."""

    kind: Kind
    mode: int
    uid: int
    gid: int
    xattrs: tuple[tuple[str, bytes], ...] = ()
    linkname: str = ""  # a symlink's target
    devmajor: int = 0
    devminor: int = 0


IMPLIED_META = _Meta(Kind.DIR, IMPLIED_DIR_MODE, 0, 0)


class _Node:
    """One inode of the merged tree. A hard-linked file is one node under several names.

    ``where`` packs the layer that last wrote the node (its low bits) and, for a
    regular file, where its data starts in that layer's uncompressed tar.
    """

    __slots__ = ("meta", "mtime", "size", "where")

    def __init__(self, meta: _Meta, mtime: int, size: int, where: int) -> None:
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


class _Dir(_Node):
    __slots__ = ("children",)

    def __init__(self, meta: _Meta, mtime: int, where: int) -> None:
        super().__init__(meta, mtime, 0, where)
        self.children: dict[bytes, _Node] = {}


class _Sparse(_Node):
    """A sparse regular file: ``segments`` (file offset, length) are stored back to back."""

    __slots__ = ("segments",)

    def __init__(
        self, meta: _Meta, mtime: int, size: int, where: int, segments: tuple[tuple[int, int], ...]
    ) -> None:
        super().__init__(meta, mtime, size, where)
        self.segments = segments


def _extents(node: _Node) -> Iterator[tuple[int, int | None]]:
    """A file's content as (length, offset in its layer or None for zeros)."""
    if not isinstance(node, _Sparse):
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


def _components(name: str) -> list[bytes] | None:
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


def _by_name(item: tuple[bytes, object]) -> bytes:
    return item[0]


def _show(parts: Sequence[bytes]) -> str:
    return b"/".join(parts).decode(ENCODING, ERRORS) or "."


_PAX_TIME = re.compile(r"(-?)(\d+)(?:\.(\d*))?")


def _mtime_ns(info: tarfile.TarInfo) -> int:
    """The member's mtime in nanoseconds, exact for PAX records (tarfile keeps a float)."""
    text = info.pax_headers.get("mtime")
    if text is not None:
        match = _PAX_TIME.fullmatch(text)
        if match:
            sign, whole, frac = match.groups()
            ns = int(whole) * NS + int(((frac or "") + "000000000")[:9])
            return -ns if sign else ns
    return int(info.mtime) * NS


def _xattrs(info: tarfile.TarInfo) -> tuple[tuple[str, bytes], ...]:
    if not info.pax_headers:
        return ()
    found: dict[str, bytes] = {}
    for key, value in info.pax_headers.items():
        if key.startswith("SCHILY.xattr."):
            found[key[len("SCHILY.xattr.") :]] = value.encode(ENCODING, ERRORS)
        elif key.startswith("LIBARCHIVE.xattr."):
            raw_name = unquote_to_bytes(key[len("LIBARCHIVE.xattr.") :])
            name = raw_name.decode(ENCODING, ERRORS)
            found.setdefault(name, b64decode(value + "=" * (-len(value) % 4)))
    return tuple(sorted(found.items(), key=lambda kv: kv[0].encode(ENCODING, ERRORS)))


class _HeaderLimit(Exception):
    pass


class _HeaderReader:
    """The file object tarfile reads a layer through.

    tarfile reads headers with read() and skips file data with seek(), so every byte
    read() returns is header data: capping it per entry bounds memory whatever a
    header claims. A second read at end of file means tarfile is looping on a
    truncated header (it does on a GNU 1.0 sparse map), so that ends the layer too.
    """

    def __init__(self, raw: IO[bytes]) -> None:
        self.raw = raw
        self.budget = HEADER_LIMIT
        self.at_eof = False

    def read(self, size: int = -1, /) -> bytes:
        if size < 0 or size > self.budget:
            raise _HeaderLimit
        data = self.raw.read(size)
        self.budget -= len(data)
        if data:
            self.at_eof = False
        elif size:
            if self.at_eof:
                raise EOFError("the layer ends inside a tar header")
            self.at_eof = True
        return data

    def write(self, b: bytes, /) -> int:
        raise io.UnsupportedOperation("read only")

    def seek(self, pos: int, whence: int = os.SEEK_SET, /) -> int:
        return self.raw.seek(pos, whence)

    def tell(self) -> int:
        return self.raw.tell()

    def close(self) -> None:
        pass


class _Builder:
    """Applies layers, bottom first, to the merged tree."""

    def __init__(self) -> None:
        self.root = _Dir(IMPLIED_META, 0, 0)
        self.linked: set[_Node] = set()  # files that a hard-link entry gave another name
        self.metas: dict[_Meta, _Meta] = {}
        self._last_mtime = 0
        # Per layer: which directory entries this layer wrote, to keep whiteouts off them.
        self.layer = 0
        self.digest = ""
        self.touched: set[_Dir] = set()  # directories this layer wrote something below
        self.pruned: set[_Dir] = set()  # directories already cleared of lower content
        self.linked_here: set[tuple[_Dir, bytes]] = set()  # names made by hard links

    # ----------------------------------------------------------- one layer

    def apply_layer(self, index: int, digest: str, layer: IO[bytes]) -> None:
        if index > LAYER_MASK:
            raise ImageError(f"the image has more than {LAYER_MASK} layers")
        self.layer, self.digest = index, digest
        self.touched, self.pruned, self.linked_here = set(), set(), set()
        size = os.fstat(layer.fileno()).st_size
        if size == 0:
            return  # an empty blob is an empty layer
        layer.seek(0)
        reader = _HeaderReader(layer)
        name = "(first entry)"
        try:
            tar = tarfile.TarFile(fileobj=reader, mode="r", encoding=ENCODING, errors=ERRORS)
            while True:
                reader.budget = HEADER_LIMIT
                info = tar.next()
                if info is None:
                    break
                tar.members = []  # type: ignore[attr-defined]  # the tree is the index
                name = info.name
                self.member(info, tar.offset)
            self.check_end(layer, tar.offset, size)
        except _HeaderLimit:
            raise self.fail(
                f"{name} (or the entry after it)",
                f"has more than {HEADER_LIMIT >> 20} MiB of tar headers",
                hint="the layer is corrupt or hostile",
            ) from None
        except (tarfile.TarError, EOFError, ValueError, OverflowError, IndexError) as exc:
            raise ImageError(
                f"layer {digest}: not a readable tar after entry {name!r} ({exc})",
                hint="the layer is corrupt or truncated; export the image again",
            ) from None

    def check_end(self, layer: IO[bytes], offset: int, size: int) -> None:
        """tarfile stops quietly at a bad header; only zeros or the end of file may follow."""
        tail = os.pread(layer.fileno(), 2 * BLOCK, offset)
        if not tail.strip(b"\0"):
            return
        where = offset if tail[:BLOCK].strip(b"\0") else offset + BLOCK
        raise ImageError(
            f"layer {self.digest}: invalid tar header at byte {where} of {size}",
            hint="the layer is corrupt or truncated; export the image again",
        )

    def fail(self, name: str, problem: str, hint: str | None = None) -> LayerError:
        return LayerError(f"layer {self.digest}: entry {name!r}: {problem}", hint=hint)

    def member(self, info: tarfile.TarInfo, next_header: int) -> None:
        name = info.name
        if "\0" in name or "\0" in info.linkname:
            raise self.fail(name, "its name or link target holds a NUL byte")
        parts = _components(name)
        if parts is None:
            raise self.fail(name, "its path escapes the image root with '..'")
        if parts and parts[0].startswith(AUFS_META) and parts != [OPAQUE]:
            log.debug("layer %s: skipping aufs metadata %r", self.digest, name)
            return
        for part in parts[:-1]:
            if part.startswith(WHITEOUT):
                raise self.fail(name, f"a directory on its path, {part!r}, is a whiteout name")
        if parts and parts[-1].startswith(WHITEOUT):
            self.whiteout(name, parts)
            return
        kind = _TAR_KINDS.get(info.type)
        if kind is None:
            raise self.fail(name, f"unsupported tar entry type {info.type!r}")
        if kind is Kind.HARDLINK:
            self.hardlink(info, parts)
            return
        node = self.node(info, kind, next_header)
        if not parts:
            if not isinstance(node, _Dir):
                raise self.fail(name, "replaces the root directory with a non-directory")
            self.set_dir(self.root, node)
            return
        parent = self.parent(name, parts)
        base = parts[-1]
        existing = parent.children.get(base)
        if isinstance(node, _Dir) and isinstance(existing, _Dir):
            self.set_dir(existing, node)  # "the existing path's attributes MUST be replaced"
        else:
            parent.children[base] = node

    def node(self, info: tarfile.TarInfo, kind: Kind, next_header: int) -> _Node:
        linkname = info.linkname if kind is Kind.SYMLINK else ""
        dev = (info.devmajor, info.devminor) if kind in (Kind.CHAR, Kind.BLOCK) else (0, 0)
        # Symlinks have no permissions of their own on Linux: always 0777.
        mode = 0o777 if kind is Kind.SYMLINK else info.mode & 0o7777
        meta = _Meta(kind, mode, info.uid, info.gid, _xattrs(info), linkname, *dev)
        meta = self.metas.setdefault(meta, meta)
        mtime = _mtime_ns(info)
        if mtime == self._last_mtime:
            mtime = self._last_mtime  # neighbours mostly share one: keep one int object
        self._last_mtime = mtime
        if kind is Kind.DIR:
            return _Dir(meta, mtime, self.layer)
        if kind is not Kind.FILE:
            return _Node(meta, mtime, 0, self.layer)
        where = (info.offset_data << LAYER_BITS) | self.layer
        available = next_header - info.offset_data
        if info.sparse is None:
            if info.size > available:
                raise self.fail(info.name, "its data runs past the end of the layer (truncated)")
            return _Node(meta, mtime, info.size, where)
        segments = self.sparse_map(info, available)
        return _Sparse(meta, mtime, info.size, where, segments)

    def sparse_map(self, info: tarfile.TarInfo, available: int) -> tuple[tuple[int, int], ...]:
        sparse: list[tuple[int, int]] = info.sparse  # type: ignore[assignment]  # typeshed: bytes
        segments: list[tuple[int, int]] = []
        end = stored = 0
        for start, length in sparse:
            if length == 0:
                continue  # GNU tar marks the file's end so; empty header slots read so
            if start < end or length < 0 or start + length > info.size:
                raise self.fail(
                    info.name,
                    f"its sparse map is invalid (segment {start}+{length} of a "
                    f"{info.size}-byte file, after byte {end})",
                )
            segments.append((start, length))
            end = start + length
            stored += length
        if stored > available:
            raise self.fail(info.name, "its data runs past the end of the layer (truncated)")
        return tuple(segments)

    def parent(self, name: str, parts: list[bytes]) -> _Dir:
        """The directory that will hold ``parts``, created (implied) where missing."""
        node = self.root
        for i, part in enumerate(parts[:-1]):
            self.touched.add(node)
            child = node.children.get(part)
            if child is None:
                child = node.children[part] = _Dir(self.implied(node), 0, self.layer)
            elif not isinstance(child, _Dir):
                if child.meta.kind is Kind.SYMLINK:
                    raise self.fail(
                        name,
                        f"its path passes through the symlink {_show(parts[: i + 1])!r}",
                        hint="a layer must not write through a symlink; rebuild the image",
                    )
                raise self.fail(name, f"its parent {_show(parts[: i + 1])!r} is not a directory")
            node = child
        self.touched.add(node)
        return node

    def implied(self, parent: _Dir) -> _Meta:
        """A missing parent directory: 0755 root, as extraction makes it; below a setgid
        directory it inherits the bit and the group, as mkdir(2) does on Linux."""
        if not parent.meta.mode & 0o2000:
            return IMPLIED_META
        meta = _Meta(Kind.DIR, IMPLIED_DIR_MODE | 0o2000, 0, parent.meta.gid)
        return self.metas.setdefault(meta, meta)

    def find(self, parts: Sequence[bytes]) -> _Node | None:
        """The node at ``parts``; never follows a symlink."""
        node: _Node = self.root
        for part in parts:
            if not isinstance(node, _Dir):
                return None
            child = node.children.get(part)
            if child is None:
                return None
            node = child
        return node

    def set_dir(self, target: _Dir, new: _Dir) -> None:
        target.meta = new.meta
        target.mtime = new.mtime
        target.where = self.layer

    def hardlink(self, info: tarfile.TarInfo, parts: list[bytes]) -> None:
        name = info.name
        link_parts = _components(info.linkname)
        if link_parts is None:
            raise self.fail(name, f"hard link to {info.linkname!r} escapes the image root")
        if not link_parts or not parts:
            raise self.fail(name, "hard link to or from the root directory")
        if link_parts[: len(parts)] == parts:
            # Applying the entry first removes what is at its path, and its target with it.
            raise self.fail(name, f"hard link to {_show(link_parts)!r}, which it would replace")
        target = self.find(link_parts)
        if target is None:
            raise self.fail(
                name,
                f"hard link to {_show(link_parts)!r}, which is not in the image",
                hint="a hard link must name a file of the image by a path without symlinks",
            )
        if isinstance(target, _Dir):
            raise self.fail(name, f"hard link to the directory {_show(link_parts)!r}")
        parent = self.parent(name, parts)
        base = parts[-1]
        if target.meta.kind is Kind.FILE:
            # The link's own header carries no metadata of its own (its file's rules).
            parent.children[base] = target
            self.linked.add(target)
            self.linked_here.add((parent, base))
        else:
            # A linked symlink, device or fifo is equivalent to a copy of it.
            parent.children[base] = _Node(target.meta, target.mtime, 0, self.layer)

    # ----------------------------------------------------------- whiteouts

    def whiteout(self, name: str, parts: list[bytes]) -> None:
        base = parts[-1]
        parent = self.find(parts[:-1])
        if not isinstance(parent, _Dir):
            return  # nothing of the lower layers lives below a non-directory: nothing to hide
        if base == OPAQUE:
            self.prune(parent)
            return
        if base.startswith(AUFS_META):
            log.debug("layer %s: ignoring aufs metadata %r", self.digest, name)
            return
        target = base[len(WHITEOUT) :]
        if target in (b"", b".", b".."):
            raise self.fail(name, "is a whiteout for no name")
        node = parent.children.get(target)
        if node is None:
            return
        if not isinstance(node, _Dir):
            if not self.mine(parent, target, node):
                del parent.children[target]
        elif node.layer == self.layer:
            self.prune(node)  # this layer's directory: only what lower layers left inside goes
        elif node in self.touched:
            self.prune(node)  # the lower directory goes, this layer's entries below it stay
            self.set_dir(node, _Dir(self.implied(parent), 0, self.layer))
        else:
            del parent.children[target]

    def mine(self, parent: _Dir, name: bytes, node: _Node) -> bool:
        return node.layer == self.layer or (parent, name) in self.linked_here

    def prune(self, top: _Dir) -> None:
        """Remove everything lower layers put below ``top``; keep this layer's entries."""
        stack = [top]
        while stack:
            directory = stack.pop()
            if directory in self.pruned:
                continue
            self.pruned.add(directory)
            if directory not in self.touched:
                directory.children.clear()  # this layer wrote nothing below it
                continue
            for name, child in list(directory.children.items()):
                if isinstance(child, _Dir):
                    if child.layer == self.layer:
                        stack.append(child)
                    elif child in self.touched:
                        stack.append(child)
                        self.set_dir(child, _Dir(self.implied(directory), 0, self.layer))
                    else:
                        del directory.children[name]
                elif not self.mine(directory, name, child):
                    del directory.children[name]


# ---------------------------------------------------------------- the result


class FlatRootfs:
    """The flattened rootfs of an image; owns the open layer files until closed."""

    def __init__(
        self,
        root: _Dir,
        layers: list[IO[bytes]],
        linked: set[_Node],
        source_date_epoch: int | None,
    ) -> None:
        self._root = root
        self._layers = layers  # per layer index; a blob listed twice is one file object
        self._sde_ns = None if source_date_epoch is None else source_date_epoch * NS
        self._closed = False
        self._leaders: dict[_Node, bytes] = {}
        self.stats = self._finalize(linked)

    # ----------------------------------------------------------- public API

    def entries(self) -> Iterator[Entry]:
        """Every path in canonical order: by path components, "." first."""
        for path, node in self._walk({}):
            assert isinstance(node, _Node)
            yield self._entry(path, node)

    def lookup(self, path: str) -> Entry | None:
        parts = _components(path)
        node = self._find(parts) if parts is not None else None
        if node is None or parts is None:
            return None
        return self._entry(b"/".join(parts) or b".", node)

    def open(self, path: str) -> BinaryIO:
        """Content of a regular file (or a hard link's file); symlinks are not followed."""
        self._check_open()
        parts = _components(path)
        node = self._find(parts) if parts is not None else None
        if node is None or node.meta.kind is not Kind.FILE:
            raise ImageError(f"{path!r} is not a regular file in the image")
        fd = os.dup(self._layers[node.layer].fileno())
        return io.BufferedReader(
            RunReader(fd, list(_extents(node)), close_fd=True), buffer_size=CHUNK
        )

    def write_tar(self, out: BinaryIO, *, extra: Sequence[ExtraFile] = ()) -> None:
        """Write the canonical PAX tar stream, with ``extra`` files added or replacing."""
        self._check_open()
        extras = self._plan_extras(extra)
        sink = _Sink(out)
        leaders: dict[_Node, bytes] = {}
        for path, item in self._walk(extras):
            if isinstance(item, ExtraFile):
                info = self._tarinfo_extra(path, item)
                sink.write(info.tobuf(tarfile.PAX_FORMAT, ENCODING, ERRORS))
                sink.write(item.data)
                sink.pad(len(item.data))
                continue
            node = item
            link = b""
            if node in self._leaders:
                # Leaders are recomputed here: an extra file may have replaced one.
                link = leaders.setdefault(node, path)
                if link == path:
                    link = b""
            info = self._tarinfo(path, node, link)
            sink.write(info.tobuf(tarfile.PAX_FORMAT, ENCODING, ERRORS))
            if info.type == tarfile.REGTYPE and node.size:
                self._copy(sink, path, node)
        sink.finish()

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for f in {id(f): f for f in self._layers}.values():
            f.close()

    def __enter__(self) -> FlatRootfs:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # ----------------------------------------------------------- internals

    def _check_open(self) -> None:
        if self._closed:
            raise ValueError("the flattened rootfs is closed")

    def _clamp(self, mtime: int) -> int:
        return mtime if self._sde_ns is None else min(mtime, self._sde_ns)

    def _find(self, parts: list[bytes]) -> _Node | None:
        node: _Node = self._root
        for part in parts:
            if not isinstance(node, _Dir):
                return None  # a symlink or file: never followed
            child = node.children.get(part)
            if child is None:
                return None
            node = child
        return node

    def _finalize(self, linked: set[_Node]) -> RootfsStats:
        # Pass 1: sort every directory once (dicts keep insertion order).
        stack = [self._root]
        while stack:
            node = stack.pop()
            node.children = dict(sorted(node.children.items(), key=_by_name))
            stack.extend(c for c in node.children.values() if isinstance(c, _Dir))
        # Pass 2: the first name in canonical order leads each link set; count.
        counts = dict.fromkeys(Kind, 0)
        names: dict[_Node, int] = {}
        data_bytes = 0
        used: set[int] = set()
        for path, item in self._walk({}):
            assert isinstance(item, _Node)
            kind = item.meta.kind
            if item in linked:
                names[item] = names.get(item, 0) + 1
                if names[item] > 1:
                    counts[Kind.HARDLINK] += 1
                    continue
                self._leaders[item] = path
            if kind is Kind.FILE:
                data_bytes += item.size
                used.add(item.layer)
            counts[kind] += 1
        for item, count in names.items():
            if count == 1:
                del self._leaders[item]  # the other names are gone: a plain file again
        # Layers that no surviving file reads from are not needed: free their temp files.
        needed = {id(self._layers[i]) for i in used}
        for f in self._layers:
            if id(f) not in needed:
                f.close()
        return RootfsStats(
            entries=sum(counts.values()),
            files=counts[Kind.FILE],
            dirs=counts[Kind.DIR],
            symlinks=counts[Kind.SYMLINK],
            hardlinks=counts[Kind.HARDLINK],
            specials=counts[Kind.CHAR] + counts[Kind.BLOCK] + counts[Kind.FIFO],
            data_bytes=data_bytes,
        )

    def _walk(
        self, extras: dict[bytes, dict[bytes, ExtraFile]]
    ) -> Iterator[tuple[bytes, _Node | ExtraFile]]:
        """Depth first, children in byte order of their names: the canonical order."""
        yield b".", self._root
        stack = [(b"", self._children(self._root, b".", extras))]
        while stack:
            prefix, items = stack[-1]
            item = next(items, None)
            if item is None:
                stack.pop()
                continue
            name, node = item
            path = prefix + name
            yield path, node
            if isinstance(node, _Dir):
                stack.append((path + b"/", self._children(node, path, extras)))

    @staticmethod
    def _children(
        node: _Dir, path: bytes, extras: dict[bytes, dict[bytes, ExtraFile]]
    ) -> Iterator[tuple[bytes, _Node | ExtraFile]]:
        added = extras.get(path)
        if not added:
            return iter(node.children.items())
        merged: dict[bytes, _Node | ExtraFile] = {**node.children, **added}
        return iter(sorted(merged.items(), key=_by_name))

    def _entry(self, path: bytes, node: _Node) -> Entry:
        meta = node.meta
        kind, linkname, size = meta.kind, meta.linkname, node.size
        leader = self._leaders.get(node)
        if leader is not None and leader != path:
            kind, linkname, size = Kind.HARDLINK, leader.decode(ENCODING, ERRORS), 0
        return Entry(
            path=path.decode(ENCODING, ERRORS),
            kind=kind,
            mode=meta.mode,
            uid=meta.uid,
            gid=meta.gid,
            size=size,
            mtime=self._clamp(node.mtime) / NS,
            linkname=linkname,
            devmajor=meta.devmajor,
            devminor=meta.devminor,
            xattrs=meta.xattrs,
        )

    def _tarinfo(self, path: bytes, node: _Node, hardlink_to: bytes) -> tarfile.TarInfo:
        meta = node.meta
        info = tarfile.TarInfo(path.decode(ENCODING, ERRORS))
        # A link entry carries its file's full metadata: mke2fs applies the link's
        # header to the shared inode.
        info.type = tarfile.LNKTYPE if hardlink_to else _KIND_TYPES[meta.kind]
        info.linkname = hardlink_to.decode(ENCODING, ERRORS) if hardlink_to else meta.linkname
        info.mode = meta.mode
        info.uid = meta.uid
        info.gid = meta.gid
        info.uname = info.gname = ""
        info.size = node.size if info.type == tarfile.REGTYPE else 0
        info.devmajor = meta.devmajor
        info.devminor = meta.devminor
        pax = {"SCHILY.xattr." + key: value.decode(ENCODING, ERRORS) for key, value in meta.xattrs}
        mtime = self._clamp(node.mtime)
        info.mtime = mtime // NS
        if mtime % NS:
            whole, frac = divmod(abs(mtime), NS)
            sign = "-" if mtime < 0 else ""
            pax["mtime"] = f"{sign}{whole}.{frac:09d}".rstrip("0")
        info.pax_headers = pax
        return info

    def _tarinfo_extra(self, path: bytes, item: ExtraFile) -> tarfile.TarInfo:
        info = tarfile.TarInfo(path.decode(ENCODING, ERRORS))
        info.type = tarfile.REGTYPE
        info.mode = item.mode & 0o7777
        info.uid = item.uid
        info.gid = item.gid
        info.uname = info.gname = ""
        info.size = len(item.data)
        info.mtime = 0 if self._sde_ns is None else self._sde_ns // NS
        return info

    def _plan_extras(self, extra: Sequence[ExtraFile]) -> dict[bytes, dict[bytes, ExtraFile]]:
        plan: dict[bytes, dict[bytes, ExtraFile]] = {}
        for item in extra:
            parts = _components(item.path)
            if not parts:
                raise ImageError(f"extra file {item.path!r} is not a path inside the image")
            parent_path = b"/".join(parts[:-1]) or b"."
            parent = self._find(parts[:-1])
            if not isinstance(parent, _Dir):
                raise ImageError(
                    f"cannot add {item.path!r}: {_show(parts[:-1])!r} is not a directory "
                    "in the image",
                    hint="add the directory to the image (e.g. RUN mkdir -p in the Dockerfile)",
                )
            if isinstance(parent.children.get(parts[-1]), _Dir):
                raise ImageError(f"cannot add {item.path!r}: the image has a directory there")
            siblings = plan.setdefault(parent_path, {})
            if parts[-1] in siblings:
                raise ImageError(f"extra file {item.path!r} is given twice")
            siblings[parts[-1]] = item
        return plan

    def _copy(self, sink: _Sink, path: bytes, node: _Node) -> None:
        fd = self._layers[node.layer].fileno()
        for length, offset in _extents(node):
            if offset is None:
                zeros = memoryview(ZEROS)
                for start in range(0, length, CHUNK):
                    sink.write(zeros[: min(CHUNK, length - start)])
                continue
            remaining = length
            while remaining:
                chunk = os.pread(fd, min(CHUNK, remaining), offset)
                if not chunk:
                    raise ImageError(
                        f"{path.decode(ENCODING, ERRORS)}: layer data ended early",
                        hint="the layout or workdir changed while oci2disk was reading it",
                    )
                sink.write(chunk)
                offset += len(chunk)
                remaining -= len(chunk)
        sink.pad(node.size)


class _Sink(BatchingWriter):
    """The tar stream: 512-byte blocks, closed by the end-of-archive marker."""

    def __init__(self, out: BinaryIO) -> None:
        super().__init__(out, BLOCK)

    def finish(self) -> None:
        self.write(bytes(2 * BLOCK))  # end-of-archive marker
        if self.written % RECORD:
            self.write(bytes(RECORD - self.written % RECORD))
        self.flush()
        self.out.flush()


# ---------------------------------------------------------------- reading layers

_DECOMPRESS_ERRORS: tuple[type[BaseException], ...] = (OSError, EOFError, zlib.error, ValueError)
try:
    import zstandard

    _DECOMPRESS_ERRORS = (*_DECOMPRESS_ERRORS, zstandard.ZstdError)
except ImportError:  # open_layer says how to install it when a zstd layer shows up
    pass


def flatten(
    image: OciImage,
    workdir: Path,
    *,
    source_date_epoch: int | None = None,
    drop_container_files: bool = True,
) -> FlatRootfs:
    """Apply the image's layers bottom to top and return the merged rootfs.

    Decompressed layers live in ``workdir`` (as files without a name) until the
    result is closed. Raises ``LayerError`` for an unsafe entry and ``ImageError``
    for a layer whose digest or diff_id does not match.
    """
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    builder = _Builder()
    layers: list[IO[bytes]] = []
    # Compressed layers are decompressed (and hashed) by a few threads ahead of the
    # index, which reads them in order: decompression, sha256 and file writes release
    # the GIL, the tar header parsing of the index does not.
    pool = ThreadPoolExecutor(max_workers=min(4, os.cpu_count() or 1))
    pending: dict[str, tuple[Future[IO[bytes]], str]] = {}
    try:
        for index, desc in enumerate(image.layers):
            diff_id = image.config.diff_ids[index]
            known = pending.get(desc.digest)
            if known is None:
                future = pool.submit(_layer_file, image, index, workdir)
                pending[desc.digest] = future, diff_id
            elif known[1] != diff_id:  # the same blob listed again with another diff_id
                raise _diff_id_error(desc, index, known[1], diff_id)
        for index, desc in enumerate(image.layers):
            layer = pending[desc.digest][0].result()
            layers.append(layer)
            log.debug("layer %d/%d %s", index + 1, len(image.layers), desc.digest)
            builder.apply_layer(index, desc.digest, layer)
        if drop_container_files:
            _drop_container_files(builder.root)
        return FlatRootfs(builder.root, layers, builder.linked, source_date_epoch)
    except BaseException:
        for future, _ in pending.values():
            future.cancel()
        pool.shutdown(wait=True)
        for future, _ in pending.values():
            if future.done() and not future.cancelled() and future.exception() is None:
                future.result().close()
        raise
    finally:
        pool.shutdown(wait=False)


def _diff_id_error(desc: Descriptor, index: int, actual: str, expected: str) -> ImageError:
    return ImageError(
        f"layer {desc.digest}: its uncompressed content has digest {actual}, "
        f"but the image config's diff_ids[{index}] is {expected}",
        hint="the image is corrupt or was assembled wrongly; build or export it again",
    )


def _layer_file(image: OciImage, index: int, workdir: Path) -> IO[bytes]:
    """The layer's uncompressed tar, open: the checked blob itself, or a decompressed copy."""
    desc = image.layers[index]
    diff_id = image.config.diff_ids[index]
    compression = LAYER_COMPRESSION[desc.media_type]
    if compression == "none":
        blob = open_verified_blob(image.layout, desc)
        # The blob's sha256 is its uncompressed digest, and it was just checked.
        if desc.digest != diff_id:
            blob.close()
            raise _diff_id_error(desc, index, desc.digest, diff_id)
        return blob
    out = tempfile.TemporaryFile(dir=workdir, prefix="layer-")  # noqa: SIM115  # kept open
    try:
        digest = hashlib.sha256()
        with open_layer(image, desc) as stream:  # checks the blob's size and digest first
            try:
                while chunk := stream.read(CHUNK):
                    digest.update(chunk)
                    out.write(chunk)
            except _DECOMPRESS_ERRORS as exc:
                raise ImageError(
                    f"layer {desc.digest}: cannot decompress its {compression} data ({exc})",
                    hint="the layer blob is corrupt; export the image again",
                ) from None
        out.flush()
        actual = "sha256:" + digest.hexdigest()
        if actual != diff_id:
            raise _diff_id_error(desc, index, actual, diff_id)
        return out
    except BaseException:
        out.close()
        raise


def _drop_container_files(root: _Dir) -> None:
    dockerenv = root.children.get(DOCKERENV)
    if dockerenv is not None and dockerenv.meta.kind is Kind.FILE:
        del root.children[DOCKERENV]
    etc = root.children.get(b"etc")
    if not isinstance(etc, _Dir):
        return
    for base in PLACEHOLDERS:
        node = etc.children.get(base)
        if node is not None and node.meta.kind is Kind.FILE and node.size == 0:
            del etc.children[base]
