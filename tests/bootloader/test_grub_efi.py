"""The EFI system partition as a FAT image in a file: contents, reproducibility, copy."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
from bootdiskkit import EPOCH, ROOT_UUID

from oci2disk import run
from oci2disk.bootloader import (
    BootloaderError,
    GrubTarget,
    esp,
    fat_volume_id,
    fat_volume_uuid,
    grub_efi,
    write_modules_dir,
)
from oci2disk.bootloader.common import MiB

MODULES = Path("/usr/lib/grub/x86_64-efi")
TARGET = GrubTarget.X86_64_EFI


@pytest.fixture(scope="module")
def efi_image() -> bytes:
    return grub_efi.build_efi_image(MODULES, TARGET, ROOT_UUID)


def make_esp(path: Path, efi_image: bytes, seed: str = "sha256:1234") -> None:
    esp.make_esp_image(
        path,
        64 * MiB,
        grub_efi.esp_files(TARGET, efi_image),
        volume_id=fat_volume_id(seed),
        epoch=EPOCH,
        hidden_sectors=4096,
    )


def test_grub_efi_is_a_reproducible_pe_image(efi_image: bytes) -> None:
    assert efi_image[:2] == b"MZ"
    assert grub_efi.build_efi_image(MODULES, TARGET, ROOT_UUID) == efi_image
    assert ROOT_UUID.encode() in efi_image  # the early config is stored uncompressed


def test_esp_holds_the_loader_at_the_removable_path(tmp_path: Path, efi_image: bytes) -> None:
    image = tmp_path / "esp.fat"
    make_esp(image, efi_image)
    assert image.stat().st_size == 64 * MiB
    back = tmp_path / "back.efi"
    run.run(["mcopy", "-i", os.fspath(image), "::/EFI/BOOT/BOOTX64.EFI", os.fspath(back)])
    assert back.read_bytes() == efi_image
    listing = run.run(["mdir", "-i", os.fspath(image), "::/EFI/BOOT"]).stdout.decode()
    assert "2023-11-14" in listing  # SOURCE_DATE_EPOCH 1700000000, not today
    blkid = run.run(["blkid", "-p", "-o", "export", os.fspath(image)]).stdout.decode()
    assert "TYPE=vfat" in blkid
    assert f"UUID={fat_volume_uuid(fat_volume_id('sha256:1234'))}" in blkid
    assert "LABEL=EFI" in blkid
    run.run(["fsck.fat", "-n", os.fspath(image)])


def test_esp_bytes_depend_only_on_the_inputs(tmp_path: Path, efi_image: bytes) -> None:
    first, second = tmp_path / "a.fat", tmp_path / "b.fat"
    make_esp(first, efi_image)
    time.sleep(2.1)  # FAT stores times in 2 s steps: a host clock leak would show
    make_esp(second, efi_image)
    assert first.read_bytes() == second.read_bytes()
    other = tmp_path / "c.fat"
    make_esp(other, efi_image, seed="sha256:5678")
    assert other.read_bytes() != first.read_bytes()


def test_copy_into_disk_fills_only_the_range_and_stays_sparse(
    tmp_path: Path, efi_image: bytes
) -> None:
    image = tmp_path / "esp.fat"
    make_esp(image, efi_image)
    disk = tmp_path / "disk.raw"
    with disk.open("wb") as f:
        f.truncate(200 * MiB)
        f.seek(2 * MiB - 1)
        f.write(b"\x01")  # a byte just before the partition must survive
    esp.copy_into_disk(image, disk, 2 * MiB, 64 * MiB)
    with disk.open("rb") as f:
        f.seek(2 * MiB - 1)
        assert f.read(1) == b"\x01"
        assert f.read(64 * MiB) == image.read_bytes()
        assert f.read(MiB) == bytes(MiB)
    allocated = disk.stat().st_blocks * 512
    assert allocated < 16 * MiB  # the zero clusters were not written
    with pytest.raises(BootloaderError, match="its partition has"):
        esp.copy_into_disk(image, disk, 2 * MiB, 32 * MiB)


def test_volume_id_comes_from_the_seed() -> None:
    assert fat_volume_id("sha256:aa") == fat_volume_id("sha256:aa")
    assert fat_volume_id("sha256:aa") != fat_volume_id("sha256:ab")
    assert fat_volume_uuid(0x1234ABCD) == "1234-ABCD"


def test_bios_is_not_an_efi_target() -> None:
    with pytest.raises(BootloaderError, match="not an EFI target"):
        grub_efi.build_efi_image(MODULES, GrubTarget.I386_PC, ROOT_UUID)
    assert GrubTarget.efi_for_arch("arm64").removable_path == "EFI/BOOT/BOOTAA64.EFI"
    with pytest.raises(BootloaderError, match="riscv64"):
        GrubTarget.efi_for_arch("riscv64")


def test_the_images_own_module_folder_is_written_out_flat(tmp_path: Path) -> None:
    files = [
        ("./usr/lib/grub/arm64-efi/normal.mod", b"normal"),
        ("usr/lib/grub/arm64-efi/moddep.lst", b"normal: \n"),
        ("usr/lib/grub/arm64-efi/sub/evil.mod", b"not flat"),
        ("usr/lib/grub/x86_64-efi/normal.mod", b"other target"),
        ("etc/hostname", b"box\n"),
    ]
    dest = write_modules_dir(files, GrubTarget.ARM64_EFI, tmp_path / "mods")
    assert dest == tmp_path / "mods"
    assert sorted(p.name for p in dest.iterdir()) == ["moddep.lst", "normal.mod"]
    assert (dest / "normal.mod").read_bytes() == b"normal"
    assert write_modules_dir(files[3:], GrubTarget.ARM64_EFI, tmp_path / "none") is None
