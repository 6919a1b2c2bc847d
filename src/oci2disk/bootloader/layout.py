"""Partition layouts for bootable disks, as plain data for the disk writer.

``gpt_layout`` is the layout of Debian's and Ubuntu's cloud images, which boot with BIOS
and UEFI from one disk: a BIOS boot partition (GRUB's core.img), an EFI system partition
and the root filesystem last, so that it can grow into a larger disk. Partition numbers
follow those images too (root 1, BIOS boot 14, ESP 15): the root stays ``vda1``/``sda1``.
``mbr_layout`` is BIOS only: core.img sits in the gap between the MBR and the root
partition at 1 MiB.

The disk writer owns the table: it writes these partitions (sfdisk, or its own code),
then calls the installers with the byte ranges from here.

Host tools: none (pure Python).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from oci2disk.bootloader.common import SECTOR, BootloaderError, MiB

GPT_BIOS_BOOT = "21686148-6449-6E6F-744E-656564454649"
GPT_ESP = "C12A7328-F81F-11D2-BA4B-00A0C93EC93B"
GPT_LINUX = "0FC63DAF-8483-4772-8E79-3D69D8477DE4"
# The discoverable-partitions root types, for writers that want them.
GPT_ROOT_X86_64 = "4F68BCE3-E8CD-4DB1-96E7-FBCAF984B709"
GPT_ROOT_ARM64 = "B921B045-1DF0-41C3-AF44-4C6F280D3FAE"
MBR_LINUX = "83"

FIRST_PARTITION = 1 * MiB
BIOS_BOOT_BYTES = 1 * MiB  # core.img is about 170 KiB with the modules oci2disk builds in
# Debian 12's cloud images give their ESP 124 MiB; that leaves room for a second
# bootloader, shim and fallback files without a resize.
ESP_BYTES = 124 * MiB
GPT_BACKUP_BYTES = 1 * MiB  # the backup GPT (33 sectors), rounded to keep the end aligned


class Role(enum.Enum):
    BIOS_BOOT = "bios-boot"
    ESP = "esp"
    ROOT = "root"


class TableKind(enum.Enum):
    GPT = "gpt"
    MBR = "mbr"


@dataclass(frozen=True)
class Partition:
    """One partition: byte range on the disk, number in the table, type, name."""

    role: Role
    number: int
    start: int  # bytes from the start of the disk, MiB-aligned
    size: int  # bytes
    type: str  # GPT type GUID, or MBR type byte in hex ("83")
    name: str  # GPT partition name (unused on MBR)
    bootable: bool = False  # MBR active flag

    @property
    def start_sector(self) -> int:
        return self.start // SECTOR

    @property
    def sectors(self) -> int:
        return self.size // SECTOR

    @property
    def end(self) -> int:
        return self.start + self.size


@dataclass(frozen=True)
class BootLayout:
    """A whole disk: its table kind, size, and partitions in disk order."""

    table: TableKind
    disk_bytes: int
    partitions: tuple[Partition, ...]

    def get(self, role: Role) -> Partition | None:
        for partition in self.partitions:
            if partition.role is role:
                return partition
        return None

    @property
    def root(self) -> Partition:
        root = self.get(Role.ROOT)
        assert root is not None  # every layout built here has one
        return root

    @property
    def bios_embed_area(self) -> tuple[int, int]:
        """(first sector, sector count) where GRUB's core.img goes for BIOS boot."""
        if self.table is TableKind.GPT:
            bios = self.get(Role.BIOS_BOOT)
            if bios is None:
                raise BootloaderError(
                    "this GPT layout has no BIOS boot partition for GRUB's core.img",
                    hint="make the layout with bios=True",
                )
            return bios.start_sector, bios.sectors
        first = min(p.start_sector for p in self.partitions)
        return 1, first - 1


def _round_up(value: int, unit: int) -> int:
    return -(-value // unit) * unit


def gpt_layout(
    root_bytes: int,
    *,
    bios: bool = True,
    esp: bool = True,
    esp_bytes: int = ESP_BYTES,
    root_type: str = GPT_LINUX,
) -> BootLayout:
    """BIOS boot (1 MiB) and ESP before the root filesystem, as Debian's cloud images.

    ``root_bytes`` is rounded up to a MiB. ``root_type`` may be a discoverable-partitions
    root type (GPT_ROOT_X86_64, GPT_ROOT_ARM64) instead of generic Linux data.
    """
    if not (bios or esp):
        raise BootloaderError("a bootable GPT layout needs a BIOS boot partition or an ESP")
    if esp and esp_bytes < 32 * MiB:
        raise BootloaderError(
            f"an ESP of {esp_bytes} bytes is too small for FAT32",
            hint="give the ESP at least 33 MiB (Debian uses 124 MiB)",
        )
    offset = FIRST_PARTITION
    parts = []
    if bios:
        parts.append(Partition(Role.BIOS_BOOT, 14, offset, BIOS_BOOT_BYTES, GPT_BIOS_BOOT, "bios"))
        offset += BIOS_BOOT_BYTES
    if esp:
        esp_size = _round_up(esp_bytes, MiB)
        parts.append(Partition(Role.ESP, 15, offset, esp_size, GPT_ESP, "esp"))
        offset += esp_size
    root_size = _round_up(root_bytes, MiB)
    parts.append(Partition(Role.ROOT, 1, offset, root_size, root_type, "root"))
    return BootLayout(TableKind.GPT, offset + root_size + GPT_BACKUP_BYTES, tuple(parts))


def mbr_layout(root_bytes: int) -> BootLayout:
    """BIOS only: the root partition at 1 MiB, marked active; core.img in sectors 1..2047."""
    root_size = _round_up(root_bytes, MiB)
    root = Partition(Role.ROOT, 1, FIRST_PARTITION, root_size, MBR_LINUX, "root", bootable=True)
    return BootLayout(TableKind.MBR, FIRST_PARTITION + root_size, (root,))
