"""Layers -> one canonical rootfs: whiteouts, links, xattrs, devices; no extraction.

The flattener reads each layer's tar headers (never file contents) and builds an
in-memory tree of the merged rootfs, as the OCI image spec's "Representing Changes"
describes it. A regular file is remembered as (layer file, data offset, size): an
uncompressed layer blob is read in place, a gzip or zstd layer is decompressed once
into a temporary file in ``workdir``. :meth:`FlatRootfs.write_tar` then streams one
canonical PAX tar in sorted order, which ``mke2fs -d -``, cpio and friends consume.

Nothing is ever written to the host except those temporary files, so ownership,
modes, device nodes and xattrs stay exact without privileges.

Host tools: none.
"""

from __future__ import annotations

import contextlib
import enum
import hashlib
import io
import logging
import os
import tarfile
import tempfile
import zlib
from base64 import b64decode
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, BinaryIO
from urllib.parse import unquote_to_bytes

from oci2disk.errors import ImageError, LayerError
from oci2disk.oci.layout import (
    LAYER_COMPRESSION,
    Descriptor,
    OciImage,
    open_layer,
)

if TYPE_CHECKING:
    from _typeshed import WriteableBuffer

log = logging.getLogger("oci2disk.flatten")

CHUNK = 1 << 20
BLOCK = tarfile.BLOCKSIZE
RECORD = tarfile.RECORDSIZE
ENCODING = "utf-8"
ERRORS = "surrogateescape"  # non-UTF-8 names round-trip byte for byte

WHITEOUT = ".wh."
OPAQUE = ".wh..wh..opq"
# Docker's placeholders: dropped only when they are empty regular files.
PLACEHOLDERS = ("etc/hosts", "etc/hostname", "etc/resolv.conf")
DOCKERENV = ".dockerenv"
IMPLIED_DIR_MODE = 0o755


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


class _Node:
    """One inode of the merged tree. A hard-linked file is one node under several names."""

    __slots__ = (
        "children",
        "devmajor",
        "devminor",
        "gid",
        "kind",
        "leader",
        "linkname",
        "mode",
        "mtime",
        "nlink",
        "offset",
        "size",
        "source",
        "uid",
        "xattrs",
    )

    def __init__(
        self,
        kind: Kind,
        mode: int,
        uid: int,
        gid: int,
        mtime: float,
        *,
        size: int = 0,
        source: int = -1,
        offset: int = 0,
        linkname: str = "",
        devmajor: int = 0,
        devminor: int = 0,
        xattrs: tuple[tuple[str, bytes], ...] = (),
    ) -> None:
        self.kind = kind
        self.mode = mode
        self.uid = uid
        self.gid = gid
        self.mtime = mtime
        self.size = size
        self.source = source
        self.offset = offset
        self.linkname = linkname
        self.devmajor = devmajor
        self.devminor = devminor
        self.xattrs = xattrs
        self.children: dict[str, _Node] | None = {} if kind is Kind.DIR else None
        self.nlink = 0
        self.leader = ""  # canonical first name of a multiply linked file

    def copy(self) -> _Node:
        return _Node(
            self.kind,
            self.mode,
            self.uid,
            self.gid,
            self.mtime,
            size=self.size,
            source=self.source,
            offset=self.offset,
            linkname=self.linkname,
            devmajor=self.devmajor,
            devminor=self.devminor,
            xattrs=self.xattrs,
        )


def _implied_dir() -> _Node:
    return _Node(Kind.DIR, IMPLIED_DIR_MODE, 0, 0, 0)


def _name_key(name: str) -> bytes:
    return name.encode(ENCODING, ERRORS)


def _split(name: str) -> list[str] | None:
    """Normalize a tar member name to components; None if ``..`` escapes the root."""
    parts: list[str] = []
    for part in name.split("/"):
        if part in ("", "."):
            continue
        if part == "..":
            if not parts:
                return None
            parts.pop()
        else:
            parts.append(part)
    return parts


@dataclass
class _Pending:
    """One non-whiteout member of the layer being applied."""

    name: str  # as in the tar, for messages
    parts: list[str]
    node: _Node
    link_parts: list[str] | None = None  # HARDLINK target


