"""Bootloaders written into a disk file as bytes: GRUB for BIOS and UEFI, no device.

Integration, in order (the disk writer owns the partition table and the filesystem):

1. ``layout = gpt_layout(fs_bytes)`` (BIOS + UEFI; ``bios=False`` for UEFI only) or
   ``mbr_layout(fs_bytes)`` (BIOS only). ``layout.disk_bytes`` is the file size; write
   ``layout.partitions`` into the table (number, start, size, type, name, bootable)
   and the root filesystem at ``layout.root.start`` with its UUID.
2. Into the rootfs stream, before mke2fs: ``boot/grub/grub.cfg`` with the text of
   ``grub_cfg(root_uuid, kernels_in_boot(base names in /boot), cmdline=the user's
   extra, arch="amd64"|"arm64", partmap="gpt"|"msdos")``; with an ESP, the directory
   ``boot/efi`` and the fstab line ``UUID=<fat_volume_uuid(fat_volume_id(seed))>
   /boot/efi vfat umask=0077 0 1`` beside the root's (Debian's). The command line
   says ``ro`` as Debian's does: the root's fstab line (errors=remount-ro) makes
   systemd remount it read-write; without an fstab, put ``rw`` in ``cmdline``.
3. Once the table is in the file (before or after mke2fs, which does not touch these
   bytes): ``install(disk, layout, root_uuid=..., bios_modules=folder or None,
   efi_target=GrubTarget.efi_for_arch(arch) or None, efi_modules=folder or None,
   seed=image digest, epoch=SOURCE_DATE_EPOCH, workdir=a temp dir)``. It returns
   ``Installed`` for the manifest and runs these steps, which can be called one by one:

   - BIOS: ``grub_pc.install(disk, grub_pc.build_core_image(mods, uuid),
     grub_pc.boot_image(mods), first_sector=..., max_sectors=...)`` with
     ``layout.bios_embed_area``.
   - UEFI: ``esp.make_esp_image(tmp, part.size, grub_efi.esp_files(target,
     grub_efi.build_efi_image(mods, target, uuid)), volume_id=fat_volume_id(seed),
     epoch=epoch, hidden_sectors=part.start_sector)``, then
     ``esp.copy_into_disk(tmp, disk, part.start, part.size)`` (part: ``layout.get(Role.ESP)``).

Module folders: the host's (``GrubTarget.host_modules_dir``, from Debian grub-pc-bin and
grub-efi-amd64-bin), or the image's own, written to a temp dir by
``write_modules_dir(((path, bytes) of the rootfs's regular files), target, tmp)``: that is
the way for arm64 (there is no grub-efi-arm64-bin for an amd64 host). A folder of
another GRUB release than the host's grub-mkimage is refused; for x86, prefer the host's.

systemd-boot instead of GRUB (UEFI only): ``systemd_boot.esp_files(loader bytes,
kernels_in_boot(...)[0], {base name: bytes} of that kernel and initrd, root_uuid=...,
cmdline=..., arch=...)`` into ``esp.make_esp_image`` and ``esp.copy_into_disk`` as above.

Every function takes paths, bytes and numbers; none reads the recipe or prints.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from oci2disk.bootloader import esp, grub_efi, grub_pc, systemd_boot
from oci2disk.bootloader.common import (
    BootloaderError,
    GrubTarget,
    fat_volume_id,
    fat_volume_uuid,
    write_modules_dir,
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
    "esp",
    "fat_volume_id",
    "fat_volume_uuid",
    "gpt_layout",
    "grub_cfg",
    "grub_efi",
    "grub_pc",
    "install",
    "kernel_cmdline",
    "kernels_in_boot",
    "mbr_layout",
    "systemd_boot",
    "write_modules_dir",
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
        part = layout.get(Role.ESP)
        if part is None or efi_modules is None:
            raise BootloaderError(
                "UEFI boot needs an EFI system partition and GRUB EFI modules",
                hint="use gpt_layout(..., esp=True) and pass the module folder "
                f"({efi_target.debian_package})",
            )
        efi_image = grub_efi.build_efi_image(efi_modules, efi_target, root_uuid)
        volume_id = fat_volume_id(seed)
        image = workdir / "esp.fat"
        try:
            esp.make_esp_image(
                image,
                part.size,
                grub_efi.esp_files(efi_target, efi_image),
                volume_id=volume_id,
                epoch=epoch,
                hidden_sectors=part.start_sector,
            )
            esp.copy_into_disk(image, disk, part.start, part.size)
        finally:
            if image.exists():
                os.unlink(image)
        loader = "/" + efi_target.removable_path
        esp_uuid = fat_volume_uuid(volume_id)
    return Installed(bios, loader, esp_uuid)
