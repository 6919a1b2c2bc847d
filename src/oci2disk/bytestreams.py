"""Byte streams shared by every stage: runs of a file, batched archive writes, hashing.

:class:`RunReader` reads a file made of runs: bytes at an offset of a descriptor, or
zeros. Both a flattened rootfs file (its data sits in a layer tar; sparse holes are
zeros) and a file inside an ext filesystem (its extents sit in the image; holes and
uninitialized extents are zeros) are read through it. :class:`BatchingWriter` batches
the small writes of the tar and cpio writers. :func:`sha256_file` hashes a file,
skipping the holes of a sparse one.
"""

from __future__ import annotations

import bisect
import errno
import hashlib
import io
import os
import queue
import threading
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import IO, TYPE_CHECKING, BinaryIO, Protocol

if TYPE_CHECKING:
    from _typeshed import WriteableBuffer

CHUNK = 1 << 20  # the unit of every streaming copy
Run = tuple[int, int | None]  # (length, offset in the descriptor, or None for zeros)
ZEROS = bytes(CHUNK)


class RunReader(io.RawIOBase):
    """Seekable reads over ``runs`` laid end to end; positioned reads, so the
    descriptor's own offset is never moved and several readers may share it."""

    def __init__(
        self,
        fd: int,
        runs: Sequence[Run],
        *,
        close_fd: bool = False,
        short_read: Callable[[int, int], Exception] | None = None,
    ) -> None:
        super().__init__()
        self._fd = fd
        self._runs = list(runs)
        self._close_fd = close_fd
        self._short_read = short_read  # (offset, length) -> the error to raise
        self._starts: list[int] = []
        total = 0
        for length, _ in self._runs:
            self._starts.append(total)
            total += length
        self._size = total
        self._pos = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, pos: int, whence: int = os.SEEK_SET) -> int:
        base = {os.SEEK_SET: 0, os.SEEK_CUR: self._pos, os.SEEK_END: self._size}[whence]
        if base + pos < 0:
            raise ValueError("negative seek position")
        self._pos = base + pos
        return self._pos

    def readinto(self, buffer: WriteableBuffer) -> int:
        view = memoryview(buffer).cast("B")
        if self._pos >= self._size or not len(view):
            return 0
        index = bisect.bisect_right(self._starts, self._pos) - 1
        length, offset = self._runs[index]
        skip = self._pos - self._starts[index]
        want = min(len(view), length - skip)
        if offset is None:
            view[:want] = ZEROS[:want] if want <= len(ZEROS) else bytes(want)
            got = want
        else:
            data = os.pread(self._fd, want, offset + skip)
            got = len(data)
            if got != want and self._short_read is not None:
                raise self._short_read(offset + skip, want)
            view[:got] = data
        self._pos += got
        return got

    def close(self) -> None:
        if not self.closed and self._close_fd:
            os.close(self._fd)
        super().close()


class ForwardReader:
    """A stream read front to back, that tells its position and "seeks" forward by
    reading and dropping: what tarfile needs to walk an archive arriving over a socket
    while the caller reads the members' data itself, in large pieces."""

    def __init__(self, raw: IO[bytes]) -> None:
        self.raw = raw
        self.position = 0

    def read(self, size: int = -1, /) -> bytes:
        data = self.raw.read(size)
        self.position += len(data)
        return data

    def tell(self) -> int:
        return self.position

    def seek(self, pos: int, whence: int = os.SEEK_SET, /) -> int:
        target = pos if whence == os.SEEK_SET else self.position + pos
        if whence not in (os.SEEK_SET, os.SEEK_CUR) or target < self.position:
            raise io.UnsupportedOperation("a stream only seeks forward")
        while self.position < target:
            if not self.read(min(CHUNK, target - self.position)):
                break  # the end: the next read tells the caller
        return self.position

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return False


class HashingCopier:
    """Writes chunks to a file and hashes them, each on a thread of its own, so that
    reading the next chunk (from a socket, a decompressor) overlaps both: sha256 and
    file writes release the GIL. ``write`` queues; ``finish`` waits and returns
    (sha256 hex, size). At most ``depth`` chunks wait in memory."""

    def __init__(self, out: BinaryIO, depth: int = 8) -> None:
        self.sha = hashlib.sha256()
        self.size = 0
        self._error: BaseException | None = None
        self._workers = [
            self._start(self.sha.update, depth, "oci2disk-hash"),
            self._start(out.write, depth, "oci2disk-write"),
        ]

    def _start(
        self, consume: Callable[[bytes], object], depth: int, name: str
    ) -> tuple[queue.Queue[bytes | None], threading.Thread]:
        chunks: queue.Queue[bytes | None] = queue.Queue(depth)

        def work() -> None:
            while (chunk := chunks.get()) is not None:
                if self._error is not None:
                    continue  # drain: the writer learns of the error at its next write
                try:
                    consume(chunk)
                except BaseException as exc:  # re-raised in the caller's thread
                    self._error = exc

        thread = threading.Thread(target=work, name=name, daemon=True)
        thread.start()
        return chunks, thread

    def write(self, chunk: bytes) -> None:
        if self._error is not None:
            self.close()
            raise self._error
        self.size += len(chunk)
        for chunks, _ in self._workers:
            chunks.put(chunk)

    def close(self) -> None:
        """Stop the threads (after the queued chunks); safe to call twice."""
        for chunks, thread in self._workers:
            if thread.is_alive():
                chunks.put(None)
                thread.join()

    def finish(self) -> tuple[str, int]:
        self.close()
        if self._error is not None:
            raise self._error
        return self.sha.hexdigest(), self.size


