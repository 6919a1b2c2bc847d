"""Layers -> one merged rootfs tree: whiteouts, links, xattrs, devices; no extraction.

The flattener reads each layer's tar headers (never file contents) and builds an
in-memory tree of the merged rootfs, as the OCI image spec's "Applying Changesets"
describes it. A regular file is remembered as (layer, data offset, size): an
uncompressed layer blob is read in place, a gzip or zstd layer is decompressed once
into an anonymous temporary file (:mod:`oci2disk.oci.layers`). The result is a
:class:`~oci2disk.rootfs.flat.FlatRootfs`.

Nothing is ever written to the host except those temporary files (which have no
name, so even a killed run leaves nothing behind), so ownership, modes, device
nodes and xattrs stay exact without privileges.

Layers are applied in stream order. A whiteout hides what the lower layers put at
its path, never what its own layer puts there, wherever the two stand in the tar
(the spec's "whiteout files MUST only apply to resources in lower/parent layers"):
each node carries the index of the layer that last wrote it, and a whiteout keeps
whatever its own layer wrote below the path.

Host tools: none.
"""

from __future__ import annotations

import logging
import os
import re
import tarfile
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import IO

from oci2disk.errors import ImageError, LayerError
from oci2disk.oci import cache
from oci2disk.oci.layers import diff_id_error, file_members, indexing, layer_file
from oci2disk.oci.layout import OciImage
from oci2disk.rootfs.flat import FlatRootfs
from oci2disk.rootfs.model import NS, Kind, pax_xattrs
from oci2disk.rootfs.tree import (
    IMPLIED_DIR_MODE,
    IMPLIED_META,
    LAYER_BITS,
    LAYER_MASK,
    Dir,
    Meta,
    Node,
    Sparse,
    components,
    show,
)

log = logging.getLogger("oci2disk.flatten")

BLOCK = tarfile.BLOCKSIZE
WHITEOUT = b".wh."
OPAQUE = b".wh..wh..opq"
AUFS_META = b".wh..wh."  # aufs bookkeeping (.wh..wh.plnk, .wh..wh.aufs): not image content
# Docker's placeholders: dropped only when they are empty regular files.
PLACEHOLDERS = (b"hosts", b"hostname", b"resolv.conf")
DOCKERENV = b".dockerenv"
# One entry's headers (PAX records, GNU long names, sparse maps) may not exceed this:
# a hostile layer must not make the flattener allocate what it likes.
ID_MAX = 0xFFFFFFFF  # uid_t and gid_t are 32 bits
XATTR_MAX = 65536  # bytes of one xattr value Linux takes (XATTR_SIZE_MAX)

_TAR_KINDS = {
    tarfile.REGTYPE: Kind.FILE,
    tarfile.AREGTYPE: Kind.FILE,
    tarfile.CONTTYPE: Kind.FILE,
    tarfile.GNUTYPE_SPARSE: Kind.FILE,
    tarfile.DIRTYPE: Kind.DIR,
    tarfile.SYMTYPE: Kind.SYMLINK,
    tarfile.CHRTYPE: Kind.CHAR,
    tarfile.BLKTYPE: Kind.BLOCK,
    tarfile.FIFOTYPE: Kind.FIFO,
}

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


