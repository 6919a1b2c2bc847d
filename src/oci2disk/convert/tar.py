"""The canonical rootfs tar: for ``docker import``, ``mkfs.* -d``, ``virt-tar-in`` ...

The stream is the flattener's canonical PAX tar (sorted, permission-only modes, link
entries with their file's metadata), optionally compressed with gzip, zstd or xz.

Host tools: igzip (isal), pigz, xz (xz-utils), all optional (see compress.py).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO

from oci2disk.convert import compress
from oci2disk.convert.options import ConvertOptions, TarSpec
from oci2disk.convert.plugin import OutputFormat
from oci2disk.rootfs import ExtraFile
from oci2disk.rootfs.flat import FlatRootfs

if TYPE_CHECKING:
    from oci2disk.convert.job import Job


def write_tar(
    rootfs: FlatRootfs,
    path: Path,
    spec: TarSpec,
    *,
    extra: Sequence[ExtraFile] = (),
    wrap: Callable[[BinaryIO], BinaryIO] | None = None,
) -> None:
    """Write the rootfs tar (with ``extra`` files added) to ``path``, compressed per ``spec``."""
    with compress.compressed(path, spec.compression, spec.level) as sink:
        rootfs.write_tar(wrap(sink) if wrap else sink, extra=extra)


# ------------------------------------------------------------------ the tar format


def write(job: Job, out: Path) -> None:
    spec = job.options.tar
    how = compress.describe(spec.compression, spec.level)
    with job.progress.step(f"writing the rootfs tar (compression: {how})"):
        write_tar(
            job.plain_rootfs,
            out,
            spec,
            extra=job.extra_for(disk_output=False),
            wrap=lambda s: job.stream(s, "rootfs tar"),
        )


def tar_name(base: str, options: ConvertOptions) -> str:
    return f"{base}.tar{options.tar.compression.suffix}"


TAR = OutputFormat(
    name="tar",
    summary="the canonical rootfs tar, for docker import (--tar-compression)",
    write=write,
    output_name=tar_name,
)
