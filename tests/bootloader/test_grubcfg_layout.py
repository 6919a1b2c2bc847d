"""grub.cfg text in update-grub's form, and the bootable partition layouts."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from bootdiskkit import ROOT_UUID

from oci2disk import run
from oci2disk.bootloader import (
    BootloaderError,
    GrubTarget,
    Role,
    TableKind,
    early_config,
    gpt_layout,
    grub_cfg,
    install,
    kernel_cmdline,
    kernels_in_boot,
    mbr_layout,
)
from oci2disk.bootloader.common import MiB
from oci2disk.bootloader.layout import GPT_BIOS_BOOT, GPT_ESP

BOOT = [
    "vmlinuz-6.1.0-9-amd64",
    "initrd.img-6.1.0-9-amd64",
    "vmlinuz-6.1.0-10-amd64",
    "initrd.img-6.1.0-10-amd64",
    "config-6.1.0-10-amd64",
    "System.map-6.1.0-10-amd64",
    "vmlinuz-6.1.0-11-amd64",  # no initrd
]


def test_kernels_are_found_newest_first_with_their_initrds() -> None:
    kernels = kernels_in_boot(BOOT)
    assert [k.version for k in kernels] == ["6.1.0-11-amd64", "6.1.0-10-amd64", "6.1.0-9-amd64"]
    assert kernels[0].initrd is None
    assert kernels[1].initrd == "initrd.img-6.1.0-10-amd64"
    assert kernels_in_boot(["grub", "config-1"]) == []


def test_grub_cfg_boots_the_newest_kernel_with_debian_defaults_and_extra_args(
    tmp_path: Path,
) -> None:
    kernels = kernels_in_boot(BOOT[:6])
    text = grub_cfg(ROOT_UUID, kernels, cmdline="  quiet   loglevel=3 ", partmap="msdos")
    assert text == grub_cfg(ROOT_UUID, kernels, cmdline="quiet loglevel=3", partmap="msdos")
    args = f"root=UUID={ROOT_UUID} ro console=tty0 console=ttyS0,115200 quiet loglevel=3"
    first_entry = text[text.index("menuentry 'Debian GNU/Linux'") :]
    first_entry = first_entry[: first_entry.index("}\n")]
    assert f"\tlinux\t/boot/vmlinuz-6.1.0-10-amd64 {args}\n" in first_entry
    assert "\tinitrd\t/boot/initrd.img-6.1.0-10-amd64\n" in first_entry
    assert f"search --no-floppy --fs-uuid --set=root {ROOT_UUID}" in first_entry
    assert "insmod part_msdos" in first_entry and "insmod ext2" in first_entry
    assert f"'gnulinux-simple-{ROOT_UUID}'" in text
    assert f"'gnulinux-6.1.0-9-amd64-recovery-{ROOT_UUID}'" in text
    assert "(recovery mode)" in text and " ro single console=" in text
    assert "terminal_output console serial" in text
    cfg = tmp_path / "grub.cfg"
    cfg.write_text(text)
    run.run(["grub-script-check", os.fspath(cfg)])  # GRUB's own parser accepts it


def test_arm64_uses_the_pl011_console_and_errors_name_the_fix() -> None:
    assert kernel_cmdline(ROOT_UUID, arch="arm64").endswith("console=tty0 console=ttyAMA0")
    text = grub_cfg(ROOT_UUID, kernels_in_boot(BOOT), arch="arm64")
    assert "ttyAMA0" in text and "ttyS0" not in text
    # GRUB arm64-efi has no com0: a serial line would print errors before the menu
    assert "serial" not in text
    with pytest.raises(BootloaderError, match="no kernel") as info:
        grub_cfg(ROOT_UUID, [])
    assert info.value.hint is not None and "linux-image" in info.value.hint
    with pytest.raises(BootloaderError, match="not a filesystem UUID"):
        early_config("root")


def test_early_config_finds_the_root_by_uuid_and_reads_boot_grub() -> None:
    assert early_config(ROOT_UUID.upper()) == (
        f"search --no-floppy --fs-uuid --set=root {ROOT_UUID}\nset prefix=($root)/boot/grub\n"
    )


def test_gpt_layout_is_aligned_ordered_and_typed() -> None:
    layout = gpt_layout(1000 * MiB + 1)
    assert layout.table is TableKind.GPT
    bios, esp, root = layout.partitions
    assert (bios.role, bios.number, bios.type, bios.start, bios.size) == (
        Role.BIOS_BOOT, 14, GPT_BIOS_BOOT, 1 * MiB, 1 * MiB,
    )  # fmt: skip
    assert (esp.role, esp.number, esp.type, esp.start, esp.size) == (
        Role.ESP, 15, GPT_ESP, 2 * MiB, 124 * MiB,
    )  # fmt: skip
    assert (root.number, root.start, root.size) == (1, 126 * MiB, 1001 * MiB)
    assert layout.disk_bytes == root.end + 1 * MiB  # room for the backup GPT
    assert all(p.start % MiB == 0 and p.size % MiB == 0 for p in layout.partitions)
    assert layout.bios_embed_area == (2048, 2048)
    uefi_only = gpt_layout(100 * MiB, bios=False)
    assert [p.role for p in uefi_only.partitions] == [Role.ESP, Role.ROOT]
    with pytest.raises(BootloaderError, match="no BIOS boot partition"):
        _ = uefi_only.bios_embed_area


def test_mbr_layout_leaves_the_gap_for_core_img() -> None:
    layout = mbr_layout(64 * MiB)
    (root,) = layout.partitions
    assert (root.start, root.size, root.type, root.bootable) == (MiB, 64 * MiB, "83", True)
    assert layout.bios_embed_area == (1, 2047)
    assert layout.get(Role.ESP) is None
    assert layout.disk_bytes == 65 * MiB


def test_uefi_on_a_disk_without_an_esp_is_refused(tmp_path: Path) -> None:
    disk = tmp_path / "disk.raw"
    disk.write_bytes(bytes(MiB))
    with pytest.raises(BootloaderError, match="needs an EFI system partition") as info:
        install(
            disk,
            mbr_layout(64 * MiB),
            root_uuid=ROOT_UUID,
            bios_modules=None,
            efi_target=GrubTarget.X86_64_EFI,
            efi_modules=Path("/usr/lib/grub/x86_64-efi"),
            seed="s",
            epoch=0,
            workdir=tmp_path,
        )
    assert info.value.hint is not None and "gpt_layout" in info.value.hint
    assert disk.read_bytes() == bytes(MiB)  # nothing written