class _LayerReader:
    """Applies one layer's members to the merged tree."""

    def __init__(self, root: _Node, digest: str) -> None:
        self.root = root
        self.digest = digest

    def fail(self, name: str, problem: str, hint: str | None = None) -> LayerError:
        return LayerError(f"layer {self.digest}: entry {name!r}: {problem}", hint=hint)

    def parent_for_whiteout(self, parts: list[str]) -> _Node | None:
        node = self.root
        for part in parts:
            child = node.children.get(part) if node.children is not None else None
            if child is None or child.kind is not Kind.DIR:
                # Nothing of the lower layers lives below a non-directory: nothing to hide.
                return None
            node = child
        return node

    def whiteout(self, name: str, parts: list[str]) -> None:
        base = parts[-1]
        parent = self.parent_for_whiteout(parts[:-1])
        if parent is None or parent.children is None:
            return
        if base == OPAQUE:
            parent.children.clear()
        elif base.startswith(WHITEOUT + WHITEOUT):
            log.debug("layer %s: ignoring aufs metadata %r", self.digest, name)
        else:
            target = base[len(WHITEOUT) :]
            if target in ("", ".", ".."):
                raise self.fail(name, "is a whiteout for no name")
            parent.children.pop(target, None)

    def parent_dir(self, name: str, parts: list[str]) -> _Node:
        node = self.root
        for i, part in enumerate(parts):
            assert node.children is not None
            child = node.children.get(part)
            if child is None:
                child = _implied_dir()
                node.children[part] = child
            elif child.kind is Kind.SYMLINK:
                raise self.fail(
                    name,
                    f"its path passes through the symlink {'/'.join(parts[: i + 1])!r}",
                    hint="a layer must not write through a symlink; rebuild the image",
                )
            elif child.kind is not Kind.DIR:
                raise self.fail(name, f"its parent {'/'.join(parts[: i + 1])!r} is not a directory")
            node = child
        return node

    def lookup(self, parts: list[str]) -> _Node | None:
        node = self.root
        for part in parts:
            if node.children is None:
                return None
            child = node.children.get(part)
            if child is None:
                return None
            node = child
        return node

    def apply(self, item: _Pending) -> None:
        node = item.node
        if not item.parts:
            if node.kind is not Kind.DIR:
                raise self.fail(item.name, "replaces the root directory with a non-directory")
            _update_dir(self.root, node)
            return
        parent = self.parent_dir(item.name, item.parts[:-1])
        assert parent.children is not None
        base = item.parts[-1]
        if item.link_parts is not None:
            target = self.lookup(item.link_parts)
            if target is None:
                raise self.fail(
                    item.name,
                    f"hard link to {'/'.join(item.link_parts)!r}, which is not in the image",
                )
            if target.kind is Kind.DIR:
                raise self.fail(
                    item.name, f"hard link to the directory {'/'.join(item.link_parts)!r}"
                )
            # Only regular files keep a shared inode; a linked symlink, device or fifo is
            # equivalent to a copy and stays a plain entry of its own kind.
            parent.children[base] = target if target.kind is Kind.FILE else target.copy()
            return
        existing = parent.children.get(base)
        if existing is not None and existing.kind is Kind.DIR and node.kind is Kind.DIR:
            _update_dir(existing, node)  # a directory entry over a directory changes metadata
        else:
            parent.children[base] = node


def _update_dir(target: _Node, new: _Node) -> None:
    target.mode = new.mode
    target.uid = new.uid
    target.gid = new.gid
    target.mtime = new.mtime
    target.xattrs = new.xattrs


def _xattrs(info: tarfile.TarInfo) -> tuple[tuple[str, bytes], ...]:
    found: dict[str, bytes] = {}
    for key, value in info.pax_headers.items():
        if key.startswith("SCHILY.xattr."):
            found[key[len("SCHILY.xattr.") :]] = value.encode(ENCODING, ERRORS)
        elif key.startswith("LIBARCHIVE.xattr."):
            raw_name = unquote_to_bytes(key[len("LIBARCHIVE.xattr.") :])
            name = raw_name.decode(ENCODING, ERRORS)
            found.setdefault(name, b64decode(value + "=" * (-len(value) % 4)))
    return tuple(sorted(found.items(), key=lambda kv: _name_key(kv[0])))


