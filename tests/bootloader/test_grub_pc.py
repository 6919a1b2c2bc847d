"""GRUB i386-pc written as bytes: the fields grub-bios-setup patches, read back."""

from __future__ import annotations

import os
import re
import shutil
import struct
from pathlib import Path

import pytest
from bootdiskkit import ROOT_UUID, write_table

from oci2disk import run
from oci2disk.bootloader import BootloaderError, gpt_layout, grub_pc, mbr_layout
from oci2disk.bootloader.common import SECTOR, MiB

MODULES = Path("/usr/lib/grub/i386-pc")


@pytest.fixture(scope="module")
def core() -> bytes:
    return grub_pc.build_core_image(MODULES, ROOT_UUID)


def table_dump(disk: Path) -> str:
    return run.run(["sfdisk", "--dump", os.fspath(disk)]).stdout.decode()


def test_core_image_is_reproducible_and_holds_the_early_config(core: bytes) -> None:
    again = grub_pc.build_core_image(MODULES, ROOT_UUID)
    assert again == core
    other = grub_pc.build_core_image(MODULES, "11111111-2222-4333-8444-555555555555")
    assert other != core  # the UUID is in the (compressed) early config
    assert len(core) < 400 * 1024  # fits the 1 MiB BIOS boot partition with room
    # diskboot.img as grub-mkimage leaves it: one placeholder entry, segment 0x820
    assert core[:SECTOR] != bytes(SECTOR)
    assert struct.unpack_from("<H", core, SECTOR - 2)[0] == grub_pc.FIRST_LOAD_SEGMENT


def test_blocklist_names_the_sectors_after_the_first(core: bytes) -> None:
    patched = grub_pc.patch_core_blocklist(core, 2048)
    sectors = len(patched) // SECTOR
    assert len(patched) % SECTOR == 0 and sectors == -(-len(core) // SECTOR)
    assert grub_pc.read_blocklist(patched[:SECTOR]) == [(2049, sectors - 1, 0x820)]
    terminator = grub_pc.FIRST_BLOCKLIST - grub_pc.BLOCKLIST.size
    assert patched[terminator : grub_pc.FIRST_BLOCKLIST] == bytes(12)
    # nothing but the blocklist changed, and the padding is zeros
    assert patched[:terminator] == core[:terminator]
    assert patched[SECTOR : len(core)] == core[SECTOR:]
    assert patched[len(core) :] == bytes(len(patched) - len(core))
    # patching again for another place replaces the entry, it does not add one
    moved = grub_pc.patch_core_blocklist(patched, 1)
    assert grub_pc.read_blocklist(moved[:SECTOR]) == [(2, sectors - 1, 0x820)]


def test_boot_sector_keeps_the_table_and_bpb_and_points_at_core() -> None:
    boot_img = grub_pc.boot_image(MODULES)
    sector0 = bytearray(os.urandom(SECTOR))
    sector0[510:] = b"\x55\xaa"
    patched = grub_pc.patch_boot_sector(boot_img, bytes(sector0), 2048)
    assert len(patched) == SECTOR
    assert patched[:3] == boot_img[:3]  # the jump over the BPB
    assert patched[0x03:0x5A] == sector0[0x03:0x5A]  # BPB kept
    assert struct.unpack_from("<Q", patched, 0x5C)[0] == 2048  # kernel sector
    assert patched[0x64] == 0xFF  # boot drive: the one the BIOS passes in DL
    assert boot_img[0x66] == 0xEB and patched[0x66:0x68] == b"\x90\x90"  # drive check off
    assert patched[0x68:0x1B8] == boot_img[0x68:0x1B8]  # the code itself
    assert patched[0x1B8:0x1FE] == sector0[0x1B8:0x1FE]  # disk signature + table
    assert patched[0x1FE:] == b"\x55\xaa"


@pytest.mark.parametrize("table", ["mbr", "gpt"])
def test_install_writes_core_where_the_layout_says_and_keeps_the_table(
    tmp_path: Path, core: bytes, table: str
) -> None:
    layout = mbr_layout(8 * MiB) if table == "mbr" else gpt_layout(8 * MiB, esp=False)
    disk = tmp_path / "disk.raw"
    write_table(disk, layout)
    before = table_dump(disk)
    first, count = layout.bios_embed_area
    assert (first, count) == ((1, 2047) if table == "mbr" else (2048, 2048))
    grub_pc.install(disk, core, grub_pc.boot_image(MODULES), first_sector=first, max_sectors=count)
    assert table_dump(disk) == before  # sfdisk still reads the same table
    run.run(["sfdisk", "--verify", os.fspath(disk)])
    data = disk.read_bytes()
    assert struct.unpack_from("<Q", data, 0x5C)[0] == first
    on_disk = data[first * SECTOR : first * SECTOR + len(core)]
    assert on_disk[SECTOR:] == core[SECTOR:]
    sectors = -(-len(core) // SECTOR)
    assert grub_pc.read_blocklist(on_disk[:SECTOR]) == [(first + 1, sectors - 1, 0x820)]
    # installing again over our own core.img is allowed (same bytes)
    grub_pc.install(disk, core, grub_pc.boot_image(MODULES), first_sector=first, max_sectors=count)
    assert disk.read_bytes() == data


def test_install_refuses_to_overwrite_data_or_to_overflow(tmp_path: Path, core: bytes) -> None:
    layout = mbr_layout(8 * MiB)
    disk = tmp_path / "disk.raw"
    write_table(disk, layout)
    with disk.open("r+b") as f:
        f.seek(100 * SECTOR)
        f.write(b"someone else's data")
    boot_img = grub_pc.boot_image(MODULES)
    with pytest.raises(BootloaderError, match="not empty"):
        grub_pc.install(disk, core, boot_img, first_sector=1, max_sectors=2047)
    with pytest.raises(BootloaderError, match="embedding area has 10") as info:
        grub_pc.install(disk, core, boot_img, first_sector=1, max_sectors=10)
    assert info.value.hint is not None and "1 MiB" in info.value.hint


def test_a_folder_without_grub_modules_names_the_package(tmp_path: Path) -> None:
    with pytest.raises(BootloaderError, match="not a GRUB i386-pc module folder") as info:
        grub_pc.build_core_image(tmp_path, ROOT_UUID)
    assert info.value.hint is not None and "grub-pc-bin" in info.value.hint


def test_modules_of_another_platform_or_grub_release_are_refused(tmp_path: Path) -> None:
    efi = Path("/usr/lib/grub/x86_64-efi")
    with pytest.raises(BootloaderError, match="modules for x86_64-efi, not i386-pc"):
        grub_pc.build_core_image(efi, ROOT_UUID)
    other = tmp_path / "i386-pc"
    shutil.copytree(MODULES, other)
    info = other / "modinfo.sh"
    info.write_text(re.sub(r'grub_version="[^"]*"', 'grub_version="2.99"', info.read_text()))
    with pytest.raises(BootloaderError, match=r"are GRUB 2\.99 but the host's") as caught:
        grub_pc.build_core_image(other, ROOT_UUID)
    assert caught.value.hint is not None and "/usr/lib/grub/i386-pc" in caught.value.hint
