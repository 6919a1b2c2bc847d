"""qcow2, vmdk, vhdx, vpc (VHD) and vdi images, converted from the raw disk.

Each is the raw disk (partition table and ext filesystem, see :mod:`.disk`) rewritten by
``qemu-img convert``; qcow2 can compress its clusters (``--compression zlib|zstd``).

Host tools: qemu-img (qemu-utils), and those of the raw disk.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from oci2disk.convert.disk import DISK_TOOLS, require_mke2fs
from oci2disk.convert.plugin import OutputFormat, Tool, named
from oci2disk.diskimage import qemuimg, stamps

if TYPE_CHECKING:
    from oci2disk.convert.job import Job

QEMU_IMG = Tool("qemu-img", "qemu-utils")


def vm_format(name: str, summary: str, suffix: str, aliases: tuple[str, ...] = ()) -> OutputFormat:
    """A format qemu-img writes from the raw disk."""

    def write(job: Job, out: Path) -> None:
        raw = job.raw_disk()
        step = job.progress.step(f"qemu-img convert to {name}")
        with step, job.progress.watching(out, f"qemu-img {name}"):
            qemuimg.convert(raw, name, out, job.options.compression)
        # qemu-img writes random ids and the time into these: the same image, same bytes
        final = next(t.name for f, t in job.targets.items() if f.name == name)
        stamps.normalize(out, name, f"{job.seed}:{name}", job.timestamp, final)

    return OutputFormat(
        name=name,
        summary=summary,
        write=write,
        output_name=named(suffix),
        tools=(*DISK_TOOLS, QEMU_IMG),
        aliases=aliases,
        disk=True,
        from_raw=True,
        preflight=require_mke2fs,
    )


QCOW2 = vm_format("qcow2", "QEMU's copy-on-write image (--compression zlib|zstd)", "qcow2")
VMDK = vm_format("vmdk", "VMware disk", "vmdk")
VHDX = vm_format("vhdx", "Hyper-V disk", "vhdx")
VPC = vm_format("vpc", "Virtual PC / Azure VHD (also called vhd)", "vhd", aliases=("vhd",))
VDI = vm_format("vdi", "VirtualBox disk", "vdi")