class FlatRootfs:
    """The flattened rootfs of an image; owns temporary files until closed."""

    def __init__(
        self,
        root: _Node,
        sources: list[Path],
        temps: list[Path],
        source_date_epoch: int | None,
    ) -> None:
        self._root = root
        self._sources = sources
        self._temps = temps
        self._sde = source_date_epoch
        self._closed = False
        self.stats = self._finalize()

    # ----------------------------------------------------------- public API

    def entries(self) -> Iterator[Entry]:
        """Every path in canonical order: by path components, "." first."""
        for path, node in self._walk(self._root, {}):
            assert isinstance(node, _Node)
            yield self._entry(path, node)

    def lookup(self, path: str) -> Entry | None:
        parts = _split(path)
        if parts is None:
            return None
        node = self._find(parts)
        if node is None:
            return None
        return self._entry("/".join(parts) or ".", node)

    def open(self, path: str) -> BinaryIO:
        """Content of a regular file (or a hard link's file); symlinks are not followed."""
        self._check_open()
        parts = _split(path)
        node = self._find(parts) if parts is not None else None
        if node is None or node.kind is not Kind.FILE:
            raise ImageError(f"{path!r} is not a regular file in the image")
        fd = os.open(self._sources[node.source], os.O_RDONLY | os.O_CLOEXEC)
        return io.BufferedReader(_Slice(fd, node.offset, node.size), buffer_size=CHUNK)

    def write_tar(self, out: BinaryIO, *, extra: Sequence[ExtraFile] = ()) -> None:
        """Write the canonical PAX tar stream, with ``extra`` files added or replacing."""
        self._check_open()
        extras = self._plan_extras(extra)
        sink = _Sink(out)
        fds: dict[int, int] = {}
        leaders: dict[int, str] = {}
        try:
            for path, item in self._walk(self._root, extras):
                if isinstance(item, ExtraFile):
                    info = self._tarinfo_extra(path, item)
                    sink.write(info.tobuf(tarfile.PAX_FORMAT, ENCODING, ERRORS))
                    sink.write(item.data)
                    sink.pad(len(item.data))
                    continue
                node = item
                link = ""
                if node.kind is Kind.FILE and node.nlink > 1:
                    # Leaders are recomputed here: an extra file may have replaced one.
                    link = leaders.setdefault(id(node), path)
                    if link == path:
                        link = ""
                info = self._tarinfo(path, node, link)
                sink.write(info.tobuf(tarfile.PAX_FORMAT, ENCODING, ERRORS))
                if info.type == tarfile.REGTYPE and node.size:
                    fd = fds.get(node.source)
                    if fd is None:
                        fd = fds[node.source] = os.open(
                            self._sources[node.source], os.O_RDONLY | os.O_CLOEXEC
                        )
                    self._copy(sink, fd, path, node)
            sink.finish()
        finally:
            for fd in fds.values():
                os.close(fd)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        _remove(self._temps)

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

    def _clamp(self, mtime: float) -> float:
        return mtime if self._sde is None else min(mtime, self._sde)

    def _find(self, parts: list[str]) -> _Node | None:
        node = self._root
        for part in parts:
            if node.children is None:
                return None  # a symlink or file: never followed
            child = node.children.get(part)
            if child is None:
                return None
            node = child
        return node

    def _finalize(self) -> RootfsStats:
        # Pass 1: sort every directory once (dicts keep insertion order) and count names.
        stack = [self._root]
        while stack:
            node = stack.pop()
            assert node.children is not None
            ordered = sorted(node.children.items(), key=lambda kv: _name_key(kv[0]))
            node.children = dict(ordered)
            for _, child in ordered:
                if child.kind is Kind.DIR:
                    stack.append(child)
                elif child.kind is Kind.FILE:
                    child.nlink += 1
        # Pass 2: the first name in canonical order leads each link set; count.
        counts = dict.fromkeys(Kind, 0)
        data_bytes = 0
        used_sources: set[int] = set()
        for path, item in self._walk(self._root, {}):
            assert isinstance(item, _Node)
            kind = item.kind
            if kind is Kind.FILE:
                if item.nlink > 1 and item.leader:
                    kind = Kind.HARDLINK
                else:
                    item.leader = path if item.nlink > 1 else ""
                    data_bytes += item.size
                    used_sources.add(item.source)
            counts[kind] += 1
        # Decompressed layers that no surviving file reads from are not needed.
        for index, source in enumerate(self._sources):
            if index not in used_sources and source in self._temps:
                _remove([source])
                self._temps.remove(source)
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
        self, root: _Node, extras: dict[str, dict[str, ExtraFile]]
    ) -> Iterator[tuple[str, _Node | ExtraFile]]:
        """Depth first, children in byte order of their names: the canonical order."""
        yield ".", root
        stack = [("", self._children(root, ".", extras))]
        while stack:
            prefix, items = stack[-1]
            item = next(items, None)
            if item is None:
                stack.pop()
                continue
            name, node = item
            path = prefix + name
            yield path, node
            if isinstance(node, _Node) and node.kind is Kind.DIR:
                stack.append((path + "/", self._children(node, path, extras)))

    @staticmethod
    def _children(
        node: _Node, path: str, extras: dict[str, dict[str, ExtraFile]]
    ) -> Iterator[tuple[str, _Node | ExtraFile]]:
        assert node.children is not None
        added = extras.get(path)
        if not added:
            return iter(node.children.items())
        merged: dict[str, _Node | ExtraFile] = {**node.children, **added}
        return iter(sorted(merged.items(), key=lambda kv: _name_key(kv[0])))

    def _entry(self, path: str, node: _Node) -> Entry:
        kind = node.kind
        linkname = node.linkname
        size = node.size
        if kind is Kind.FILE and node.nlink > 1 and node.leader != path:
            kind, linkname, size = Kind.HARDLINK, node.leader, 0
        return Entry(
            path=path,
            kind=kind,
            mode=node.mode,
            uid=node.uid,
            gid=node.gid,
            size=size,
            mtime=float(self._clamp(node.mtime)),
            linkname=linkname,
            devmajor=node.devmajor,
            devminor=node.devminor,
            xattrs=node.xattrs,
        )

    def _tarinfo(self, path: str, node: _Node, hardlink_to: str) -> tarfile.TarInfo:
        info = tarfile.TarInfo(path)
        # A link entry carries its file's full metadata: mke2fs applies the link's
        # header to the shared inode.
        info.type = tarfile.LNKTYPE if hardlink_to else _KIND_TYPES[node.kind]
        info.linkname = hardlink_to or node.linkname
        info.mode = node.mode
        info.uid = node.uid
        info.gid = node.gid
        info.uname = info.gname = ""
        info.size = node.size if info.type == tarfile.REGTYPE else 0
        info.mtime = _tar_mtime(self._clamp(node.mtime))
        info.devmajor = node.devmajor
        info.devminor = node.devminor
        info.pax_headers = {
            "SCHILY.xattr." + key: value.decode(ENCODING, ERRORS) for key, value in node.xattrs
        }
        return info

    def _tarinfo_extra(self, path: str, item: ExtraFile) -> tarfile.TarInfo:
        info = tarfile.TarInfo(path)
        info.type = tarfile.REGTYPE
        info.mode = item.mode & 0o7777
        info.uid = item.uid
        info.gid = item.gid
        info.uname = info.gname = ""
        info.size = len(item.data)
        info.mtime = self._sde or 0
        return info

    def _plan_extras(self, extra: Sequence[ExtraFile]) -> dict[str, dict[str, ExtraFile]]:
        plan: dict[str, dict[str, ExtraFile]] = {}
        for item in extra:
            parts = _split(item.path)
            if not parts:
                raise ImageError(f"extra file {item.path!r} is not a path inside the image")
            parent_path = "/".join(parts[:-1]) or "."
            parent = self._find(parts[:-1])
            if parent is None or parent.kind is not Kind.DIR:
                raise ImageError(
                    f"cannot add {item.path!r}: {parent_path!r} is not a directory in the image",
                    hint="add the directory to the image (e.g. RUN mkdir -p in the Dockerfile)",
                )
            assert parent.children is not None
            existing = parent.children.get(parts[-1])
            if existing is not None and existing.kind is Kind.DIR:
                raise ImageError(f"cannot add {item.path!r}: the image has a directory there")
            siblings = plan.setdefault(parent_path, {})
            if parts[-1] in siblings:
                raise ImageError(f"extra file {item.path!r} is given twice")
            siblings[parts[-1]] = item
        return plan

    def _copy(self, sink: _Sink, fd: int, path: str, node: _Node) -> None:
        offset, remaining = node.offset, node.size
        while remaining:
            chunk = os.pread(fd, min(CHUNK, remaining), offset)
            if not chunk:
                raise ImageError(
                    f"{path}: layer data ended early in {self._sources[node.source]}",
                    hint="the layout or workdir changed while oci2disk was reading it",
                )
            sink.write(chunk)
            offset += len(chunk)
            remaining -= len(chunk)
        sink.pad(node.size)


