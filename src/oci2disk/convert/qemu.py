"""qcow2, vmdk, vhdx, vpc (VHD) and vdi images, converted from the raw disk.

Host tools: qemu-img (qemu-utils).
"""

from __future__ import annotations

from pathlib import Path

from oci2disk import run
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


def virtual_size(image: Path) -> int:
    import json

    proc = run.run(["qemu-img", "info", "--output=json", str(image)])
    return int(json.loads(proc.stdout)["virtual-size"])
