"""A read-only file made of runs: bytes at an offset of a descriptor, or zeros.

Both a flattened rootfs file (its data sits in a layer tar; sparse holes are zeros) and
a file inside an ext filesystem (its extents sit in the image; holes and uninitialized
extents are zeros) are read through this one reader.
"""

from __future__ import annotations

import bisect
import io
import os
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from _typeshed import WriteableBuffer

Run = tuple[int, int | None]  # (length, offset in the descriptor, or None for zeros)
ZEROS = bytes(1 << 20)


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
