"""Bootloaders written into a disk file as bytes: GRUB for BIOS and UEFI, no device.

Integration, in order (the disk writer owns the partition table and the filesystem):

1. ``layout = gpt_layout(fs_bytes)`` (BIOS + UEFI) or ``mbr_layout(fs_bytes)`` (BIOS
   only). ``layout.disk_bytes`` is the file size; write ``layout.partitions`` into
   the table (number, start, size, type, name, bootable) and the root filesystem at
   ``layout.root.start`` with its UUID.
2. Before mke2fs: add ``boot/grub/grub.cfg`` to the rootfs stream, the text of
   ``grub_cfg(root_uuid, kernels_in_boot(names in /boot), cmdline=user's extra,
   arch=..., partmap="gpt"|"msdos")``.
3. After the table is in the file: ``install(disk, layout, root_uuid=...,
   bios_modules=Path("/usr/lib/grub/i386-pc") or None, efi_target=..., efi_modules=...
   or None, seed=image digest, epoch=SOURCE_DATE_EPOCH, workdir=temp dir)``.
   It runs the steps below, which can also be called one by one:

   - BIOS: ``grub_pc.install(disk, grub_pc.build_core_image(mods, uuid),
     grub_pc.boot_image(mods), first_sector=..., max_sectors=...)`` with
     ``layout.bios_embed_area``.
   - UEFI: ``grub_efi.make_esp_image(tmp, esp.size, grub_efi.esp_files(target,
     grub_efi.build_efi_image(mods, target, uuid)), volume_id=fat_volume_id(seed),
     epoch=epoch, hidden_sectors=esp.start_sector)``, then
     ``grub_efi.copy_into_disk(tmp, disk, esp.start, esp.size)``.

Every function takes paths, bytes and numbers; none reads the recipe or prints.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from oci2disk.bootloader import grub_efi, grub_pc
from oci2disk.bootloader.common import (
    BootloaderError,
    GrubTarget,
    fat_volume_id,
    fat_volume_uuid,
)
from oci2disk.bootloader.grubcfg import (
    Kernel,
    early_config,
    grub_cfg,
    kernel_cmdline,
    kernels_in_boot,
)
from oci2disk.bootloader.layout import (
    BootLayout,
    Partition,
    Role,
    TableKind,
    gpt_layout,
    mbr_layout,
)

__all__ = [
    "BootLayout",
    "BootloaderError",
    "GrubTarget",
    "Installed",
    "Kernel",
    "Partition",
    "Role",
    "TableKind",
    "early_config",
    "fat_volume_id",
    "fat_volume_uuid",
    "gpt_layout",
    "grub_cfg",
    "install",
    "kernel_cmdline",
    "kernels_in_boot",
    "mbr_layout",
]


@dataclass(frozen=True)
class Installed:
    """What ``install`` wrote, for the build manifest."""

    bios: bool
    efi_loader: str | None  # the ESP path of the EFI loader
    esp_uuid: str | None  # the ESP's FAT serial as /etc/fstab names it (UUID=XXXX-XXXX)


def install(
    disk: Path,
    layout: BootLayout,
    *,
    root_uuid: str,
    bios_modules: Path | None,
    efi_target: GrubTarget | None,
    efi_modules: Path | None,
    seed: str,
    epoch: int,
    workdir: Path,
) -> Installed:
    """Install GRUB for BIOS (when ``bios_modules`` is given) and UEFI (when
    ``efi_target`` and ``efi_modules`` are) into ``disk``, whose table is written."""
    if bios_modules is None and efi_target is None:
        raise BootloaderError("nothing to install: neither BIOS nor UEFI was asked for")
    bios = False
    if bios_modules is not None:
        first, count = layout.bios_embed_area
        grub_pc.install(
            disk,
            grub_pc.build_core_image(bios_modules, root_uuid),
            grub_pc.boot_image(bios_modules),
            first_sector=first,
            max_sectors=count,
        )
        bios = True
    loader = esp_uuid = None
    if efi_target is not None:
        esp = layout.get(Role.ESP)
        if esp is None or efi_modules is None:
            raise BootloaderError(
                "UEFI boot needs an EFI system partition and GRUB EFI modules",
                hint="use gpt_layout(..., esp=True) and pass the module folder "
                f"({efi_target.debian_package})",
            )
        efi_image = grub_efi.build_efi_image(efi_modules, efi_target, root_uuid)
        volume_id = fat_volume_id(seed)
        image = workdir / "esp.fat"
        try:
            grub_efi.make_esp_image(
                image,
                esp.size,
                grub_efi.esp_files(efi_target, efi_image),
                volume_id=volume_id,
                epoch=epoch,
                hidden_sectors=esp.start_sector,
            )
            grub_efi.copy_into_disk(image, disk, esp.start, esp.size)
        finally:
            if image.exists():
                os.unlink(image)
        loader = "/" + efi_target.removable_path
        esp_uuid = fat_volume_uuid(volume_id)
    return Installed(bios, loader, esp_uuid)
