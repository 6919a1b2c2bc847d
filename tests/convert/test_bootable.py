"""Which bootloaders a disk gets (--firmware, [boot]) and the layouts and files they bring."""

from __future__ import annotations

from pathlib import Path

import pytest

from layerkit import directory, file, tar_bytes
from oci2disk import settings
from oci2disk.arch import Arch
from oci2disk.convert import bootable
from oci2disk.convert.disk import plan_layout
from oci2disk.convert.options import BootSpec, DiskSpec, Firmware, FstabMode, Table
from oci2disk.errors import ConvertError
from oci2disk.rootfs import RootfsStats
from oci2disk.rootfs.archives import TarTree

MiB = 1 << 20
KERNEL = "vmlinuz-6.1.0-28-amd64"


def tree(tmp_path: Path, *, kernel: bool = True, grub: bool = False) -> TarTree:
    members = [directory("etc"), directory("etc/default"), directory("boot")]
    if kernel:
        members += [
            file(f"boot/{KERNEL}", b"k" * 100),
            file("boot/initrd.img-6.1.0-28-amd64", b"i"),
        ]
    if grub:
        members += [directory("usr"), directory("usr/sbin"), file("usr/sbin/update-grub", b"#!")]
    path = tmp_path / "rootfs.tar"
    path.write_bytes(tar_bytes(members))
    return TarTree(path)


@pytest.mark.parametrize(
    ("raw", "parsed"),
    [
        (["bios", "uefi"], (Firmware.BIOS, Firmware.UEFI)),
        (["uefi", "bios"], (Firmware.BIOS, Firmware.UEFI)),
        ("uefi", (Firmware.UEFI,)),
        ("none", ()),
        (["none"], ()),
    ],
)
def test_firmware_values(raw: object, parsed: tuple[Firmware, ...]) -> None:
    assert settings.firmware(raw) == parsed


def test_an_unknown_firmware_is_refused() -> None:
    with pytest.raises(settings.Invalid, match="coreboot"):
        settings.firmware(["coreboot"])


@pytest.mark.parametrize(
    ("values", "words"),
    [
        ({"disk.table": Table.NONE, "boot.firmware": (Firmware.BIOS,)}, "bare filesystem"),
        ({"disk.table": Table.MBR, "boot.firmware": (Firmware.UEFI,)}, "GPT"),
        ({"disk.root_partition": 2, "boot.firmware": (Firmware.BIOS,)}, "partition 1"),
    ],
)
def test_layouts_without_room_for_the_bootloader_are_refused(
    values: dict[str, object], words: str
) -> None:
    with pytest.raises(settings.Problem, match=words):
        settings.boot_spec(values)


def test_the_default_follows_the_image(tmp_path: Path) -> None:
    with_kernel = tree(tmp_path)
    amd64 = bootable.plan(with_kernel, Arch.X86_64, DiskSpec(), BootSpec())
    assert amd64 is not None and amd64.firmware == (Firmware.BIOS, Firmware.UEFI)
    arm64 = bootable.plan(with_kernel, Arch.AARCH64, DiskSpec(), BootSpec())
    assert arm64 is not None and arm64.firmware == (Firmware.UEFI,)
    assert bootable.plan(with_kernel, Arch.RISCV64, DiskSpec(), BootSpec()) is None
    mbr = DiskSpec(table=Table.MBR, table_given=True)
    bios = bootable.plan(with_kernel, Arch.X86_64, mbr, BootSpec())
    assert bios is not None and bios.firmware == (Firmware.BIOS,)
    gem5 = DiskSpec(table=Table.GPT, table_given=True, root_partition=2)
    assert bootable.plan(with_kernel, Arch.X86_64, gem5, BootSpec()) is None
    assert bootable.plan(tree(tmp_path, kernel=False), Arch.X86_64, DiskSpec(), BootSpec()) is None


def test_asking_what_the_image_cannot_boot_says_why(tmp_path: Path) -> None:
    with pytest.raises(ConvertError, match="no kernel"):
        bootable.plan(
            tree(tmp_path, kernel=False), Arch.X86_64, DiskSpec(), BootSpec((Firmware.UEFI,))
        )
    with pytest.raises(ConvertError, match=r"no bios bootloader .* arm64"):
        bootable.plan(tree(tmp_path), Arch.AARCH64, DiskSpec(), BootSpec((Firmware.BIOS,)))


def test_the_hybrid_layout_is_debians_cloud_image_one(tmp_path: Path) -> None:
    plan = bootable.plan(tree(tmp_path), Arch.X86_64, DiskSpec(), BootSpec())
    assert plan is not None
    stats = RootfsStats(10, 5, 5, 0, 0, 0, 50 * MiB)
    layout = plan_layout(stats, DiskSpec(), plan)
    assert layout.table is Table.GPT and layout.boot is not None
    parts = {
        p.number: (p.role.value, p.start // MiB, p.size // MiB) for p in layout.boot.partitions
    }
    assert parts[14] == ("bios-boot", 1, 1)
    assert parts[15] == ("esp", 2, 124)
    assert parts[1][0] == "root" and parts[1][1] == 126
    assert layout.fs_offset == 126 * MiB and layout.partition == 1
    sized = plan_layout(stats, DiskSpec(size=1024 * MiB), plan)
    assert sized.disk_bytes == 1024 * MiB


def test_grub_files_for_the_root_and_the_guests_update_grub(tmp_path: Path) -> None:
    image = tree(tmp_path, grub=True)
    plan = bootable.plan(image, Arch.X86_64, DiskSpec(), BootSpec(cmdline="quiet"))
    assert plan is not None
    uuid = "5a1e2c3d-4b5a-4c6d-8e7f-0123456789ab"
    (cfg,) = bootable.rootfs_files(plan, uuid, Table.GPT, FstabMode.UUID)
    assert cfg.path == "boot/grub/grub.cfg"
    assert f"root=UUID={uuid} ro console=tty0 console=ttyS0,115200 quiet".encode() in cfg.data
    assert f"linux\t/boot/{KERNEL}".encode() in cfg.data
    (no_fstab,) = bootable.rootfs_files(plan, uuid, Table.GPT, FstabMode.NONE)
    assert b" rw quiet" in no_fstab.data  # nothing else would remount the root rw
    (default,) = bootable.guest_grub_files(plan, image)
    assert default.path == "etc/default/grub"
    assert b'GRUB_CMDLINE_LINUX="console=tty0 console=ttyS0,115200 quiet"' in default.data
    assert bootable.guest_grub_files(plan, tree(tmp_path)) == []  # no update-grub: no file