def _tar_mtime(mtime: float) -> float | int:
    return int(mtime) if float(mtime).is_integer() else mtime


class _Sink:
    """Batches small writes (headers, small files) into 1 MiB writes."""

    def __init__(self, out: BinaryIO) -> None:
        self.out = out
        self.buf = bytearray()
        self.written = 0

    def write(self, data: bytes) -> None:
        self.written += len(data)
        if len(data) >= CHUNK // 4:
            self.flush()
            self.out.write(data)
            return
        self.buf += data
        if len(self.buf) >= CHUNK:
            self.flush()

    def pad(self, size: int) -> None:
        if size % BLOCK:
            self.write(bytes(BLOCK - size % BLOCK))

    def flush(self) -> None:
        if self.buf:
            self.out.write(bytes(self.buf))  # a copy: the sink may keep what it is given
            self.buf.clear()

    def finish(self) -> None:
        self.write(bytes(2 * BLOCK))  # end-of-archive marker
        if self.written % RECORD:
            self.write(bytes(RECORD - self.written % RECORD))
        self.flush()
        self.out.flush()


class _Slice(io.RawIOBase):
    """Read-only view of ``size`` bytes at ``offset`` of a file descriptor it owns."""

    def __init__(self, fd: int, offset: int, size: int) -> None:
        self._fd = fd
        self._start = offset
        self._size = size
        self._pos = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, pos: int, whence: int = os.SEEK_SET) -> int:
        base = {os.SEEK_SET: 0, os.SEEK_CUR: self._pos, os.SEEK_END: self._size}[whence]
        self._pos = max(0, base + pos)
        return self._pos

    def readinto(self, buffer: WriteableBuffer) -> int:
        view = memoryview(buffer).cast("B")
        want = min(len(view), self._size - self._pos)
        if want <= 0:
            return 0
        data = os.pread(self._fd, want, self._start + self._pos)
        view[: len(data)] = data
        self._pos += len(data)
        return len(data)

    def close(self) -> None:
        if not self.closed:
            os.close(self._fd)
        super().close()


