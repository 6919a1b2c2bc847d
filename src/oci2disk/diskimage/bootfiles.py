"""What a disk boots with on its own: GRUB's boot.img in the MBR, an EFI system partition
and the loaders on it. Read from the disk file (any format qemu-img reads), never mounted.

Host tools: qemu-img (for images that are not raw), mtools (mdir, mcopy: the ESP's files).
"""

from __future__ import annotations

import os
import struct
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from oci2disk import run
from oci2disk.diskimage import partitions, qemuimg

SECTOR = 512
GPT_ESP = uuid.UUID("c12a7328-f81f-11d2-ba4b-00a0c93ec93b")
MBR_ESP = 0xEF
# GRUB's boot.img names itself in its error messages ("GRUB \0Geom\0Hard Disk...").
BOOT_IMG_MARK = b"GRUB \x00Geom\x00"
# The loaders UEFI firmware starts from a disk it has no boot entry for, per architecture.
REMOVABLE_LOADERS = {"BOOTX64.EFI": "x86_64", "BOOTAA64.EFI": "aarch64"}


@dataclass(frozen=True)
class BootFiles:
    """The boot code a disk carries."""

    bios: bool  # GRUB's boot.img in the MBR
    esp: tuple[int, int] | None  # (offset, size) of the EFI system partition
    esp_files: tuple[str, ...] = field(default=())  # paths on the ESP, "/EFI/BOOT/BOOTX64.EFI"

    @property
    def uefi_arch(self) -> str | None:
        """``uname -m`` of the removable-media loader on the ESP (x86_64, aarch64)."""
        for path in self.esp_files:
            name = path.rpartition("/")[2].upper()
            if path.upper().startswith("/EFI/BOOT/") and name in REMOVABLE_LOADERS:
                return REMOVABLE_LOADERS[name]
        return None

    @property
    def bootable(self) -> bool:
        return self.bios or self.uefi_arch is not None


def read_range(image: Path, fmt: str, offset: int, size: int, out: Path) -> Path:
    """``size`` bytes of the disk from ``offset`` into the file ``out`` (raw)."""
    if fmt == qemuimg.RAW:
        with image.open("rb") as src, out.open("wb") as dst:
            src.seek(offset)
            remaining = size
            while remaining:
                chunk = src.read(min(remaining, 1 << 20))
                if not chunk:
                    break
                dst.write(chunk)
                remaining -= len(chunk)
        return out
    block = SECTOR if offset % (1 << 20) or size % (1 << 20) else 1 << 20
    run.run(
        [
            "qemu-img", "dd", "-f", fmt, "-O", qemuimg.RAW, f"bs={block}",
            f"skip={offset // block}", f"count={size // block}",
            f"if={qemuimg.qemu_path(image)}", f"of={qemuimg.qemu_path(out)}",
        ],
        what=f"qemu-img could not read {os.fspath(image)}",
    )  # fmt: skip
    return out


def esp_range(head: bytes) -> tuple[int, int] | None:
    """The ESP's (offset, size) from the first MiB of a disk: a GPT entry of the ESP type,
    or an MBR partition of type 0xEF."""
    if len(head) < 2 * SECTOR or head[510:512] != b"\x55\xaa":
        return None
    if head[SECTOR : SECTOR + 8] == partitions.GPT_SIGNATURE:
        entries_lba, count, entry_size = struct.unpack_from("<QII", head, SECTOR + 72)
        for i in range(min(count, 128)):
            start = entries_lba * SECTOR + i * entry_size
            entry = head[start : start + entry_size]
            if len(entry) < 48:
                break
            if entry[:16] == GPT_ESP.bytes_le:
                first, last = struct.unpack_from("<QQ", entry, 32)
                return first * SECTOR, (last - first + 1) * SECTOR
        return None
    for i in range(4):
        kind, first, count = struct.unpack_from("<4xB3xII", head, 446 + 16 * i)
        if kind == MBR_ESP and count:
            return first * SECTOR, count * SECTOR
    return None


