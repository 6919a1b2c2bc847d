"""The flattened rootfs of an image: a :class:`~oci2disk.rootfs.model.Tree`, and the
one canonical tar stream every output is written from.

:meth:`FlatRootfs.write_tar` streams one PAX tar in sorted order, which ``mke2fs -d -``
and the archive writers consume. Its mode fields hold permission bits only: e2fsprogs
reads a hard-link entry whose mode field carries type bits (as Go's archive/tar writes
it) as an empty regular file.

Host tools: none.
"""

from __future__ import annotations

import copy
import io
import os
import tarfile
from collections.abc import Iterator, Sequence
from types import TracebackType
from typing import IO, BinaryIO

from oci2disk.bytestreams import CHUNK, ZEROS, RunReader
from oci2disk.errors import ImageError
from oci2disk.rootfs.model import ENCODING, ERRORS, NS, Entry, ExtraFile, Kind, RootfsStats
from oci2disk.rootfs.tarwriter import TarSink, tarinfo
from oci2disk.rootfs.tree import Dir, Meta, Node, by_name, components, extents, show

Overlay = dict[bytes, dict[bytes, "Node | None"]]  # parent path -> name -> node (None: removed)


class Inline(Node):
    """A regular file whose content oci2disk supplies (an fstab, an emptied machine-id)."""

    __slots__ = ("data",)

    def __init__(self, meta: Meta, mtime: int, data: bytes) -> None:
        super().__init__(meta, mtime, len(data), 0)
        self.data = data