def _remove(paths: list[Path]) -> None:
    for path in paths:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


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

    Temporary files (decompressed layers) live in ``workdir`` until the result is
    closed. Raises ``LayerError`` for an unsafe entry and ``ImageError`` for a layer
    whose digest or diff_id does not match.
    """
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    root = _Node(Kind.DIR, IMPLIED_DIR_MODE, 0, 0, 0)
    sources: list[Path] = []
    temps: list[Path] = []
    by_digest: dict[str, tuple[int, str]] = {}
    try:
        for index, desc in enumerate(image.layers):
            diff_id = image.config.diff_ids[index]
            known = by_digest.get(desc.digest)
            if known is None:
                known = len(sources), diff_id
                sources.append(_layer_source(image, index, workdir, temps))
                by_digest[desc.digest] = known
            elif known[1] != diff_id:  # the same blob listed again with another diff_id
                raise _diff_id_error(desc, index, known[1], diff_id)
            log.debug("layer %d/%d %s", index + 1, len(image.layers), desc.digest)
            _apply_layer(root, desc.digest, sources[known[0]], known[0])
        if drop_container_files:
            _drop_container_files(root)
        return FlatRootfs(root, sources, temps, source_date_epoch)
    except BaseException:
        _remove(temps)
        raise


def _diff_id_error(desc: Descriptor, index: int, actual: str, expected: str) -> ImageError:
    return ImageError(
        f"layer {desc.digest}: its uncompressed content has digest {actual}, "
        f"but the image config's diff_ids[{index}] is {expected}",
        hint="the image is corrupt or was assembled wrongly; build or export it again",
    )


def _layer_source(image: OciImage, index: int, workdir: Path, temps: list[Path]) -> Path:
    """Path of the layer's uncompressed tar: the blob itself, or a decompressed temp file."""
    desc = image.layers[index]
    diff_id = image.config.diff_ids[index]
    compression = LAYER_COMPRESSION[desc.media_type]
    with open_layer(image, desc) as stream:  # checks the blob's size and digest
        if compression == "none":
            # The blob's sha256 is its uncompressed digest and open_layer just checked it.
            if desc.digest != diff_id:
                raise _diff_id_error(desc, index, desc.digest, diff_id)
            return image.blob_path(desc.digest)
        fd, name = tempfile.mkstemp(dir=workdir, prefix="layer-", suffix=".tar")
        path = Path(name)
        temps.append(path)
        digest = hashlib.sha256()
        with os.fdopen(fd, "wb") as out:
            try:
                while chunk := stream.read(CHUNK):
                    digest.update(chunk)
                    out.write(chunk)
            except _DECOMPRESS_ERRORS as exc:
                raise ImageError(
                    f"layer {desc.digest}: cannot decompress its {compression} data ({exc})",
                    hint="the layer blob is corrupt; export the image again",
                ) from None
    actual = "sha256:" + digest.hexdigest()
    if actual != diff_id:
        raise _diff_id_error(desc, index, actual, diff_id)
    return path


