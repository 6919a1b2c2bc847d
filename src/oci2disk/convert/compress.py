"""Compressed output streams for the cgz and tar outputs, and reading them back.

gzip uses the fastest compressor found: ``igzip`` (ISA-L, several times faster than
zlib at a similar ratio) when no level is asked for, else ``pigz`` at the level asked
(1 when none), else Python's zlib. zstd uses the zstandard library with one worker per
core; xz uses ``xz -T0`` (else Python's lzma) with CRC32 checks, which the kernel's xz
decoder requires. Every writer stores no file name and no timestamp, and the
multi-threaded ones give the same bytes whatever the number of cores, so an output
depends only on its content and on which compressor was found (the log names it).

Host tools: igzip (isal), pigz, xz (xz-utils); all optional.
"""

from __future__ import annotations

import gzip
import io
import logging
import lzma
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import BinaryIO, cast

import zstandard

from oci2disk import run
from oci2disk.errors import VerifyError
from oci2disk.recipe import ArchiveCompression

log = logging.getLogger("oci2disk.compress")

CHUNK = 1 << 20
_NONE = ArchiveCompression.NONE
DEFAULT_ZSTD_LEVEL = 3
DEFAULT_XZ_LEVEL = 6
# Without igzip, gzip -1 is about as small as igzip -3 and three times faster than -6.
DEFAULT_GZIP_LEVEL = 1
IGZIP_LEVEL = 3

MAGIC = {
    b"\x1f\x8b": ArchiveCompression.GZIP,
    b"\x28\xb5\x2f\xfd": ArchiveCompression.ZSTD,
    b"\xfd7zXZ\x00": ArchiveCompression.XZ,
}


def _tool(name: str) -> str | None:
    return shutil.which(name)


def describe(compression: ArchiveCompression, level: int | None) -> str:
    """Which program and level :func:`compressed` will use, e.g. ``igzip -3``."""
    if compression is _NONE:
        return "none"
    return " ".join(_plan(compression, level)[:2])


def _plan(compression: ArchiveCompression, level: int | None) -> list[str]:
    """argv of the external compressor, or ``["python", LEVEL]`` for the in-process one."""
    if compression is ArchiveCompression.GZIP:
        if level is None and _tool("igzip"):
            return ["igzip", f"-{IGZIP_LEVEL}", "-T", str(_cores()), "-n", "-c"]
        level = DEFAULT_GZIP_LEVEL if level is None else level
        if _tool("pigz"):
            return ["pigz", f"-{level}", "-n", "-c"]
        return ["python-zlib", f"-{level}"]
    if compression is ArchiveCompression.ZSTD:
        return ["python-zstandard", f"-{DEFAULT_ZSTD_LEVEL if level is None else level}"]
    if compression is ArchiveCompression.XZ:
        level = DEFAULT_XZ_LEVEL if level is None else level
        if _tool("xz"):
            # -T0 is multi-threaded mode even on one core: the same bytes on any machine.
            return ["xz", f"-{level}", "-T0", "--check=crc32", "-c"]
        return ["python-lzma", f"-{level}"]
    raise AssertionError(compression)


def _cores() -> int:
    return max(1, len(os.sched_getaffinity(0)))


@contextmanager
def compressed(
    path: Path, compression: ArchiveCompression, level: int | None = None
) -> Iterator[BinaryIO]:
    """A binary sink whose bytes land in ``path`` compressed; complete when the block ends.

    If the block raises, the compressor is stopped and the error propagates (the caller
    owns ``path`` and removes it).
    """
    with path.open("wb") as out:
        if compression is _NONE:
            yield cast(BinaryIO, out)
            return
        plan = _plan(compression, level)
        program, flag = plan[0], plan[1]
        log.info("compressing %s with %s %s", path.name, program, flag)
        if program.startswith("python-"):
            with _in_process(out, compression, int(flag[1:])) as sink:
                yield sink
            return
        with _external(plan, out) as sink:
            yield sink


@contextmanager
def _in_process(out: BinaryIO, compression: ArchiveCompression, level: int) -> Iterator[BinaryIO]:
    with ExitStack() as stack:
        if compression is ArchiveCompression.GZIP:
            gz = gzip.GzipFile(filename="", mode="wb", fileobj=out, mtime=0, compresslevel=level)
            yield cast(BinaryIO, stack.enter_context(gz))
        elif compression is ArchiveCompression.ZSTD:
            compressor = zstandard.ZstdCompressor(
                level=level, threads=_cores(), write_checksum=True
            )
            yield cast(BinaryIO, stack.enter_context(compressor.stream_writer(out, closefd=False)))
        else:
            crc32 = lzma.CHECK_CRC32
            with lzma.LZMAFile(out, "wb", format=lzma.FORMAT_XZ, check=crc32, preset=level) as xz:
                yield cast(BinaryIO, xz)


@contextmanager
def _external(argv: list[str], out: BinaryIO) -> Iterator[BinaryIO]:
    with tempfile.TemporaryFile() as errfile:
        proc = run.start(argv, stdin=subprocess.PIPE, stdout=out, stderr=errfile)
        assert proc.stdin is not None
        stdin = cast(BinaryIO, proc.stdin)
        broken = False
        try:
            yield stdin
            stdin.close()
        except BrokenPipeError:
            broken = True  # the compressor stopped reading; its exit status says why
        except BaseException:
            proc.kill()
            proc.wait()
            raise
        code = proc.wait()
        if code != 0 or broken:
            errfile.seek(0)
            raise run.command_error(argv, code, errfile.read(), what=f"{argv[0]} failed")


def detect(head: bytes) -> ArchiveCompression:
    for magic, compression in MAGIC.items():
        if head.startswith(magic):
            return compression
    return _NONE


@contextmanager
def open_decompressed(path: Path) -> Iterator[BinaryIO]:
    """Read a gzip, zstd or xz file (or an uncompressed one) as one stream."""
    with ExitStack() as stack:
        raw = stack.enter_context(path.open("rb"))
        compression = detect(raw.read(8))
        raw.seek(0)
        stream: BinaryIO
        if compression is ArchiveCompression.GZIP:
            stream = cast(BinaryIO, stack.enter_context(gzip.GzipFile(fileobj=raw, mode="rb")))
        elif compression is ArchiveCompression.ZSTD:
            reader = zstandard.ZstdDecompressor().stream_reader(raw, read_across_frames=True)
            stream = cast(BinaryIO, io.BufferedReader(cast(io.RawIOBase, reader), CHUNK))
            stack.callback(stream.close)
        elif compression is ArchiveCompression.XZ:
            stream = cast(BinaryIO, stack.enter_context(lzma.LZMAFile(raw, "rb")))
        else:
            stream = cast(BinaryIO, raw)
        try:
            yield stream
        except (OSError, EOFError, lzma.LZMAError, zstandard.ZstdError) as exc:
            raise VerifyError(
                f"{path}: cannot decompress its {compression.value} data ({exc})"
            ) from None


def suffix(compression: ArchiveCompression) -> str:
    """File name suffix of a compressed stream: ``.gz``, ``.zst``, ``.xz`` or nothing."""
    return {"gzip": ".gz", "zstd": ".zst", "xz": ".xz", "none": ""}[compression.value]