class FlatRootfs:
    """The flattened rootfs of an image; owns the open layer files until closed.

    :meth:`edited` gives a view with files added, replaced or removed (the base tree is
    never changed); views share the base's layer files and are closed with it.
    """

    def __init__(
        self,
        root: Dir,
        layers: list[IO[bytes]],
        linked: set[Node],
        source_date_epoch: int | None,
    ) -> None:
        self._root = root
        self._layers = layers  # per layer index; a blob listed twice is one file object
        self._sde_ns = None if source_date_epoch is None else source_date_epoch * NS
        self._closed = False
        self._owner = True
        self._overlay: Overlay = {}
        self._leaders: dict[Node, bytes] = {}
        self.stats = self._finalize(linked)

    # ----------------------------------------------------------- public API

    def entries(self) -> Iterator[Entry]:
        """Every path in canonical order: by path components, "." first."""
        for path, node in self._walk(self._overlay):
            yield self._entry(path, node)

    def edited(
        self,
        *,
        files: Sequence[ExtraFile] = (),
        dirs: Sequence[str] = (),
        remove: Sequence[str] = (),
    ) -> FlatRootfs:
        """A view of this rootfs with ``dirs`` made (root, 0755, where missing), ``files``
        added or replaced, and ``remove`` (with everything below) gone."""
        view = copy.copy(self)
        view._owner = False
        view._overlay = {k: dict(v) for k, v in self._overlay.items()}
        for text in dirs:
            parts = self._extra_parts(text, view)
            if view._find(parts) is None:
                node = Dir(Meta(Kind.DIR, 0o755, 0, 0), self._sde_ns or 0, 0)
                view._overlay.setdefault(b"/".join(parts[:-1]) or b".", {})[parts[-1]] = node
        for text in remove:
            gone = components(text)
            if not gone or view._find(gone) is None:
                raise ImageError(f"cannot remove {text!r}: it is not in the image")
            view._overlay.setdefault(b"/".join(gone[:-1]) or b".", {})[gone[-1]] = None
        view._overlay = view._plan_extras(files)
        view._leaders = view._link_leaders()
        return view

    def lookup(self, path: str) -> Entry | None:
        parts = components(path)
        node = self._find(parts) if parts is not None else None
        if node is None or parts is None:
            return None
        return self._entry(b"/".join(parts) or b".", node)

    def open(self, path: str) -> BinaryIO:
        """Content of a regular file (or a hard link's file); symlinks are not followed."""
        self._check_open()
        parts = components(path)
        node = self._find(parts) if parts is not None else None
        if node is None or node.meta.kind is not Kind.FILE:
            raise ImageError(f"{path!r} is not a regular file in the image")
        if isinstance(node, Inline):
            return io.BytesIO(node.data)
        fd = os.dup(self._layers[node.layer].fileno())
        return io.BufferedReader(
            RunReader(fd, list(extents(node)), close_fd=True), buffer_size=CHUNK
        )

    def write_tar(self, out: BinaryIO, *, extra: Sequence[ExtraFile] = ()) -> None:
        """Write the canonical PAX tar stream, with ``extra`` files added or replacing."""
        self._check_open()
        overlay = self._plan_extras(extra)
        sink = TarSink(out)
        leaders: dict[Node, bytes] = {}
        for path, node in self._walk(overlay):
            link = b""
            if node in self._leaders:
                # Leaders are recomputed here: an extra file may have replaced one.
                link = leaders.setdefault(node, path)
                if link == path:
                    link = b""
            info = tarinfo(self._entry(path, node), link.decode(ENCODING, ERRORS))
            sink.write(info.tobuf(tarfile.PAX_FORMAT, ENCODING, ERRORS))
            if info.type == tarfile.REGTYPE and node.size:
                self._copy(sink, path, node)
        sink.finish()

    def close(self) -> None:
        if self._closed or not self._owner:
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

    def _find(self, parts: list[bytes]) -> Node | None:
        node: Node = self._root
        path = b"."
        for part in parts:
            if not isinstance(node, Dir):
                return None  # a symlink or file: never followed
            over = self._overlay.get(path)
            child = over[part] if over is not None and part in over else node.children.get(part)
            if child is None:
                return None
            node = child
            path = part if path == b"." else path + b"/" + part
        return node

    def _link_leaders(self) -> dict[Node, bytes]:
        """The first name in canonical order of each link set that still has two names."""
        first: dict[Node, bytes] = {}
        count: dict[Node, int] = {}
        for path, node in self._walk(self._overlay):
            if node in self._leaders:
                first.setdefault(node, path)
                count[node] = count.get(node, 0) + 1
        return {node: path for node, path in first.items() if count[node] > 1}

    def _finalize(self, linked: set[Node]) -> RootfsStats:
        # Pass 1: sort every directory once (dicts keep insertion order).
        stack = [self._root]
        while stack:
            node = stack.pop()
            node.children = dict(sorted(node.children.items(), key=by_name))
            stack.extend(c for c in node.children.values() if isinstance(c, Dir))
        # Pass 2: the first name in canonical order leads each link set; count.
        counts = dict.fromkeys(Kind, 0)
        hardlinks = 0
        names: dict[Node, int] = {}
        data_bytes = 0
        used: set[int] = set()
        for path, item in self._walk({}):
            kind = item.meta.kind
            if item in linked:
                names[item] = names.get(item, 0) + 1
                if names[item] > 1:
                    hardlinks += 1
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
            entries=sum(counts.values()) + hardlinks,
            files=counts[Kind.FILE],
            dirs=counts[Kind.DIR],
            symlinks=counts[Kind.SYMLINK],
            hardlinks=hardlinks,
            specials=sum(counts[k] for k in (Kind.CHAR, Kind.BLOCK, Kind.FIFO, Kind.SOCKET)),
            data_bytes=data_bytes,
        )

    def _walk(self, overlay: Overlay) -> Iterator[tuple[bytes, Node]]:
        """Depth first, children in byte order of their names: the canonical order."""
        yield b".", self._root
        stack = [(b"", self._children(self._root, b".", overlay))]
        while stack:
            prefix, items = stack[-1]
            item = next(items, None)
            if item is None:
                stack.pop()
                continue
            name, node = item
            path = prefix + name
            yield path, node
            if isinstance(node, Dir):
                stack.append((path + b"/", self._children(node, path, overlay)))

    @staticmethod
    def _children(node: Dir, path: bytes, overlay: Overlay) -> Iterator[tuple[bytes, Node]]:
        changed = overlay.get(path)
        if not changed:
            return iter(node.children.items())
        merged = {**node.children, **changed}
        return iter(sorted(((k, v) for k, v in merged.items() if v is not None), key=by_name))

    def _entry(self, path: bytes, node: Node) -> Entry:
        meta = node.meta
        leader = self._leaders.get(node)
        return Entry(
            path=path.decode(ENCODING, ERRORS),
            kind=meta.kind,
            mode=meta.mode,
            uid=meta.uid,
            gid=meta.gid,
            size=node.size,
            mtime_ns=self._clamp(node.mtime),
            linkname=meta.linkname,
            devmajor=meta.devmajor,
            devminor=meta.devminor,
            xattrs=meta.xattrs,
            link_group=leader.decode(ENCODING, ERRORS) if leader is not None else "",
        )

    def _extra_parts(self, text: str, view: FlatRootfs) -> list[bytes]:
        parts = components(text)
        if not parts:
            raise ImageError(f"extra path {text!r} is not a path inside the image")
        if not isinstance(view._find(parts[:-1]), Dir):
            raise ImageError(
                f"cannot add {text!r}: {show(parts[:-1])!r} is not a directory in the image",
                hint="add the directory to the image (e.g. RUN mkdir -p in the Dockerfile)",
            )
        return parts

    def _plan_extras(self, extra: Sequence[ExtraFile]) -> Overlay:
        """This view's overlay with ``extra`` files added or replacing."""
        if not extra:
            return self._overlay
        plan = {k: dict(v) for k, v in self._overlay.items()}
        given: set[bytes] = set()
        for item in extra:
            parts = self._extra_parts(item.path, self)
            if isinstance(self._find(parts), Dir):
                raise ImageError(f"cannot add {item.path!r}: the image has a directory there")
            key = b"/".join(parts)
            if key in given:
                raise ImageError(f"extra file {item.path!r} is given twice")
            given.add(key)
            meta = Meta(Kind.FILE, item.mode & 0o7777, item.uid, item.gid)
            node = Inline(meta, self._sde_ns or 0, item.data)
            plan.setdefault(b"/".join(parts[:-1]) or b".", {})[parts[-1]] = node
        return plan

    def _copy(self, sink: TarSink, path: bytes, node: Node) -> None:
        if isinstance(node, Inline):
            sink.write(node.data)
            sink.pad(node.size)
            return
        fd = self._layers[node.layer].fileno()
        for length, offset in extents(node):
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