def _apply_layer(root: _Node, digest: str, path: Path, source: int) -> None:
    reader = _LayerReader(root, digest)
    whiteouts: list[tuple[str, list[str]]] = []
    pending: list[_Pending] = []
    size = path.stat().st_size
    try:
        with (
            path.open("rb") as raw,
            tarfile.open(fileobj=raw, mode="r:", encoding=ENCODING, errors=ERRORS) as tar,
        ):
            while (info := tar.next()) is not None:
                # The index is ours; tarfile need not keep every TarInfo too.
                tar.members = []  # type: ignore[attr-defined]
                item = _member(reader, info, source, size)
                if item is None:
                    continue
                if isinstance(item, _Pending):
                    pending.append(item)
                else:
                    whiteouts.append(item)
    except tarfile.TarError as exc:
        raise ImageError(
            f"layer {digest}: not a readable tar ({exc})",
            hint="the layer is corrupt or truncated; export the image again",
        ) from None
    # Whiteouts hide lower layers only: an entry of this layer with the same name wins
    # whatever its position in the tar.
    for name, parts in whiteouts:
        reader.whiteout(name, parts)
    for item in pending:
        reader.apply(item)


def _member(
    reader: _LayerReader, info: tarfile.TarInfo, source: int, layer_size: int
) -> _Pending | tuple[str, list[str]] | None:
    name = info.name
    parts = _split(name)
    if parts is None:
        raise reader.fail(name, "its path escapes the image root with '..'")
    if parts and parts[-1].startswith(WHITEOUT):
        return name, parts
    kind = _TAR_KINDS.get(info.type)
    if kind is None:
        raise reader.fail(name, f"unsupported tar entry type {info.type!r}")
    if info.sparse is not None:
        raise reader.fail(
            name,
            "is a sparse file, which oci2disk cannot read",
            hint="rebuild the image without sparse files in its layers",
        )
    size = info.size if kind is Kind.FILE else 0
    if kind is Kind.FILE and info.offset_data + size > layer_size:
        raise reader.fail(name, "its data runs past the end of the layer (truncated)")
    node = _Node(
        kind,
        info.mode & 0o7777,
        info.uid,
        info.gid,
        info.mtime,
        size=size,
        source=source,
        offset=info.offset_data,
        linkname=info.linkname if kind is Kind.SYMLINK else "",
        devmajor=info.devmajor if kind in (Kind.CHAR, Kind.BLOCK) else 0,
        devminor=info.devminor if kind in (Kind.CHAR, Kind.BLOCK) else 0,
        xattrs=_xattrs(info),
    )
    link_parts = None
    if kind is Kind.HARDLINK:
        link_parts = _split(info.linkname)
        if link_parts is None:
            raise reader.fail(name, f"hard link to {info.linkname!r} escapes the image root")
        if not link_parts:
            raise reader.fail(name, "hard link to the root directory")
    return _Pending(name, parts, node, link_parts)


def _drop_container_files(root: _Node) -> None:
    assert root.children is not None
    dockerenv = root.children.get(DOCKERENV)
    if dockerenv is not None and dockerenv.kind is Kind.FILE:
        del root.children[DOCKERENV]
    etc = root.children.get("etc")
    if etc is None or etc.children is None:
        return
    for path in PLACEHOLDERS:
        base = path.split("/")[-1]
        node = etc.children.get(base)
        if node is not None and node.kind is Kind.FILE and node.size == 0:
            del etc.children[base]
