"""The whole recipe: a GPT disk file with BIOS boot partition, ESP and root, booted by
SeaBIOS and by OVMF with no -kernel, and byte-identical when made twice."""

from __future__ import annotations

import hashlib
import io
import os
import tarfile
import time
from pathlib import Path

import pytest
from bootdiskkit import EPOCH, ROOT_UUID, boot_disk, make_bootable_disk

from clikit import oci2disk
from oci2disk.bootloader import Role, gpt_layout, mbr_layout
from oci2disk.bootloader.common import MiB

SEED = "sha256:0123456789abcdef"
EXTRA = "oci2disk.bootloader-test=1"


def tiny_rootfs(path: Path) -> Path:
    """A rootfs tar with a /boot that looks like Debian's (not bootable: bytes only)."""
    with tarfile.open(path, "w", format=tarfile.GNU_FORMAT) as tar:
        for name, data in (
            ("boot", None),
            ("etc", None),
            ("boot/vmlinuz-6.1.0-10-amd64", b"kernel" * 1000),
            ("boot/initrd.img-6.1.0-10-amd64", b"initrd" * 1000),
        ):
            info = tarfile.TarInfo(name)
            info.mtime = EPOCH
            if data is None:
                info.type, info.mode = tarfile.DIRTYPE, 0o755
                tar.addfile(info)
            else:
                info.size, info.mode = len(data), 0o644
                tar.addfile(info, io.BytesIO(data))
    return path


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


@pytest.mark.parametrize("table", ["gpt", "mbr"])
def test_the_same_inputs_make_the_same_disk(tmp_path: Path, table: str) -> None:
    rootfs = tiny_rootfs(tmp_path / "rootfs.tar")
    layout = gpt_layout(64 * MiB) if table == "gpt" else mbr_layout(64 * MiB)
    first, installed = make_bootable_disk(rootfs, tmp_path / "a", layout, cmdline=EXTRA, seed=SEED)
    time.sleep(2.1)  # a host time stamp anywhere would now differ (FAT: 2 s steps)
    second, _ = make_bootable_disk(rootfs, tmp_path / "b", layout, cmdline=EXTRA, seed=SEED)
    assert sha256(first) == sha256(second)
    assert installed.bios
    if table == "gpt":
        assert installed.efi_loader == "/EFI/BOOT/BOOTX64.EFI"
        other, _ = make_bootable_disk(
            rootfs, tmp_path / "c", layout, cmdline=EXTRA, seed="sha256:other"
        )
        assert sha256(other) != sha256(first)  # the ESP serial follows the seed
    else:
        assert installed.efi_loader is None
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == ["disk.raw"]  # no leftovers


@pytest.fixture(scope="module")
def hybrid_disk(debian_qemu_build: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """recipes/debian-qemu's rootfs on a GPT disk with GRUB for BIOS and UEFI."""
    work = tmp_path_factory.mktemp("bootloader")
    rootfs = work / "rootfs.tar"
    result = oci2disk(
        "convert", "docker-daemon:oci2disk-recipe/debian-qemu:latest",
        "-f", "tar", "-o", os.fspath(rootfs),
    )  # fmt: skip
    assert result.code == 0, result.stderr
    layout = gpt_layout(2048 * MiB)
    disk, installed = make_bootable_disk(rootfs, work / "disk", layout, cmdline=EXTRA, seed=SEED)
    rootfs.unlink()
    assert installed.esp_uuid is not None and layout.get(Role.ESP) is not None
    return disk


def check_console(text: str) -> None:
    assert "GNU GRUB" in text  # the menu came from the GRUB on the disk
    assert "Booting `Debian GNU/Linux'" in text
    assert f"root=UUID={ROOT_UUID} ro console=tty0 console=ttyS0,115200 {EXTRA}" in text
    assert "oci2disk-boot-ok" in text  # the recipe's marker unit: multi-user reached
    assert "Mounted boot-efi.mount" in text  # the ESP mounted from the fstab entry
    assert "Kernel panic" not in text
    assert "Failed to mount" not in text


@pytest.mark.slow
@pytest.mark.docker
def test_seabios_boots_the_disk_through_grub_core_img(hybrid_disk: Path) -> None:
    console = boot_disk(
        hybrid_disk, "seabios", expect=b"oci2disk-boot-ok", timeout=300,
        log=hybrid_disk.with_name("seabios.log"),
    )  # fmt: skip
    assert console.matched, console.text[-3000:]
    check_console(console.text)
    assert "efi: EFI v" not in console.text  # a BIOS boot, not UEFI
    print(f"\nSeaBIOS -> GRUB i386-pc -> marker in {console.seconds:.1f} s (TCG)")


@pytest.mark.slow
@pytest.mark.docker
def test_ovmf_boots_the_disk_through_the_esp(hybrid_disk: Path) -> None:
    console = boot_disk(
        hybrid_disk, "ovmf", expect=b"oci2disk-boot-ok", timeout=300,
        log=hybrid_disk.with_name("ovmf.log"),
    )  # fmt: skip
    assert console.matched, console.text[-3000:]
    check_console(console.text)
    assert "efi: EFI v" in console.text  # the kernel was started by UEFI firmware
    print(f"\nOVMF -> BOOTX64.EFI -> marker in {console.seconds:.1f} s (TCG)")