class BatchingWriter:
    """Batches small writes (headers, small files) into 1 MiB writes; large ones pass
    straight through. ``pad`` zero-fills to the archive's alignment (512 for tar,
    4 for newc cpio)."""

    def __init__(self, out: BinaryIO, align: int) -> None:
        self.out = out
        self.align = align
        self.buf = bytearray()
        self.written = 0

    def write(self, data: bytes | memoryview) -> None:
        self.written += len(data)
        if len(data) >= CHUNK // 4:
            self.flush()
            self.out.write(data)
            return
        self.buf += data
        if len(self.buf) >= CHUNK:
            self.flush()

    def pad(self, length: int) -> None:
        if length % self.align:
            self.write(bytes(self.align - length % self.align))

    def flush(self) -> None:
        if self.buf:
            self.out.write(bytes(self.buf))  # a copy: the sink may keep what it is given
            self.buf.clear()


def sha256_stream(stream: IO[bytes]) -> str:
    """sha256 (hex) of everything left in ``stream``."""
    digest = hashlib.sha256()
    while chunk := stream.read(CHUNK):
        digest.update(chunk)
    return digest.hexdigest()


def sha256_file(path: Path) -> str:
    """sha256 (hex) of a file; holes of a sparse file are hashed from a zero buffer.

    A raw disk is mostly holes (a 10 GiB image held 728 MiB of data); reading the
    holes through the page cache took most of the time of a large build.
    """
    h = hashlib.sha256()
    chunk = 1 << 22
    zeros = memoryview(bytes(chunk))
    with path.open("rb") as f:
        fd = f.fileno()
        size = os.fstat(fd).st_size
        position = 0
        for data_at, data_end in [*data_extents(fd, 0, size), (size, size)]:
            while position < data_at:  # a hole: zeros without reading
                n = min(chunk, data_at - position)
                h.update(zeros[:n])
                position += n
            while position < data_end:
                data = os.pread(fd, min(chunk, data_end - position), position)
                if not data:
                    raise OSError(errno.EIO, f"{path} changed while it was being hashed")
                h.update(data)
                position += len(data)
    return h.hexdigest()


def data_extents(fd: int, start: int, end: int) -> Iterator[tuple[int, int]]:
    """The (offset, end) ranges of ``fd`` between ``start`` and ``end`` that hold data;
    the rest are holes (zeros never written)."""
    position = start
    while position < end:
        try:
            data_at = os.lseek(fd, position, os.SEEK_DATA)
        except OSError as exc:
            if exc.errno == errno.ENXIO:  # only a hole is left
                return
            raise
        if data_at >= end:
            return
        hole_at = min(os.lseek(fd, data_at, os.SEEK_HOLE), end)
        yield data_at, hole_at
        position = hole_at


def copy_sparse(src: int, dst: int, length: int, src_offset: int = 0, dst_offset: int = 0) -> None:
    """Copy ``length`` bytes of ``src`` at ``src_offset`` to ``dst`` at ``dst_offset``,
    leaving the source's holes as holes: only data extents are copied
    (``copy_file_range``, in the kernel). Where the source has a hole and the target
    has data, the target gets zeros, so the range ends up equal either way."""
    shift = dst_offset - src_offset
    end = src_offset + length
    position = src_offset
    for data_at, data_end in data_extents(src, src_offset, end):
        _zero_data(dst, position + shift, data_at + shift)  # the hole before it
        position = data_at
        while position < data_end:
            try:
                n = os.copy_file_range(src, dst, data_end - position, position, position + shift)
            except OSError as exc:
                if exc.errno not in (errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
                    raise
                data = os.pread(src, min(data_end - position, CHUNK), position)
                n = os.pwrite(dst, data, position + shift) if data else 0
            if n == 0:
                raise OSError(errno.EIO, "the source file shrank while it was being copied")
            position += n
    _zero_data(dst, position + shift, end + shift)  # the hole at the end


def _zero_data(fd: int, start: int, end: int) -> None:
    """Make ``fd``'s bytes from ``start`` to ``end`` zeros, writing only where it holds
    something other than zeros (a new file's holes stay holes)."""
    if start >= end:
        return
    zeros = bytes(CHUNK)
    for data_at, data_end in list(data_extents(fd, start, end)):
        for offset in range(data_at, data_end, CHUNK):
            n = min(CHUNK, data_end - offset)
            if os.pread(fd, n, offset).count(0) != n:
                os.pwrite(fd, zeros[:n], offset)


class Writable(Protocol):
    def write(self, data: bytes, /) -> int: ...


class HashingWriter:
    """Passes writes on to ``out`` and counts and hashes them (a layer's diff_id while
    it is being compressed, a blob's digest while it is being stored)."""

    def __init__(self, out: Writable) -> None:
        self.out = out
        self.sha = hashlib.sha256()
        self.size = 0

    def write(self, data: bytes) -> int:
        self.sha.update(data)
        self.size += len(data)
        self.out.write(data)
        return len(data)

    def flush(self) -> None:
        flush = getattr(self.out, "flush", None)
        if flush is not None:
            flush()
