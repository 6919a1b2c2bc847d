"""GRUB for BIOS (i386-pc), written into the disk file as bytes: what grub-bios-setup
does, without a device.

Three pieces, as GRUB's util/setup.c lays them down when it embeds core.img:

- ``core.img`` (``grub-mkimage -O i386-pc``: diskboot.img + kernel + modules + the early
  config) goes into contiguous sectors: the BIOS boot partition on GPT, or the gap
  between the MBR and a first partition at 1 MiB on MBR.
- diskboot.img, the first sector of core.img, ends in a blocklist that tells it where
  the rest of core.img is: one entry {start LBA, sector count, load segment 0x820}
  followed by a zero terminator (``patch_core_blocklist``).
- ``boot.img`` becomes sector 0, keeping the disk's partition table and disk signature
  (bytes 0x1B8..0x1FD) and BPB area (0x03..0x59), with the LBA of core.img's first
  sector at 0x5C, boot drive 0xFF at 0x64 (use the drive the BIOS passes in DL) and the
  floppy drive check at 0x66 replaced by two NOPs, as grub-bios-setup does for a hard
  disk (``patch_boot_sector``).

No Reed-Solomon codes are added (``grub-install --no-rs-codes``): the image is written
once, not by a tool that may later overwrite the gap.

Host tools: grub-mkimage (Debian grub-common); the modules, boot.img and diskboot.img
come from a GRUB i386-pc module folder (Debian grub-pc-bin: /usr/lib/grub/i386-pc).
"""

from __future__ import annotations

import os
import struct
from collections.abc import Sequence
from pathlib import Path

from oci2disk.bootloader.common import (
    SECTOR,
    BootloaderError,
    GrubTarget,
    mkimage,
    read_at,
    write_at,
)
from oci2disk.bootloader.common import require_modules_dir as _require_modules_dir
from oci2disk.bootloader.grubcfg import early_config, image_modules

# Offsets in boot.img (GRUB include/grub/i386/pc/boot.h).
BPB_START = 0x03
BPB_END = 0x5A
KERNEL_SECTOR = 0x5C  # u64: LBA of core.img's first sector
BOOT_DRIVE = 0x64  # 0xFF: take the drive number the BIOS passed in DL
DRIVE_CHECK = 0x66  # a jmp over the "is it a hard disk?" check; NOPs for hard disks
PART_KEEP_START = 0x1B8  # WINDOWS_NT_MAGIC: disk signature, then the partition table
PART_END = 0x1FE
BOOT_SIGNATURE = b"\x55\xaa"
# diskboot.img's blocklist entries: {u64 start, u16 len, u16 segment}, from the end of
# the sector backwards (GRUB struct grub_boot_blocklist).
BLOCKLIST = struct.Struct("<QHH")
FIRST_BLOCKLIST = SECTOR - BLOCKLIST.size
KERNEL_SEGMENT = 0x800  # GRUB_BOOT_I386_PC_KERNEL_SEG
FIRST_LOAD_SEGMENT = KERNEL_SEGMENT + (SECTOR >> 4)
# core.img is loaded at 0x8000 and must stay below 0x78000 (util/setup.c's maxsec).
MAX_CORE_SECTORS = (0x78000 - 0x9000) // SECTOR