class _Builder:
    """Applies layers, bottom first, to the merged tree."""

    def __init__(self) -> None:
        self.root = Dir(IMPLIED_META, 0, 0)
        self.linked: set[Node] = set()  # files that a hard-link entry gave another name
        self.metas: dict[Meta, Meta] = {}
        self._last_mtime = 0
        # Per layer: which directory entries this layer wrote, to keep whiteouts off them.
        self.layer = 0
        self.digest = ""
        self.touched: set[Dir] = set()  # directories this layer wrote something below
        self.pruned: set[Dir] = set()  # directories already cleared of lower content
        self.linked_here: set[tuple[Dir, bytes]] = set()  # names made by hard links

    # ----------------------------------------------------------- one layer

    def apply_layer(
        self, index: int, digest: str, members: Iterable[tuple[tarfile.TarInfo, int]]
    ) -> None:
        """Apply one layer's members (its tar headers, each with the offset of the
        header after it)."""
        if index > LAYER_MASK:
            raise ImageError(f"the image has more than {LAYER_MASK} layers")
        self.layer, self.digest = index, digest
        self.touched, self.pruned, self.linked_here = set(), set(), set()
        name = "(first entry)"
        try:
            for info, next_header in members:
                name = info.name
                self.member(info, next_header)
        except (ValueError, OverflowError, IndexError) as exc:
            raise ImageError(
                f"layer {digest}: not a readable tar after entry {name!r} ({exc})",
                hint="the layer is corrupt or truncated; export the image again",
            ) from None

    def fail(self, name: str, problem: str, hint: str | None = None) -> LayerError:
        return LayerError(f"layer {self.digest}: entry {name!r}: {problem}", hint=hint)

    def member(self, info: tarfile.TarInfo, next_header: int) -> None:
        name = info.name
        if "\0" in name or "\0" in info.linkname:
            raise self.fail(name, "its name or link target holds a NUL byte")
        parts = components(name)
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
        self.check_numbers(info)
        if info.type == tarfile.LNKTYPE:
            self.hardlink(info, parts)
            return
        kind = _TAR_KINDS.get(info.type)
        if kind is None:
            raise self.fail(name, f"unsupported tar entry type {info.type!r}")
        node = self.node(info, kind, next_header)
        if not parts:
            if not isinstance(node, Dir):
                raise self.fail(name, "replaces the root directory with a non-directory")
            self.set_dir(self.root, node)
            return
        parent = self.parent(name, parts)
        base = parts[-1]
        existing = parent.children.get(base)
        if isinstance(node, Dir) and isinstance(existing, Dir):
            self.set_dir(existing, node)  # "the existing path's attributes MUST be replaced"
        else:
            parent.children[base] = node

    def check_numbers(self, info: tarfile.TarInfo) -> None:
        """PAX headers carry any decimal: an id outside 32 bits would wrap to another
        owner (2**32 + 5 to 5, 2**40 to root) in every filesystem and archive written."""
        for what, value in (("uid", info.uid), ("gid", info.gid)):
            if not 0 <= value <= ID_MAX:
                raise self.fail(
                    info.name,
                    f"its {what} {value} is outside 0..{ID_MAX}, which no filesystem can hold",
                    hint="the layer is corrupt or hostile; rebuild the image",
                )
        if info.size < 0:
            raise self.fail(info.name, f"its size {info.size} is negative")
        for what, value in (("major", info.devmajor), ("minor", info.devminor)):
            if not 0 <= value <= ID_MAX:
                raise self.fail(info.name, f"its device {what} number {value} is out of range")

    def node(self, info: tarfile.TarInfo, kind: Kind, next_header: int) -> Node:
        linkname = info.linkname if kind is Kind.SYMLINK else ""
        dev = (info.devmajor, info.devminor) if kind in (Kind.CHAR, Kind.BLOCK) else (0, 0)
        # Symlinks have no permissions of their own on Linux: always 0777.
        mode = 0o777 if kind is Kind.SYMLINK else info.mode & 0o7777
        xattrs = pax_xattrs(info.pax_headers)
        for key, value in xattrs:
            if len(value) > XATTR_MAX:
                raise self.fail(
                    info.name,
                    f"its xattr {key!r} holds {len(value)} bytes; Linux takes at most "
                    f"{XATTR_MAX} (XATTR_SIZE_MAX), so no filesystem could carry it",
                    hint="remove the attribute from the image (setfattr -x) and build it again",
                )
        meta = Meta(kind, mode, info.uid, info.gid, xattrs, linkname, *dev)
        meta = self.metas.setdefault(meta, meta)
        mtime = _mtime_ns(info)
        if mtime == self._last_mtime:
            mtime = self._last_mtime  # neighbours mostly share one: keep one int object
        self._last_mtime = mtime
        if kind is Kind.DIR:
            return Dir(meta, mtime, self.layer)
        if kind is not Kind.FILE:
            return Node(meta, mtime, 0, self.layer)
        where = (info.offset_data << LAYER_BITS) | self.layer
        available = next_header - info.offset_data
        if info.sparse is None:
            if info.size > available:
                raise self.fail(info.name, "its data runs past the end of the layer (truncated)")
            return Node(meta, mtime, info.size, where)
        segments = self.sparse_map(info, available)
        return Sparse(meta, mtime, info.size, where, segments)

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

    def parent(self, name: str, parts: list[bytes]) -> Dir:
        """The directory that will hold ``parts``, created (implied) where missing."""
        node = self.root
        for i, part in enumerate(parts[:-1]):
            self.touched.add(node)
            child = node.children.get(part)
            if child is None:
                child = node.children[part] = Dir(self.implied(node), 0, self.layer)
            elif not isinstance(child, Dir):
                if child.meta.kind is Kind.SYMLINK:
                    raise self.fail(
                        name,
                        f"its path passes through the symlink {show(parts[: i + 1])!r}",
                        hint="a layer must not write through a symlink; rebuild the image",
                    )
                raise self.fail(name, f"its parent {show(parts[: i + 1])!r} is not a directory")
            node = child
        self.touched.add(node)
        return node

    def implied(self, parent: Dir) -> Meta:
        """A missing parent directory: 0755 root, as extraction makes it; below a setgid
        directory it inherits the bit and the group, as mkdir(2) does on Linux."""
        if not parent.meta.mode & 0o2000:
            return IMPLIED_META
        meta = Meta(Kind.DIR, IMPLIED_DIR_MODE | 0o2000, 0, parent.meta.gid)
        return self.metas.setdefault(meta, meta)

    def find(self, parts: Sequence[bytes]) -> Node | None:
        """The node at ``parts``; never follows a symlink."""
        node: Node = self.root
        for part in parts:
            if not isinstance(node, Dir):
                return None
            child = node.children.get(part)
            if child is None:
                return None
            node = child
        return node

    def set_dir(self, target: Dir, new: Dir) -> None:
        target.meta = new.meta
        target.mtime = new.mtime
        target.where = self.layer

    def hardlink(self, info: tarfile.TarInfo, parts: list[bytes]) -> None:
        name = info.name
        link_parts = components(info.linkname)
        if link_parts is None:
            raise self.fail(name, f"hard link to {info.linkname!r} escapes the image root")
        if not link_parts or not parts:
            raise self.fail(name, "hard link to or from the root directory")
        if link_parts[: len(parts)] == parts:
            # Applying the entry first removes what is at its path, and its target with it.
            raise self.fail(name, f"hard link to {show(link_parts)!r}, which it would replace")
        target = self.find(link_parts)
        if target is None:
            raise self.fail(
                name,
                f"hard link to {show(link_parts)!r}, which is not in the image",
                hint="a hard link must name a file of the image by a path without symlinks",
            )
        if isinstance(target, Dir):
            raise self.fail(name, f"hard link to the directory {show(link_parts)!r}")
        parent = self.parent(name, parts)
        base = parts[-1]
        if target.meta.kind is Kind.FILE:
            # The link's own header carries no metadata of its own (its file's rules).
            parent.children[base] = target
            self.linked.add(target)
            self.linked_here.add((parent, base))
        else:
            # A linked symlink, device or fifo is equivalent to a copy of it.
            parent.children[base] = Node(target.meta, target.mtime, 0, self.layer)

    # ----------------------------------------------------------- whiteouts

    def whiteout(self, name: str, parts: list[bytes]) -> None:
        base = parts[-1]
        parent = self.find(parts[:-1])
        if not isinstance(parent, Dir):
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
        if not isinstance(node, Dir):
            if not self.mine(parent, target, node):
                del parent.children[target]
        elif node.layer == self.layer:
            self.prune(node)  # this layer's directory: only what lower layers left inside goes
        elif node in self.touched:
            self.prune(node)  # the lower directory goes, this layer's entries below it stay
            self.set_dir(node, Dir(self.implied(parent), 0, self.layer))
        else:
            del parent.children[target]

    def mine(self, parent: Dir, name: bytes, node: Node) -> bool:
        return node.layer == self.layer or (parent, name) in self.linked_here

    def prune(self, top: Dir) -> None:
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
                if isinstance(child, Dir):
                    if child.layer == self.layer:
                        stack.append(child)
                    elif child in self.touched:
                        stack.append(child)
                        self.set_dir(child, Dir(self.implied(directory), 0, self.layer))
                    else:
                        del directory.children[name]
                elif not self.mine(directory, name, child):
                    del directory.children[name]


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
                future = pool.submit(layer_file, image, index, workdir)
                pending[desc.digest] = future, diff_id
            elif known[1] != diff_id:  # the same blob listed again with another diff_id
                raise diff_id_error(desc, index, known[1], diff_id)
        for index, desc in enumerate(image.layers):
            layer = pending[desc.digest][0].result()
            layers.append(layer)
            log.debug("layer %d/%d %s", index + 1, len(image.layers), desc.digest)
            builder.apply_layer(index, desc.digest, _members(image, desc.digest, layer))
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


def _members(
    image: OciImage, digest: str, layer: IO[bytes]
) -> Iterator[tuple[tarfile.TarInfo, int]]:
    """The layer's members: from the cache's index when the image is read from the
    cache (made as the layer arrived, or by an earlier run), else from the layer's tar
    headers now, then kept in the cache for the next run."""
    store = cache.active()
    if store is None or image.layout != store.root:
        return file_members(layer, digest)
    found = store.layer_index(digest)
    if found is not None:
        return iter(found.members)
    return indexing(file_members(layer, digest), lambda index: store.remember_index(digest, index))


def _drop_container_files(root: Dir) -> None:
    dockerenv = root.children.get(DOCKERENV)
    if dockerenv is not None and dockerenv.meta.kind is Kind.FILE:
        del root.children[DOCKERENV]
    etc = root.children.get(b"etc")
    if not isinstance(etc, Dir):
        return
    for base in PLACEHOLDERS:
        node = etc.children.get(base)
        if node is not None and node.meta.kind is Kind.FILE and node.size == 0:
            del etc.children[base]
