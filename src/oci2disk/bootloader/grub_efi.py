"""GRUB for UEFI: one EFI executable at the ESP's removable-media path.

``build_efi_image`` runs ``grub-mkimage -O x86_64-efi`` (or arm64-efi, from that
target's module folder: the host's grub-mkimage builds for any target) with the same
early config as the BIOS core.img: find the root by UUID, ``prefix=($root)/boot/grub``,
then GRUB's normal mode reads /boot/grub/grub.cfg, Debian's layout.

``esp_files`` puts it at /EFI/BOOT/BOOTX64.EFI (BOOTAA64.EFI on arm64), which firmware
boots without a boot entry in NVRAM; ``esp.make_esp_image`` makes the ESP from them.

Host tools: grub-mkimage (Debian grub-common) with modules from grub-efi-amd64-bin
(/usr/lib/grub/x86_64-efi) or an image's grub-efi-arm64-bin.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from oci2disk.bootloader.common import BootloaderError, GrubTarget, mkimage
from oci2disk.bootloader.grubcfg import early_config, image_modules


def build_efi_image(
    modules_dir: Path,
    target: GrubTarget,
    root_uuid: str,
    *,
    extra_modules: Sequence[str] = (),
) -> bytes:
    """A standalone GRUB EFI executable that boots ($root)/boot/grub/grub.cfg by UUID."""
    if not target.is_efi:
        raise BootloaderError(f"GRUB {target.value} is not an EFI target")
    return mkimage(
        modules_dir,
        target,
        early_config(root_uuid),
        [*image_modules(target), *extra_modules],
        f"the GRUB {target.value} image",
    )


def esp_files(target: GrubTarget, efi_image: bytes) -> dict[str, bytes]:
    """The files of the ESP: the GRUB image at the removable-media path."""
    return {target.removable_path: efi_image}
