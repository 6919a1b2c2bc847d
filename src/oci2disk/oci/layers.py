"""Layer I/O: a layer blob as its uncompressed tar, its digest and diff_id checked,
and its index.

An uncompressed layer is read in place (its blob's digest is its diff_id); a gzip or
zstd layer is decompressed once, and hashed while it is, into an anonymous temporary
file that the flattener reads by offset.

A layer's index (:class:`LayerIndex`) is its tar headers in order, each with where
the member's data lies: all the flattener needs of a layer besides the file data it
reads by offset. It is made once per layer, as the layer arrives from the engine
(:class:`StreamIndexer`) or from its blob (:func:`file_members`), and the cache keeps it
beside the blob (:func:`dump_index`, :func:`load_index`).

Host tools: none (ISA-L's igzip module when installed, for gzip).
"""

from __future__ import annotations

import gzip
import hashlib
import io
import marshal
import os
import queue
import tarfile
import tempfile
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Protocol, cast

from oci2disk.bytestreams import CHUNK
from oci2disk.compression import DECOMPRESS_ERRORS
from oci2disk.errors import ImageError, LayerError
from oci2disk.oci.layout import LAYER_COMPRESSION, Descriptor, OciImage, open_verified_blob


@contextmanager
def open_layer(image: OciImage, desc: Descriptor) -> Iterator[IO[bytes]]:
    """Open a layer blob as an uncompressed tar byte stream (digest checked first)."""
    kind = LAYER_COMPRESSION[desc.media_type]
    with open_verified_blob(image.layout, desc) as raw:
        if kind == "none":
            yield raw
        elif kind == "gzip":
            with _gzip_reader(raw) as gz:
                yield gz
        else:
            yield _zstd_reader(raw)


def _gzip_reader(raw: IO[bytes]) -> IO[bytes]:
    """A gzip decompressor: ISA-L's when present (about twice zlib's speed here)."""
    try:
        from isal import igzip
    except ImportError:
        return cast(IO[bytes], gzip.GzipFile(fileobj=raw, mode="rb"))
    return cast(IO[bytes], igzip.IGzipFile(fileobj=raw, mode="rb"))  # type: ignore[no-untyped-call]


def _zstd_reader(raw: IO[bytes]) -> IO[bytes]:
    try:
        import zstandard
    except ImportError:
        raise ImageError(
            "this image has zstd-compressed layers and the zstandard module is missing",
            hint="pip install zstandard (it is part of oci2disk's dependencies)",
        ) from None
    return cast(IO[bytes], zstandard.ZstdDecompressor().stream_reader(raw))


def diff_id_error(desc: Descriptor, index: int, actual: str, expected: str) -> ImageError:
    return ImageError(
        f"layer {desc.digest}: its uncompressed content has digest {actual}, "
        f"but the image config's diff_ids[{index}] is {expected}",
        hint="the image is corrupt or was assembled wrongly; build or export it again",
    )


def layer_file(image: OciImage, index: int, workdir: Path) -> IO[bytes]:
    """The layer's uncompressed tar, open: the checked blob itself, or a decompressed copy."""
    desc = image.layers[index]
    diff_id = image.config.diff_ids[index]
    compression = LAYER_COMPRESSION[desc.media_type]
    if compression == "none":
        blob = open_verified_blob(image.layout, desc)
        # The blob's sha256 is its uncompressed digest, and it was just checked.
        if desc.digest != diff_id:
            blob.close()
            raise diff_id_error(desc, index, desc.digest, diff_id)
        return blob
    out = tempfile.TemporaryFile(dir=workdir, prefix="layer-")  # noqa: SIM115  # kept open
    try:
        digest = hashlib.sha256()
        with open_layer(image, desc) as stream:  # checks the blob's size and digest first
            try:
                while chunk := stream.read(CHUNK):
                    digest.update(chunk)
                    out.write(chunk)
            except DECOMPRESS_ERRORS as exc:
                raise ImageError(
                    f"layer {desc.digest}: cannot decompress its {compression} data ({exc})",
                    hint="the layer blob is corrupt; export the image again",
                ) from None
        out.flush()
        actual = "sha256:" + digest.hexdigest()
        if actual != diff_id:
            raise diff_id_error(desc, index, actual, diff_id)
        return out
    except BaseException:
        out.close()
        raise


# ------------------------------------------------------------------- layer indexes

BLOCK = tarfile.BLOCKSIZE
TAR_ENCODING = "utf-8"
TAR_ERRORS = "surrogateescape"  # non-UTF-8 names round-trip byte for byte
# One entry's headers (PAX records, GNU long names, sparse maps) may not exceed this:
# a hostile layer must not make the flattener allocate what it likes.
HEADER_LIMIT = 16 << 20
INDEX_FORMAT = b"oci2disk-layer-index-1\n"

