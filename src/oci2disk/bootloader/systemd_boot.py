"""systemd-boot on the ESP, in the Boot Loader Specification layout, for UEFI only.

systemd-boot reads nothing but the ESP: the kernel and initrd are copied onto it, as
``kernel-install`` (bootctl's companion) lays them out with the entry token "debian":

    /EFI/BOOT/BOOTX64.EFI              the loader (removable-media path)
    /EFI/systemd/systemd-bootx64.efi   the same loader where bootctl installs it
    /loader/loader.conf                default entry, timeout
    /loader/entries/debian-VERSION.conf
    /debian/VERSION/linux, /debian/VERSION/initrd.img-VERSION

The trade-off against GRUB: the ESP must hold a kernel and initrd (about 40 MB for a
Debian kernel with MODULES=most), and a kernel the guest installs later reaches the ESP
only if the image has systemd-boot's kernel-install hooks (Debian package systemd-boot).

The files go into the ESP with ``esp.make_esp_image``. The loader binary comes from
Debian systemd-boot-efi (/usr/lib/systemd/boot/efi/systemd-bootx64.efi on the host, or
the image's own, e.g. systemd-bootaa64.efi for arm64).

Host tools: none besides those of esp.py.
"""

from __future__ import annotations

from collections.abc import Mapping

from oci2disk.bootloader.common import BootloaderError
from oci2disk.bootloader.grubcfg import Kernel, kernel_cmdline

ENTRY_TOKEN = "debian"
_LOADER_NAMES = {
    "x86_64": ("BOOTX64.EFI", "systemd-bootx64.efi"),
    "amd64": ("BOOTX64.EFI", "systemd-bootx64.efi"),
    "aarch64": ("BOOTAA64.EFI", "systemd-bootaa64.efi"),
    "arm64": ("BOOTAA64.EFI", "systemd-bootaa64.efi"),
}


def loader_file_name(arch: str) -> str:
    """The loader's file name in Debian's systemd-boot-efi for this architecture."""
    return _names(arch)[1]


def _names(arch: str) -> tuple[str, str]:
    try:
        return _LOADER_NAMES[arch]
    except KeyError:
        raise BootloaderError(
            f"no systemd-boot for architecture {arch!r}", hint="use amd64 or arm64"
        ) from None


def esp_files(
    loader: bytes,
    kernel: Kernel,
    boot_files: Mapping[str, bytes],
    *,
    root_uuid: str,
    cmdline: str = "",
    arch: str = "x86_64",
    title: str = "Debian GNU/Linux",
    timeout: int = 1,
) -> dict[str, bytes]:
    """The ESP's files for systemd-boot booting ``kernel``.

    ``boot_files`` maps the kernel's /boot base names (``kernel.vmlinuz`` and
    ``kernel.initrd``) to their bytes. The command line is the same as GRUB's
    (``grubcfg.kernel_cmdline``).
    """
    if loader[:2] != b"MZ":
        raise BootloaderError(
            "the systemd-boot loader given is not an EFI executable",
            hint=f"use {loader_file_name(arch)} from Debian systemd-boot-efi",
        )
    removable, installed = _names(arch)
    version = kernel.version
    directory = f"{ENTRY_TOKEN}/{version}"
    try:
        files = {f"{directory}/linux": boot_files[kernel.vmlinuz]}
        if kernel.initrd is not None:
            files[f"{directory}/{kernel.initrd}"] = boot_files[kernel.initrd]
    except KeyError as exc:
        raise BootloaderError(
            f"/boot/{exc.args[0]} was not given to systemd_boot.esp_files"
        ) from None
    entry = [
        f"title      {title}",
        f"version    {version}",
        f"linux      /{directory}/linux",
    ]
    if kernel.initrd is not None:
        entry.append(f"initrd     /{directory}/{kernel.initrd}")
    entry.append(f"options    {kernel_cmdline(root_uuid, cmdline, arch=arch)}")
    files.update(
        {
            f"EFI/BOOT/{removable}": loader,
            f"EFI/systemd/{installed}": loader,
            "loader/loader.conf": (
                f"default {ENTRY_TOKEN}-{version}.conf\ntimeout {timeout}\neditor no\n"
            ).encode(),
            f"loader/entries/{ENTRY_TOKEN}-{version}.conf": ("\n".join(entry) + "\n").encode(),
        }
    )
    return files
