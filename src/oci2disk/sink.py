"""Batched writing of archive streams (the tar and cpio writers)."""

from __future__ import annotations

from typing import BinaryIO

CHUNK = 1 << 20


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
