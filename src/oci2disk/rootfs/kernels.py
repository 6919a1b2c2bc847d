"""The one kernel finder: which kernels and initrds a root filesystem holds.

Every source goes through here (the flattened image for ``-f kernel``, a disk's ext
filesystem for ``boot``), so both pick the same kernel. Kernels are looked for where
distributions install them: ``/boot/vmlinuz-VERSION`` (Debian, Ubuntu, Fedora, Arch,
Alpine), ``/boot/vmlinux-``, ``/boot/bzImage-``, ``/boot/Image-`` and ``/boot/zImage-``
(arm64 and embedded builds), and ``/usr/lib/modules/VERSION/vmlinuz`` (Fedora, Arch).
An initrd is ``/boot/initrd.img-VERSION`` (Debian, Ubuntu), ``/boot/initramfs-VERSION.img``
(Fedora, Arch, Alpine), ``/boot/initrd-VERSION`` or ``/usr/lib/modules/VERSION/initrd``.
Several kernels: the newest version, unless one is asked for.

:func:`kernel_arch` tells the architecture a kernel image is for from its header.

Host tools: none.
"""

from __future__ import annotations

import logging
import re
import struct
import zlib
from dataclasses import dataclass

from oci2disk.arch import Arch
from oci2disk.errors import ImageError
from oci2disk.rootfs.model import Entry, Kind, Tree, follow

log = logging.getLogger("oci2disk.kernels")

KERNEL_RE = re.compile(r"^(?:vmlinuz|vmlinux|bzImage|Image|zImage)-(.+)$")
INITRD_NAMES = ("initrd.img-{v}", "initramfs-{v}.img", "initrd-{v}", "initrd-{v}.img")
NO_KERNEL_HINT = (
    "install one in the Dockerfile (Debian/Ubuntu: apt-get install linux-image-amd64, "
    "or linux-image-arm64), or pass the kernel from outside"
)


@dataclass(frozen=True)
class KernelFiles:
    version: str
    kernel: Entry  # a regular file (symlinks already followed)
    initrd: Entry | None


def version_key(version: str) -> tuple[tuple[int, int | str], ...]:
    """Compare versions part by part, numbers as numbers: 6.1.0-50 is newer than 6.1.0-9."""
    return tuple(
        (0, int(part)) if part.isdigit() else (1, part)
        for part in re.findall(r"\d+|[^\d]+", version)
    )


def find_kernels(tree: Tree) -> dict[str, KernelFiles]:
    """Every kernel of ``tree`` by version, each with its initrd when there is one."""
    candidates: list[tuple[str, str]] = []
    boot = tree.lookup("boot")
    if boot is not None:
        for entry in _children(tree, "boot"):
            match = KERNEL_RE.match(entry.path.rpartition("/")[2])
            if match:
                candidates.append((match.group(1), entry.path))
    for modules in ("usr/lib/modules", "lib/modules"):
        directory = follow(tree, modules)
        if directory is None or directory.kind is not Kind.DIR:
            continue
        for entry in _children(tree, directory.path):
            if entry.kind is Kind.DIR:
                version = entry.path.rpartition("/")[2]
                candidates.append((version, f"{entry.path}/vmlinuz"))
    found: dict[str, KernelFiles] = {}
    for version, path in candidates:
        if version in found:
            continue
        kernel = follow(tree, path)
        if kernel is None or kernel.kind is not Kind.FILE or not kernel.size:
            continue
        found[version] = KernelFiles(version, kernel, _initrd(tree, version))
    return found


def _children(tree: Tree, directory: str) -> list[Entry]:
    """The entries directly below ``directory`` (a Tree has no listing call: filter)."""
    prefix = "" if directory == "." else directory + "/"
    lister = getattr(tree, "children", None)
    if callable(lister):
        listed: list[Entry] = lister(directory)
        return listed
    return [
        e
        for e in tree.entries()
        if e.path.startswith(prefix) and "/" not in e.path[len(prefix) :] and e.path != "."
    ]


def _initrd(tree: Tree, version: str) -> Entry | None:
    candidates = [f"boot/{name.format(v=version)}" for name in INITRD_NAMES]
    candidates += [f"usr/lib/modules/{version}/initrd", f"lib/modules/{version}/initrd"]
    for path in candidates:
        entry = follow(tree, path)
        if entry is not None and entry.kind is Kind.FILE and entry.size:
            return entry
    return None


def choose(tree: Tree, version: str | None = None) -> KernelFiles:
    """The kernel to use: ``version`` when given, else the newest one."""
    kernels = find_kernels(tree)
    if not kernels:
        raise ImageError(
            "the image has no kernel (no /boot/vmlinuz-VERSION or "
            "/usr/lib/modules/VERSION/vmlinuz)",
            hint=NO_KERNEL_HINT,
        )
    versions = sorted(kernels, key=version_key)
    if version is not None:
        if version not in kernels:
            raise ImageError(
                f"the image has no kernel {version}",
                hint=f"kernels in the image: {', '.join(versions)}; "
                "set [kernel] version in recipe.toml (or --kernel-version) to one of them",
            )
        return kernels[version]
    if len(versions) > 1:
        log.info(
            "the image has %d kernels (%s); using the newest, %s",
            len(versions),
            ", ".join(versions),
            versions[-1],
        )
    return kernels[versions[-1]]


# Where each kernel image format says what it is (Linux boot protocols).
_X86_BZIMAGE_MAGIC = (0x202, b"HdrS")
_ARM64_IMAGE_MAGIC = (0x38, b"ARM\x64")
_RISCV_IMAGE_MAGIC = (0x38, b"RSC\x05")
HEAD_BYTES = 4096


def kernel_arch(head: bytes) -> Arch:
    """The architecture of a kernel image from its first bytes (:data:`HEAD_BYTES`).

    Knows x86 bzImages, arm64 and riscv64 Images (also gzip-compressed, as Debian's
    arm64 vmlinuz) and ELF vmlinux files.
    """
    if head.startswith(b"\x1f\x8b"):
        try:
            head = zlib.decompressobj(wbits=31).decompress(head, HEAD_BYTES)
        except zlib.error:
            head = b""
    if head.startswith(b"\x7fELF") and len(head) >= 20:
        machine = struct.unpack_from("<H", head, 18)[0]
        arch = Arch.from_elf_machine(machine)
        if arch is not None:
            return arch
    for (offset, magic), arch in (
        (_X86_BZIMAGE_MAGIC, Arch.X86_64),
        (_ARM64_IMAGE_MAGIC, Arch.AARCH64),
        (_RISCV_IMAGE_MAGIC, Arch.RISCV64),
    ):
        if head[offset : offset + len(magic)] == magic:
            return arch
    raise ImageError(
        "cannot tell which architecture the kernel is for",
        hint="oci2disk knows x86_64 bzImages, arm64 and riscv64 Images (plain or gzip) "
        "and ELF vmlinux files",
    )
