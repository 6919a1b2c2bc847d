"""The canonical rootfs tar: for ``docker import``, ``mkfs.* -d``, ``virt-tar-in`` ...

The stream is the flattener's canonical PAX tar (sorted, permission-only modes, link
entries with their file's metadata), optionally compressed with gzip, zstd or xz.

Host tools: igzip (isal), pigz, xz (xz-utils), all optional (see compress.py).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import BinaryIO

from oci2disk.convert import compress
from oci2disk.recipe import TarSpec
from oci2disk.rootfs import ExtraFile
from oci2disk.rootfs.flat import FlatRootfs


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
