"""systemd-boot's ESP files in the Boot Loader Specification layout, in a real FAT image."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from bootdiskkit import EPOCH, ROOT_UUID

from oci2disk import run
from oci2disk.bootloader import BootloaderError, Kernel, esp, fat_volume_id, systemd_boot
from oci2disk.bootloader.common import MiB

LOADER = Path("/usr/lib/systemd/boot/efi") / systemd_boot.loader_file_name("amd64")
KERNEL = Kernel("6.1.0-10-amd64", "vmlinuz-6.1.0-10-amd64", "initrd.img-6.1.0-10-amd64")
BOOT = {KERNEL.vmlinuz: b"kernel bytes", "initrd.img-6.1.0-10-amd64": b"initrd bytes"}


def test_entry_loader_and_kernel_land_where_systemd_boot_looks(tmp_path: Path) -> None:
    files = systemd_boot.esp_files(
        LOADER.read_bytes(), KERNEL, BOOT, root_uuid=ROOT_UUID, cmdline="quiet"
    )
    image = tmp_path / "esp.fat"
    esp.make_esp_image(image, 40 * MiB, files, volume_id=fat_volume_id("x"), epoch=EPOCH)
    entry = tmp_path / "entry.conf"
    run.run(
        ["mcopy", "-i", os.fspath(image), "::/loader/entries/debian-6.1.0-10-amd64.conf",
         os.fspath(entry)],
    )  # fmt: skip
    assert entry.read_text() == (
        "title      Debian GNU/Linux\n"
        "version    6.1.0-10-amd64\n"
        "linux      /debian/6.1.0-10-amd64/linux\n"
        "initrd     /debian/6.1.0-10-amd64/initrd.img-6.1.0-10-amd64\n"
        f"options    root=UUID={ROOT_UUID} ro console=tty0 console=ttyS0,115200 quiet\n"
    )
    loader = tmp_path / "BOOTX64.EFI"
    run.run(["mcopy", "-i", os.fspath(image), "::/EFI/BOOT/BOOTX64.EFI", os.fspath(loader)])
    assert loader.read_bytes() == LOADER.read_bytes()
    assert files["loader/loader.conf"].startswith(b"default debian-6.1.0-10-amd64.conf\n")
    assert files["debian/6.1.0-10-amd64/linux"] == b"kernel bytes"


def test_missing_kernel_bytes_or_a_bad_loader_are_named() -> None:
    with pytest.raises(BootloaderError, match=r"vmlinuz-6\.1\.0-10-amd64 was not given"):
        systemd_boot.esp_files(LOADER.read_bytes(), KERNEL, {}, root_uuid=ROOT_UUID)
    with pytest.raises(BootloaderError, match="not an EFI executable") as info:
        systemd_boot.esp_files(b"#!/bin/sh", KERNEL, BOOT, root_uuid=ROOT_UUID)
    assert info.value.hint is not None and "systemd-boot-efi" in info.value.hint
    assert systemd_boot.loader_file_name("arm64") == "systemd-bootaa64.efi"