def esp_listing(esp: Path) -> tuple[str, ...]:
    """Every file path on the FAT image ``esp`` (mdir -/ -b: recursive, bare)."""
    proc = run.run(
        ["mdir", "-i", os.fspath(esp), "-/", "-b", "::/"],
        what="mdir could not read the EFI system partition",
        parsed=True,
        env={"MTOOLS_SKIP_CHECK": "1"},
    )
    paths = []
    for line in proc.stdout.decode(errors="replace").splitlines():
        line = line.strip()
        if line.startswith("::/") and not line.endswith("/"):
            paths.append(line[2:])
    return tuple(sorted(paths))


def esp_file(esp: Path, path: str) -> bytes:
    """One file of the FAT image ``esp`` (mcopy to stdout)."""
    proc = run.run(
        ["mcopy", "-i", os.fspath(esp), "-n", f"::{path}", "-"],
        what=f"mcopy could not read {path} from the EFI system partition",
        env={"MTOOLS_SKIP_CHECK": "1"},
    )
    return proc.stdout


@dataclass(frozen=True)
class Probed:
    """A disk's boot files, the bytes before its partitions, and its ESP as a file."""

    found: BootFiles
    head: bytes
    esp: Path | None


# The head read: the MBR gap or the BIOS boot partition that follows it (GPT, at 1 MiB).
HEAD_BYTES = 2 << 20


def probe(image: Path, workdir: Path, fmt: str | None = None) -> Probed:
    """What ``image`` boots with; its ESP copied out as a FAT image into ``workdir``."""
    fmt = fmt or qemuimg.image_format(image)
    size = min(HEAD_BYTES, int(qemuimg.info(image).get("virtual-size", HEAD_BYTES)))
    head = read_range(image, fmt, 0, size, workdir / "head.raw").read_bytes()
    bios = BOOT_IMG_MARK in head[:440]
    where = esp_range(head)
    if where is None:
        return Probed(BootFiles(bios, None), head, None)
    esp = read_range(image, fmt, where[0], where[1], workdir / "esp.fat")
    return Probed(BootFiles(bios, where, esp_listing(esp)), head, esp)


# grub-bios-setup's fields (GRUB include/grub/i386/pc/boot.h, diskboot.S).
KERNEL_SECTOR = 0x5C  # in boot.img: u64 LBA of core.img's first sector
FIRST_BLOCKLIST = 0x1F4  # in core.img's first sector: (u64 start, u16 sectors, u16 segment)
FIRST_LOAD_SEGMENT = 0x820


def problems(probed: Probed, root_uuid: str, grub_cfg: bytes | None) -> list[tuple[str, str]]:
    """What keeps the disk from booting as oci2disk wrote it, as (where, what) pairs: the
    core.img that boot.img points to, the ESP's loader and the root UUID both name."""
    found, head = probed.found, probed.head
    out: list[tuple[str, str]] = []
    if found.bios:
        (lba,) = struct.unpack_from("<Q", head, KERNEL_SECTOR)
        first = head[lba * SECTOR : (lba + 1) * SECTOR]
        if len(first) < SECTOR:
            out.append(("core.img", f"boot.img points to sector {lba}, outside the embedding area"))
        else:
            start, count, segment = struct.unpack_from("<QHH", first, FIRST_BLOCKLIST)
            rest = head[start * SECTOR : (start + count) * SECTOR]
            if segment != FIRST_LOAD_SEGMENT or start != lba + 1 or not count:
                out.append(("core.img", f"sector {lba} holds no GRUB diskboot blocklist"))
            elif len(rest) < count * SECTOR or rest.count(0) == len(rest):
                out.append(("core.img", f"sectors {start}..{start + count - 1} are missing"))
    if found.esp is not None:
        loader = next((p for p in found.esp_files if p.upper().startswith("/EFI/BOOT/BOOT")), None)
        if loader is None or probed.esp is None:
            out.append(("ESP", "no /EFI/BOOT/BOOT*.EFI loader on the EFI system partition"))
        elif root_uuid.encode() not in esp_file(probed.esp, loader):
            out.append((f"ESP{loader}", f"the loader does not search for the root {root_uuid}"))
    if (found.bios or found.esp is not None) and grub_cfg is not None:
        if f"root=UUID={root_uuid}".encode() not in grub_cfg:
            out.append(("boot/grub/grub.cfg", f"names no root=UUID={root_uuid}"))
    elif found.bios or found.esp is not None:
        out.append(("boot/grub/grub.cfg", "missing: GRUB has no menu to boot from"))
    return out
