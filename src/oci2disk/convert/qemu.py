"""qcow2, vmdk, vhdx, vpc (VHD) and vdi images, converted from the raw disk.

Host tools: qemu-img (qemu-utils).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from oci2disk import run
from oci2disk.errors import ConvertError
from oci2disk.recipe import Compression, Format

QEMU_FORMAT = {
    Format.QCOW2: "qcow2",
    Format.VMDK: "vmdk",
    Format.VHDX: "vhdx",
    Format.VPC: "vpc",
    Format.VDI: "vdi",
}


def convert(raw: Path, fmt: Format, out: Path, compression: Compression = Compression.NONE) -> None:
    argv = ["qemu-img", "convert", "-f", "raw", "-O", QEMU_FORMAT[fmt]]
    if fmt is Format.QCOW2 and compression is not Compression.NONE:
        argv += ["-c", "-o", f"compression_type={compression.value}"]
    if fmt is Format.VPC:
        # Without force_size qemu rounds the size to a CHS geometry, which changes it.
        argv += ["-o", "force_size=on"]
    argv += [str(raw), str(out)]
    run.run(argv, what=f"qemu-img could not write the {fmt.value} image")


def info(image: Path) -> dict[str, Any]:
    proc = run.run(
        ["qemu-img", "info", "--output=json", os.fspath(image)],
        what=f"qemu-img cannot read {os.fspath(image)}",
    )
    data = json.loads(proc.stdout)
    if not isinstance(data, dict):
        raise ConvertError(f"qemu-img info gave no description of {os.fspath(image)}")
    return data


def image_format(image: Path) -> str:
    """The format qemu-img sees: "raw", "qcow2", "vmdk", "vpc" ..."""
    return str(info(image)["format"])


def virtual_size(image: Path) -> int:
    return int(info(image)["virtual-size"])


def convert_to_raw(image: Path, out: Path) -> None:
    run.run(
        ["qemu-img", "convert", "-O", "raw", os.fspath(image), os.fspath(out)],
        what=f"qemu-img could not read {os.fspath(image)}",
    )