# What the flattener reads of a member, in this order, in a stored index.
_FIELDS = (
    "name", "type", "linkname", "mode", "uid", "gid", "size", "mtime",
    "devmajor", "devminor", "pax_headers", "sparse", "offset_data",
)  # fmt: skip


# A layer with more members than this is scanned on every run instead: its index
# would cost more memory (about 400 bytes a member) than the scan costs time.
MAX_INDEXED = 200_000


@dataclass(frozen=True)
class LayerIndex:
    """A layer's members in tar order, each with the offset of the header after it
    (where its data, padding included, ends)."""

    members: tuple[tuple[tarfile.TarInfo, int], ...]


class Layer(Protocol):
    """What a layer is read through: a file, or a stream that seeks only forward."""

    def read(self, size: int = -1, /) -> bytes: ...

    def seek(self, pos: int, whence: int = os.SEEK_SET, /) -> int: ...

    def tell(self) -> int: ...

    def seekable(self) -> bool: ...


class _HeaderLimit(Exception):
    pass


class _HeaderReader:
    """The file object tarfile reads a layer through.

    tarfile reads headers with read() and skips file data with seek(), so every byte
    read() returns is header data: capping it per entry bounds memory whatever a
    header claims. A second read at end of file means tarfile is looping on a
    truncated header (it does on a GNU 1.0 sparse map), so that ends the layer too.
    """

    def __init__(self, raw: Layer) -> None:
        self.raw = raw
        self.budget = HEADER_LIMIT
        self.at_eof = False
        self.last_at, self.last = 0, b""  # the last read, kept for tail()

    def tail(self, offset: int, size: int) -> bytes:
        """``size`` bytes from ``offset`` on, a stream read front to back included:
        tarfile has read the block at ``offset`` (the end marker) already."""
        position = self.raw.tell()
        if position <= offset or self.raw.seekable():
            self.raw.seek(offset)
            return self.raw.read(size)
        if not self.last_at <= offset <= position or position != self.last_at + len(self.last):
            raise ValueError(f"cannot read the layer again at byte {offset}")
        head = self.last[offset - self.last_at :][:size]
        return head + self.raw.read(size - len(head))

    def read(self, size: int = -1, /) -> bytes:
        if size < 0 or size > self.budget:
            raise _HeaderLimit
        self.last_at = self.raw.tell()
        data = self.last = self.raw.read(size)
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


def members(layer: Layer, digest: str, size: int | None) -> Iterator[tuple[tarfile.TarInfo, int]]:
    """A layer's members with the offset of the header after each, read from its tar
    headers as they come (never its file data: that is skipped by seeking), so memory
    stays bounded whatever the layer holds.

    ``size`` is the layer's length when known; only zeros may follow the last header.
    Raises ``LayerError`` for headers over :data:`HEADER_LIMIT` and ``ImageError``
    for a tar that cannot be read.
    """
    if size == 0:
        return  # an empty blob is an empty layer
    layer.seek(0)
    reader = _HeaderReader(layer)
    name = "(first entry)"
    try:
        tar = tarfile.TarFile(
            fileobj=cast(IO[bytes], reader), mode="r", encoding=TAR_ENCODING, errors=TAR_ERRORS
        )
        while True:
            reader.budget = HEADER_LIMIT
            info = tar.next()
            if info is None:
                break
            tar.members = []  # type: ignore[attr-defined]  # the caller keeps what it needs
            name = info.name
            yield info, tar.offset
        end = tar.offset
        tail = reader.tail(end, 2 * BLOCK)
    except _HeaderLimit:
        raise LayerError(
            f"layer {digest}: entry {name + ' (or the entry after it)'!r}: has more than "
            f"{HEADER_LIMIT >> 20} MiB of tar headers",
            hint="the layer is corrupt or hostile",
        ) from None
    except (tarfile.TarError, EOFError, ValueError, OverflowError, IndexError) as exc:
        raise ImageError(
            f"layer {digest}: not a readable tar after entry {name!r} ({exc})",
            hint="the layer is corrupt or truncated; export the image again",
        ) from None
    if tail.strip(b"\0"):  # tarfile stops quietly at a bad header
        where = end if tail[:BLOCK].strip(b"\0") else end + BLOCK
        of = f" of {size}" if size is not None else ""
        raise ImageError(
            f"layer {digest}: invalid tar header at byte {where}{of}",
            hint="the layer is corrupt or truncated; export the image again",
        )


def file_members(layer: IO[bytes], digest: str) -> Iterator[tuple[tarfile.TarInfo, int]]:
    return members(layer, digest, os.fstat(layer.fileno()).st_size)


