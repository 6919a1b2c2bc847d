"""Compressed output streams for the cgz and tar outputs.

Reading them back is :func:`oci2disk.compression.open_decompressed`.

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
import logging
import lzma
import os
import shutil
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import BinaryIO, cast

import zstandard

from oci2disk import run
from oci2disk.compression import Compression

log = logging.getLogger("oci2disk.compress")

DEFAULT_ZSTD_LEVEL = 3
DEFAULT_XZ_LEVEL = 6
# Without igzip, gzip -1 is about as small as igzip -3 and three times faster than -6.
DEFAULT_GZIP_LEVEL = 1
IGZIP_LEVEL = 3


def _tool(name: str) -> str | None:
    return shutil.which(name)


def describe(compression: Compression, level: int | None) -> str:
    """Which program and level :func:`compressed` will use, e.g. ``igzip -3``."""
    if compression is Compression.NONE:
        return "none"
    return " ".join(_plan(compression, level)[:2])


def _plan(compression: Compression, level: int | None) -> list[str]:
    """argv of the external compressor, or ``["python-...", LEVEL]`` for the in-process one."""
    if compression is Compression.GZIP:
        if level is None and _tool("igzip"):
            return ["igzip", f"-{IGZIP_LEVEL}", "-T", str(_cores()), "-n", "-c"]
        level = DEFAULT_GZIP_LEVEL if level is None else level
        if _tool("pigz"):
            return ["pigz", f"-{level}", "-n", "-c"]
        return ["python-zlib", f"-{level}"]
    if compression is Compression.ZSTD:
        return ["python-zstandard", f"-{DEFAULT_ZSTD_LEVEL if level is None else level}"]
    if compression is Compression.XZ:
        level = DEFAULT_XZ_LEVEL if level is None else level
        if _tool("xz"):
            # -T0 is multi-threaded mode even on one core: the same bytes on any machine.
            return ["xz", f"-{level}", "-T0", "--check=crc32", "-c"]
        return ["python-lzma", f"-{level}"]
    raise ValueError(f"the cgz and tar outputs cannot be {compression.label}-compressed")


def _cores() -> int:
    return max(1, len(os.sched_getaffinity(0)))


@contextmanager
def compressed(
    path: Path, compression: Compression, level: int | None = None
) -> Iterator[BinaryIO]:
    """A binary sink whose bytes land in ``path`` compressed; complete when the block ends.

    If the block raises, the compressor is stopped and the error propagates (the caller
    owns ``path`` and removes it).
    """
    with path.open("wb") as out:
        if compression is Compression.NONE:
            yield cast(BinaryIO, out)
            return
        plan = _plan(compression, level)
        program, flag = plan[0], plan[1]
        log.info("compressing %s with %s %s", path.name, program, flag)
        if program.startswith("python-"):
            with _in_process(out, compression, int(flag[1:])) as sink:
                yield sink
            return
        with run.feeding(plan, stdout=out, what=f"{program} failed") as sink:
            yield sink


@contextmanager
def _in_process(out: BinaryIO, compression: Compression, level: int) -> Iterator[BinaryIO]:
    with ExitStack() as stack:
        if compression is Compression.GZIP:
            gz = gzip.GzipFile(filename="", mode="wb", fileobj=out, mtime=0, compresslevel=level)
            yield cast(BinaryIO, stack.enter_context(gz))
        elif compression is Compression.ZSTD:
            compressor = zstandard.ZstdCompressor(
                level=level, threads=_cores(), write_checksum=True
            )
            yield cast(BinaryIO, stack.enter_context(compressor.stream_writer(out, closefd=False)))
        else:
            crc32 = lzma.CHECK_CRC32
            with lzma.LZMAFile(out, "wb", format=lzma.FORMAT_XZ, check=crc32, preset=level) as xz:
                yield cast(BinaryIO, xz)
