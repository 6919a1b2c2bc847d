"""``disk:FILE[:PARTITION]``: an existing disk image as a source.

A raw, qcow2, vmdk, vhdx, vpc or vdi disk (a cloud image, a VM someone installed by
hand) is read without root, loop devices, mounts or a VM: a non-raw image is first
checked (``qemu-img check``: a truncated qcow2 reads as zeros past its end) and
converted to a sparse raw file in the workdir; the MBR or GPT is read in Python; the
ext2/3/4 filesystem of the chosen partition is read with oci2disk's own reader, with
exact owners, modes, hard links, device numbers and xattrs. What it cannot read (LVM,
LUKS, xfs, btrfs, ...) is named, with the tool that can.

Host tools: qemu-img (qemu-utils), for formats other than raw.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from oci2disk import run
from oci2disk.diskimage import qemuimg
from oci2disk.diskimage.extfs import has_ext_magic
from oci2disk.errors import CommandError, ImageError, RefError
from oci2disk.oci.layout import OciImage, Platform
from oci2disk.rootfs.model import Kind, follow
from oci2disk.sources.exttree import (
    ExtTree,
    Partition,
    find_partitions,
)
from oci2disk.sources.image import image_from_tree

log = logging.getLogger("oci2disk.sources.disk")

# qemu-img formats oci2disk reads (qemu-img probes the format from the file's header).
FORMATS = ("raw", "qcow2", "vmdk", "vhdx", "vpc", "vdi")
# ``qemu-img check`` exit codes: 3 = leaked clusters only (harmless for reading),
# 63 = the format has no check (vmdk, vpc, raw).
CHECK_OK = (0, 3, 63)
OS_RELEASE = ("etc/os-release", "usr/lib/os-release")
GPT_BIOS_BOOT = "21686148-6449-6e6f-744e-656564454649"
GPT_ESP = "c12a7328-f81f-11d2-ba4b-00a0c93ec93b"

OTHER_TOOLS = "virt-tar-out or guestfish (libguestfs), which read it in a small VM"


@dataclass(frozen=True)
class Found:
    """What a partition (or a whole disk) holds when it is not ext2/3/4."""

    what: str
    hint: str


# (offset, magic, what it is, what to do)
_SIGNATURES: tuple[tuple[int, bytes, str, str], ...] = (
    (
        0,
        b"LUKS\xba\xbe",
        "a LUKS encrypted volume",
        "open it where you have the key (cryptsetup open), copy the opened volume to a "
        f"file and read that with disk:, or use {OTHER_TOOLS}",
    ),
    (
        512 + 24,
        b"LVM2 001",
        "an LVM2 physical volume",
        f"use {OTHER_TOOLS}, or copy the logical volume out (vgchange -ay; dd "
        "if=/dev/VG/LV of=root.img) and read root.img with disk:",
    ),
    (
        0,
        b"XFSB",
        "an xfs filesystem",
        f"use {OTHER_TOOLS}, or copy the files into an ext4 image",
    ),
    (
        0x10040,
        b"_BHRfS_M",
        "a btrfs filesystem",
        f"use {OTHER_TOOLS}, or copy the files into an ext4 image",
    ),
    (0, b"hsqs", "a squashfs image", "read the squashfs with sqfs2tar and use rootfs:FILE"),
    (0x8001, b"CD001", "an ISO 9660 filesystem", "a live ISO is read with iso:FILE"),
    (4086, b"SWAPSPACE2", "a swap area", "choose the partition of the root filesystem"),
    (0x52, b"FAT32", "a FAT filesystem (an EFI system partition?)", "choose the root"),
    (0x36, b"FAT1", "a FAT filesystem", "choose the partition of the root filesystem"),
)


def identify(image: Path, offset: int) -> Found | None:
    """The kind of data at ``offset`` of ``image`` when it is not ext2/3/4 (None: unknown)."""
    with image.open("rb") as handle:
        for where, magic, what, hint in _SIGNATURES:
            handle.seek(offset + where)
            if handle.read(len(magic)) == magic:
                return Found(what, hint)
    return None


def image_format(disk: Path) -> str:
    """The format qemu-img reads ``disk`` as; raw files are recognised without it."""
    if not disk.is_file():
        raise ImageError(f"disk:{disk}: {disk} is not a file")
    if disk.stat().st_size == 0:
        raise ImageError(f"disk:{disk}: the file is empty")
    try:
        info = qemuimg.info(disk)
    except CommandError as exc:
        raise ImageError(
            f"disk:{disk}: qemu-img cannot open it as a disk image:\n{exc.stderr_tail}",
            hint="the file is damaged or truncated (download or copy it again)",
        ) from None
    fmt = str(info.get("format", ""))
    if fmt not in FORMATS:
        raise ImageError(
            f"disk:{disk}: a {fmt or 'unknown'} image; oci2disk reads {', '.join(FORMATS)}",
            hint="convert it first: qemu-img convert -O raw FILE disk.raw",
        )
    return fmt


def raw_disk(disk: Path, workdir: Path) -> Path:
    """``disk`` itself when it is raw, else a checked sparse raw copy in ``workdir``."""
    fmt = image_format(disk)
    if fmt == "raw":
        return disk
    check = run.run(["qemu-img", "check", "-f", fmt, "--", qemuimg.qemu_path(disk)], check=False)
    if check.returncode not in CHECK_OK:
        text = (check.stdout + check.stderr).decode("utf-8", "replace").strip().splitlines()
        summary = "\n".join(text[-3:])
        raise ImageError(
            f"disk:{disk}: the {fmt} image is damaged or truncated "
            f"(qemu-img check exit code {check.returncode}):\n{summary}",
            hint="copy or download the image again; a partial copy reads as zeros where "
            "its data is missing, so oci2disk refuses it",
        )
    workdir.mkdir(parents=True, exist_ok=True)
    raw = workdir / "disk.raw"
    qemuimg.convert_to_raw(disk, raw, fmt)
    return raw


def choose_partition(raw: Path, partition: int | None, *, name: str) -> tuple[int, int | None]:
    """(byte offset, partition number) of the ext filesystem to read.

    ``partition`` when given; else the ext partition holding /etc/os-release, else the
    GPT root partition, else the only ext partition. A disk without a table is a bare
    filesystem at offset 0.
    """
    partitions = find_partitions(raw)
    where = f"disk:{name}"
    if not partitions:
        if partition is not None:
            raise ImageError(
                f"{where}: the disk has no partition table, so no partition {partition}",
                hint=f"leave out the number (disk:{name}) to read it as a bare filesystem",
            )
        _require_ext(raw, 0, f"{where}: the disk (it has no partition table)")
        return 0, None
    numbers = ", ".join(str(p.number) for p in partitions)
    if partition is not None:
        chosen = next((p for p in partitions if p.number == partition), None)
        if chosen is None:
            raise ImageError(
                f"{where}: there is no partition {partition}; the disk's "
                f"{partitions[0].table.upper()} has partition(s) {numbers}",
                hint=f"write disk:{name}:N with one of {numbers}, or leave the number out",
            )
        _require_ext(raw, chosen.start, f"{where}: partition {partition}")
        return chosen.start, chosen.number
    ext = [p for p in partitions if has_ext_magic(raw, p.start)]
    if not ext:
        found = "; ".join(_describe(raw, p) for p in partitions)
        hint = _first_hint(raw, partitions)
        raise ImageError(
            f"{where}: no partition holds an ext2/3/4 filesystem ({found}); "
            "oci2disk reads ext2/3/4 only",
            hint=hint,
        )
    for candidate in ext:
        with ExtTree(raw, candidate.start) as tree:
            if any(_is_file(tree, path) for path in OS_RELEASE):
                log.info("%s: the root filesystem is partition %d", where, candidate.number)
                return candidate.start, candidate.number
    roots = [p for p in ext if p.is_root]
    if roots:
        return roots[0].start, roots[0].number
    if len(ext) == 1:
        return ext[0].start, ext[0].number
    raise ImageError(
        f"{where}: partitions {', '.join(str(p.number) for p in ext)} hold ext "
        "filesystems and none has /etc/os-release",
        hint=f"choose one: disk:{name}:N",
    )


def _is_file(tree: ExtTree, path: str) -> bool:
    entry = follow(tree, path)
    return entry is not None and entry.kind is Kind.FILE


def _require_ext(raw: Path, offset: int, what: str) -> None:
    if has_ext_magic(raw, offset):
        return
    found = identify(raw, offset)
    if found is None:
        raise ImageError(
            f"{what} holds no ext2/3/4 filesystem (and nothing else oci2disk recognises)",
            hint=f"oci2disk reads ext2/3/4 only; check the partition number (or use {OTHER_TOOLS})",
        )
    raise ImageError(f"{what} holds {found.what}: oci2disk reads ext2/3/4 only", hint=found.hint)


def _describe(raw: Path, part: Partition) -> str:
    if part.type == GPT_BIOS_BOOT:
        return f"{part.number}: BIOS boot partition"
    found = identify(raw, part.start)
    if found is not None:
        return f"{part.number}: {found.what}"
    if part.type == GPT_ESP:
        return f"{part.number}: EFI system partition"
    return f"{part.number}: unknown (type {part.type})"


def _first_hint(raw: Path, partitions: list[Partition]) -> str:
    for part in partitions:
        found = identify(raw, part.start)
        if found is not None and not found.what.startswith(("a FAT", "a swap")):
            return found.hint
    return f"oci2disk reads ext2/3/4 only; use {OTHER_TOOLS}"


def image_from_disk(
    disk: Path,
    workdir: Path,
    *,
    partition: int | None = None,
    platform: Platform | None = None,
) -> OciImage:
    """The root filesystem of ``disk`` as a one-layer OCI image in ``workdir``."""
    raw = raw_disk(disk, workdir / "disk")
    try:
        offset, number = choose_partition(raw, partition, name=str(disk))
        where = f"disk:{disk}" + (f":{number}" if number is not None else "")
        with ExtTree(raw, offset) as tree:
            available = raw.stat().st_size - offset
            if tree.size > available:
                raise ImageError(
                    f"{where}: the {tree.fs_type} filesystem spans {tree.size} bytes but the "
                    f"disk has {available} from its start: the file is truncated",
                    hint="copy or download the image again",
                )
            return image_from_tree(tree, workdir / "rootfs", platform=platform, where=where)
    finally:
        if raw != disk:
            raw.unlink(missing_ok=True)


def parse_disk_ref(rest: str) -> tuple[Path, int | None]:
    """``FILE[:PARTITION]``: the whole text is the file when such a file exists."""
    head, colon, tail = rest.rpartition(":")
    if colon and head and tail.isdigit() and not Path(rest).exists():
        number = int(tail)
        if number < 1:
            raise RefError(f"disk:{rest}: partitions are numbered from 1")
        return Path(head), number
    return Path(rest), None