def indexing(
    found: Iterator[tuple[tarfile.TarInfo, int]], keep: Callable[[LayerIndex], None]
) -> Iterator[tuple[tarfile.TarInfo, int]]:
    """``found`` passed through; when it ends cleanly, with at most
    :data:`MAX_INDEXED` members, ``keep`` gets them as an index."""
    kept: list[tuple[tarfile.TarInfo, int]] | None = []
    for member in found:
        if kept is not None:
            kept.append(member)
            if len(kept) > MAX_INDEXED:
                kept = None
        yield member
    if kept is not None:
        keep(LayerIndex(tuple(kept)))


def dump_index(index: LayerIndex) -> bytes:
    """The index as bytes to store: a format line, the sha256 of the rest, the rest."""
    rows = [
        (*(getattr(info, field) for field in _FIELDS), next_header)
        for info, next_header in index.members
    ]
    body = marshal.dumps(rows)
    return INDEX_FORMAT + hashlib.sha256(body).digest() + body


def load_index(data: bytes) -> LayerIndex | None:
    """A stored index, or None when it is of another format or damaged."""
    if not data.startswith(INDEX_FORMAT):
        return None
    check, body = data[len(INDEX_FORMAT) : len(INDEX_FORMAT) + 32], data[len(INDEX_FORMAT) + 32 :]
    if hashlib.sha256(body).digest() != check:
        return None
    try:
        rows: Any = marshal.loads(body)
        members = []
        for row in rows:
            info = tarfile.TarInfo()
            for field, value in zip(_FIELDS, row, strict=False):
                setattr(info, field, value)
            members.append((info, int(row[len(_FIELDS)])))
    except (ValueError, EOFError, TypeError, IndexError):
        return None
    return LayerIndex(tuple(members))


class _QueueStream:
    """The reading end of a queue of chunks (None ends it), read front to back.

    Skipping forward (tarfile seeks over file data) drops chunks without copying
    them, so indexing a layer costs its headers, not its bytes."""

    def __init__(self, chunks: queue.Queue[bytes | None]) -> None:
        self._chunks = chunks
        self._buf = memoryview(b"")
        self._position = 0
        self._ended = False

    def _next(self) -> bool:
        if self._ended:
            return False
        chunk = self._chunks.get()
        if chunk is None:
            self._ended = True
            return False
        self._buf = memoryview(chunk)
        return True

    def read(self, size: int = -1, /) -> bytes:
        parts: list[bytes] = []
        want = size if size >= 0 else 1 << 62
        while want > 0 and (self._buf or self._next()):
            piece = self._buf[:want]
            self._buf = self._buf[len(piece) :]
            parts.append(bytes(piece))
            want -= len(piece)
            self._position += len(piece)
        return b"".join(parts)

    def tell(self) -> int:
        return self._position

    def seek(self, pos: int, whence: int = os.SEEK_SET, /) -> int:
        target = pos if whence == os.SEEK_SET else self._position + pos
        if whence not in (os.SEEK_SET, os.SEEK_CUR) or target < self._position:
            raise io.UnsupportedOperation("a stream only seeks forward")
        while target > self._position and (self._buf or self._next()):
            step = min(len(self._buf), target - self._position)
            self._buf = self._buf[step:]
            self._position += step
        return self._position

    def seekable(self) -> bool:
        return False

    def drain(self) -> None:
        while self._next():
            pass
        self._buf = memoryview(b"")


class StreamIndexer:
    """Indexes an uncompressed layer while it arrives, on a thread of its own: feed it
    every chunk, then ``finish()``. An index is made only of a layer that scans
    cleanly; any problem leaves none, and the flattener scans the stored blob again
    (so that the error names the layer's digest)."""

    def __init__(self, depth: int = 16) -> None:
        self._chunks: queue.Queue[bytes | None] = queue.Queue(depth)
        self._stream = _QueueStream(self._chunks)
        self.index: LayerIndex | None = None
        self._thread = threading.Thread(target=self._work, name="oci2disk-index", daemon=True)
        self._thread.start()

    def _work(self) -> None:
        found: list[LayerIndex] = []
        try:
            for _ in indexing(members(self._stream, "(arriving)", None), found.append):
                pass
        except Exception:  # the blob is scanned again, and reports it
            found.clear()
        finally:
            self._stream.drain()
        self.index = found[0] if found else None

    def feed(self, chunk: bytes) -> None:
        if self._thread.is_alive():
            self._chunks.put(chunk)

    def finish(self) -> LayerIndex | None:
        if self._thread.is_alive():
            self._chunks.put(None)
            self._thread.join()
        return self.index
