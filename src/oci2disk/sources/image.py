"""A rootfs :class:`Tree` from any source, wrapped as a single-layer OCI image.

The layer is the tree's canonical tar (:mod:`oci2disk.rootfs.tarwriter`), uncompressed,
in a layout inside the run's workdir; the config's architecture is the one ``--platform``
gives, else the one the tree's ELF programs are built for.

Host tools: none.
"""

from __future__ import annotations

import logging
import struct
from pathlib import Path

from oci2disk.arch import Arch
from oci2disk.errors import ImageError
from oci2disk.oci.layout import OciImage, Platform, layout_from_rootfs_tar
from oci2disk.rootfs.model import Kind, Tree, follow
from oci2disk.rootfs.tarwriter import write_tree_tar

log = logging.getLogger("oci2disk.sources")

# Programs every Linux rootfs has one of; the first ELF among them names the machine.
ELF_PROBES = (
    "bin/sh",
    "usr/bin/env",
    "sbin/init",
    "lib/systemd/systemd",
    "usr/lib/systemd/systemd",
    "bin/ls",
    "usr/bin/ls",
    "bin/busybox",
)
ELF_MAGIC = b"\x7fELF"
ELF_DATA_BIG_ENDIAN = 2
DEFAULT_CONFIG = {
    "Env": ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"],
    "Cmd": ["/bin/sh"],
}


def guess_arch(tree: Tree) -> Arch | None:
    """The architecture of the first ELF program among :data:`ELF_PROBES`, or None."""
    for path in ELF_PROBES:
        entry = follow(tree, path)
        if entry is None or entry.kind is not Kind.FILE or entry.size < 20:
            continue
        with tree.open(entry.path) as program:
            head = program.read(20)
        if not head.startswith(ELF_MAGIC):
            continue  # a shell script (busybox-less /sbin/init wrappers, ...)
        order = ">" if head[5] == ELF_DATA_BIG_ENDIAN else "<"
        (machine,) = struct.unpack_from(order + "H", head, 18)
        arch = Arch.from_elf_machine(machine)
        if arch is not None:
            log.debug("/%s is an ELF program for %s", entry.path, arch.oci)
            return arch
    return None


def platform_of(tree: Tree, given: Platform | None, where: str) -> Platform:
    """``given`` (``--platform``) when set, else the platform the tree's programs name."""
    if given is not None:
        return given
    arch = guess_arch(tree)
    if arch is None:
        raise ImageError(
            f"{where}: cannot tell the architecture: none of /{', /'.join(ELF_PROBES[:3])} "
            "... is an ELF program",
            hint="give it with --platform, e.g. --platform linux/amd64",
        )
    return Platform("linux", arch.oci, arch.variant)


def image_from_tree(
    tree: Tree, workdir: Path, *, platform: Platform | None = None, where: str
) -> OciImage:
    """Write ``tree`` as a one-layer OCI layout in ``workdir``/image and open it."""
    plat = platform_of(tree, platform, where)
    workdir.mkdir(parents=True, exist_ok=True)
    tar_path = workdir / "rootfs.tar"
    try:
        with tar_path.open("wb") as out:
            write_tree_tar(tree, out)
        return layout_from_rootfs_tar(
            tar_path, workdir / "image", None, platform=plat, config=DEFAULT_CONFIG
        )
    finally:
        tar_path.unlink(missing_ok=True)