def build_core_image(
    modules_dir: Path, root_uuid: str, *, extra_modules: Sequence[str] = ()
) -> bytes:
    """core.img for i386-pc that finds the root filesystem by UUID and reads
    ($root)/boot/grub/grub.cfg. The bytes depend only on the modules and the UUID."""
    target = GrubTarget.I386_PC
    core = mkimage(
        modules_dir,
        target,
        early_config(root_uuid),
        [*image_modules(target), *extra_modules],
        "core.img",
    )
    sectors = -(-len(core) // SECTOR)
    if sectors > MAX_CORE_SECTORS:
        raise BootloaderError(
            f"core.img is {sectors} sectors; GRUB i386-pc loads at most {MAX_CORE_SECTORS}",
            hint="build it with fewer extra modules",
        )
    return core


def boot_image(modules_dir: Path) -> bytes:
    """The MBR boot code of this GRUB (boot.img of the module folder)."""
    _require_modules_dir(modules_dir, GrubTarget.I386_PC)
    data = (modules_dir / "boot.img").read_bytes()
    if len(data) != SECTOR or data[PART_END:] != BOOT_SIGNATURE:
        raise BootloaderError(f"{os.fspath(modules_dir / 'boot.img')} is not a GRUB boot.img")
    return data


def patch_boot_sector(boot_img: bytes, sector0: bytes, core_sector: int) -> bytes:
    """boot.img made ready for this disk: BPB and partition table from the disk's
    current sector 0, core.img's LBA, boot drive and drive check as grub-bios-setup sets."""
    if len(boot_img) != SECTOR or len(sector0) != SECTOR:
        raise BootloaderError("boot.img and sector 0 must each be 512 bytes")
    if core_sector < 1:
        raise BootloaderError(f"core.img cannot start at sector {core_sector}")
    out = bytearray(boot_img)
    out[BPB_START:BPB_END] = sector0[BPB_START:BPB_END]
    struct.pack_into("<Q", out, KERNEL_SECTOR, core_sector)
    out[BOOT_DRIVE] = 0xFF
    out[DRIVE_CHECK : DRIVE_CHECK + 2] = b"\x90\x90"
    out[PART_KEEP_START:PART_END] = sector0[PART_KEEP_START:PART_END]
    out[PART_END:] = BOOT_SIGNATURE
    return bytes(out)


def patch_core_blocklist(core: bytes, first_sector: int) -> bytes:
    """core.img padded to whole sectors, its blocklist naming the sectors after
    ``first_sector`` (where the disk holds core.img's first sector)."""
    if len(core) < 2 * SECTOR:
        raise BootloaderError("core.img is smaller than two sectors: not a GRUB i386-pc core")
    sectors = -(-len(core) // SECTOR)
    out = bytearray(core) + bytes(sectors * SECTOR - len(core))
    # Clear the old entries (util/setup.c walks back until an entry of length 0).
    offset = FIRST_BLOCKLIST
    while True:
        length = BLOCKLIST.unpack_from(out, offset)[1]
        if length == 0:
            break
        BLOCKLIST.pack_into(out, offset, 0, 0, 0)
        offset -= BLOCKLIST.size
        if offset <= 0:
            raise BootloaderError("core.img has no blocklist terminator: not a GRUB i386-pc core")
    if sectors - 1 > 0xFFFF:
        raise BootloaderError("core.img is too large for one blocklist entry")
    BLOCKLIST.pack_into(out, FIRST_BLOCKLIST, first_sector + 1, sectors - 1, FIRST_LOAD_SEGMENT)
    BLOCKLIST.pack_into(out, FIRST_BLOCKLIST - BLOCKLIST.size, 0, 0, 0)
    return bytes(out)


def read_blocklist(core_sector0: bytes) -> list[tuple[int, int, int]]:
    """The (start, length, segment) entries of diskboot's blocklist, up to the terminator."""
    entries = []
    offset = FIRST_BLOCKLIST
    while offset > 0:
        entry = BLOCKLIST.unpack_from(core_sector0, offset)
        if entry[1] == 0:
            break
        entries.append(entry)
        offset -= BLOCKLIST.size
    return entries


def install(
    disk: Path,
    core: bytes,
    boot_img: bytes,
    *,
    first_sector: int,
    max_sectors: int,
) -> None:
    """Write core.img at ``first_sector`` (at most ``max_sectors``) and boot.img at sector 0.

    The partition table must already be in the file: sector 0 keeps it. The embedding
    area must hold only zeros or an earlier core.img, so nothing else is overwritten.
    """
    sectors = -(-len(core) // SECTOR)
    if sectors > max_sectors:
        raise BootloaderError(
            f"core.img needs {sectors} sectors but the embedding area has {max_sectors}",
            hint="give the BIOS boot partition (GPT) or the gap before the first "
            "partition (MBR) at least 1 MiB",
        )
    area = read_at(disk, first_sector * SECTOR, sectors * SECTOR)
    if area.count(0) != len(area) and not _is_core_sector(area[:SECTOR]):
        raise BootloaderError(
            f"sectors {first_sector}..{first_sector + sectors - 1} of {os.fspath(disk)} are "
            "not empty; refusing to overwrite them with GRUB's core.img",
            hint="install GRUB into a freshly partitioned disk file",
        )
    sector0 = read_at(disk, 0, SECTOR)
    write_at(disk, first_sector * SECTOR, patch_core_blocklist(core, first_sector))
    write_at(disk, 0, patch_boot_sector(boot_img, sector0, first_sector))


def _is_core_sector(sector: bytes) -> bool:
    """Whether a sector looks like diskboot.img: its first blocklist entry loads at 0x820."""
    segment: int = BLOCKLIST.unpack_from(sector, FIRST_BLOCKLIST)[2]
    return segment == FIRST_LOAD_SEGMENT
