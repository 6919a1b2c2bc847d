"""qemu-img: what format a disk image is in, and conversions to and from raw.

The VM-format outputs (qcow2, vmdk, vhdx, vpc, vdi) are made from the raw disk here;
``verify`` and ``boot`` read any of them back by converting to a temporary raw file.

Host tools: qemu-img (qemu-utils).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from oci2disk import run
from oci2disk.compression import Compression
from oci2disk.errors import ConvertError

# qemu-img's names of the formats it writes, by oci2disk's (and its own) format names.
FORMATS = {
    "qcow2": "qcow2",
    "vmdk": "vmdk",
    "vhdx": "vhdx",
    "vpc": "vpc",
    "vhd": "vpc",
    "vdi": "vdi",
}
RAW = "raw"


def convert(raw: Path, fmt: str, out: Path, compression: Compression = Compression.NONE) -> None:
    """Write the raw disk ``raw`` as a ``fmt`` image ("qcow2", "vmdk" ...) at ``out``.

    ``compression`` compresses qcow2 clusters (GZIP is qcow2's zlib, or ZSTD); the
    other formats have none and ignore it.
    """
    target = FORMATS.get(fmt)
    if target is None:
        raise ConvertError(
            f"qemu-img does not write {fmt!r} here", hint=f"use one of: {', '.join(FORMATS)}"
        )
    argv = ["qemu-img", "convert", "-f", RAW, "-O", target]
    if target == "qcow2" and compression is not Compression.NONE:
        if not compression.qemu:
            raise ConvertError(
                f"qcow2 clusters cannot be {compression.label}-compressed",
                hint="qcow2 images compress with zlib (gzip) or zstd",
            )
        argv += ["-c", "-o", f"compression_type={compression.qemu}"]
    if target == "vpc":
        # Without force_size qemu rounds the size to a CHS geometry, which changes it.
        argv += ["-o", "force_size=on"]
    argv += [os.fspath(raw), os.fspath(out)]
    run.run(argv, what=f"qemu-img could not write the {fmt} image")


def qemu_path(path: Path) -> str:
    """``path`` as qemu-img must be given it: it reads "a:b" as a protocol prefix, so
    relative paths are made explicit."""
    text = os.fspath(path)
    return text if text.startswith("/") else "./" + text


def info(image: Path) -> dict[str, Any]:
    """``qemu-img info`` of ``image`` as a dict (format, virtual-size ...)."""
    proc = run.run(
        ["qemu-img", "info", "--output=json", "--", qemu_path(image)],
        what=f"qemu-img cannot read {os.fspath(image)}",
        parsed=True,
    )
    data = json.loads(proc.stdout)
    if not isinstance(data, dict):
        raise ConvertError(f"qemu-img info gave no description of {os.fspath(image)}")
    return data


def image_format(image: Path) -> str:
    """The format qemu-img sees: "raw", "qcow2", "vmdk", "vpc" ..."""
    return str(info(image)["format"])


def convert_to_raw(image: Path, out: Path, fmt: str | None = None) -> None:
    """A raw copy of ``image`` at ``out``; ``fmt`` names its format (probed when None)."""
    given = ["-f", fmt] if fmt else []
    run.run(
        ["qemu-img", "convert", *given, "-O", RAW, "--", qemu_path(image), qemu_path(out)],
        what=f"qemu-img could not read {os.fspath(image)}",
    )
