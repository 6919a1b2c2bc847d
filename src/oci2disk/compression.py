"""Compressions: one enum for every place oci2disk meets one.

Layers (gzip, zstd), the cgz and tar outputs (gzip, zstd, xz), qcow2 clusters (zlib is
gzip's deflate, zstd) and kernel payloads (all of them) ask the same :class:`Compression`
for its magic, file suffix and how to read it.

Host tools: none (the writers with external programs live in convert/compress.py).
"""

from __future__ import annotations

import bz2
import enum
import gzip
import io
import lzma
import zlib
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, cast

import zstandard

from oci2disk.bytestreams import CHUNK


@dataclass(frozen=True)
class _Info:
    name: str  # the value users write
    magic: bytes  # how a stream of it starts ("" for none)
    suffix: str  # file name suffix, ".gz"
    levels: tuple[int, int] | None  # the levels its compressor accepts (inclusive)
    qemu: str = ""  # qemu-img's compression_type for qcow2, when it has one


class Compression(enum.Enum):
    NONE = _Info("none", b"", "", None)
    GZIP = _Info("gzip", b"\x1f\x8b", ".gz", (1, 9), qemu="zlib")
    ZSTD = _Info("zstd", b"\x28\xb5\x2f\xfd", ".zst", (1, 19), qemu="zstd")
    XZ = _Info("xz", b"\xfd7zXZ\x00", ".xz", (0, 9))
    BZIP2 = _Info("bzip2", b"BZh", ".bz2", (1, 9))
    LZMA = _Info("lzma", b"\x5d\x00\x00\x00", ".lzma", (0, 9))
    LZ4 = _Info("lz4", b"\x02\x21\x4c\x18", ".lz4", None)  # legacy frames (kernels)

    @property
    def label(self) -> str:
        return self.value.name

    @property
    def magic(self) -> bytes:
        return self.value.magic

    @property
    def suffix(self) -> str:
        return self.value.suffix

    @property
    def levels(self) -> tuple[int, int] | None:
        return self.value.levels

    @property
    def qemu(self) -> str:
        return self.value.qemu

    def __str__(self) -> str:
        return self.value.name

    @classmethod
    def parse(cls, text: str) -> Compression:
        key = text.strip().lower()
        if key == "zlib":  # qcow2's name for deflate
            return cls.GZIP
        for c in cls:
            if c.value.name == key:
                return c
        raise ValueError(text)

    @classmethod
    def detect(cls, head: bytes) -> Compression:
        """The compression a stream starting with ``head`` uses (NONE when unknown)."""
        for c in (cls.GZIP, cls.ZSTD, cls.XZ):
            if head.startswith(c.magic):
                return c
        return cls.NONE

    def check_level(self, level: int | None) -> str | None:
        """None if ``level`` suits this compression, else what was expected."""
        if level is None:
            return None
        if self.levels is None:
            return f"no level when compression is {self.label!r}"
        low, high = self.levels
        if not low <= level <= high:
            return f"a {self.label} level from {low} to {high}"
        return None

    def decompress_bytes(self, data: bytes) -> bytes:
        """The whole of ``data`` decompressed (kernel payloads: trailing data is ignored)."""
        if self is Compression.GZIP:
            return zlib.decompressobj(wbits=31).decompress(data)
        if self is Compression.XZ:
            return lzma.LZMADecompressor(format=lzma.FORMAT_XZ).decompress(data)
        if self is Compression.LZMA:
            return lzma.LZMADecompressor(format=lzma.FORMAT_ALONE).decompress(data)
        if self is Compression.BZIP2:
            return bz2.BZ2Decompressor().decompress(data)
        if self is Compression.ZSTD:
            return zstandard.ZstdDecompressor().decompressobj().decompress(data)
        if self is Compression.NONE:
            return data
        raise ValueError(f"no in-process decoder for {self.label}")


# What a reader of a broken compressed stream can raise.
DECOMPRESS_ERRORS: tuple[type[BaseException], ...] = (
    OSError,
    EOFError,
    ValueError,
    zlib.error,
    lzma.LZMAError,
    zstandard.ZstdError,
)


@contextmanager
def decompressed(raw: BinaryIO, compression: Compression | None = None) -> Iterator[BinaryIO]:
    """``raw`` read through its decompressor (detected from its first bytes when None).

    ``raw`` must be seekable when the compression is detected.
    """
    if compression is None:
        compression = Compression.detect(raw.read(8))
        raw.seek(0)
    with ExitStack() as stack:
        stream: BinaryIO
        if compression is Compression.GZIP:
            stream = cast(BinaryIO, stack.enter_context(gzip.GzipFile(fileobj=raw, mode="rb")))
        elif compression is Compression.ZSTD:
            reader = zstandard.ZstdDecompressor().stream_reader(raw, read_across_frames=True)
            stream = cast(BinaryIO, io.BufferedReader(cast(io.RawIOBase, reader), CHUNK))
            stack.callback(stream.close)
        elif compression is Compression.XZ:
            stream = cast(BinaryIO, stack.enter_context(lzma.LZMAFile(raw, "rb")))
        elif compression is Compression.NONE:
            stream = raw
        else:
            raise ValueError(f"no stream decoder for {compression.label}")
        yield stream


@contextmanager
def open_decompressed(path: Path) -> Iterator[BinaryIO]:
    """Read a gzip, zstd or xz file (or an uncompressed one) as one stream."""
    with path.open("rb") as raw, decompressed(cast(BinaryIO, raw)) as stream:
        yield stream
