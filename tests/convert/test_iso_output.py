"""The ``iso`` output: a hybrid ISO whose GRUB boots the image's kernel with the whole
rootfs as its initramfs, on SeaBIOS and on OVMF, from a CD-ROM and without a disk."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from bootkit import OVMF, Kernel, boot_until, busybox_base, debian_kernel, qemu, script
from layerkit import directory, file, make_image
from oci2disk.convert.iso import grub_cfg, write_iso, write_iso_from_rootfs
from oci2disk.convert.options import IsoSpec
from oci2disk.errors import ConvertError
from oci2disk.rootfs.flatten import flatten

MARKER = "oci2disk-in-memory-ok"
SDE = 1_700_000_000
# Linux's arm64 Image header: enough for the architecture check.
ARM64_IMAGE = bytes(0x38) + b"ARM\x64" + bytes(4096)


@pytest.fixture(scope="session")
def kernel(tmp_path_factory: pytest.TempPathFactory) -> Kernel:
    return debian_kernel(tmp_path_factory.mktemp("kernel"), ())


@pytest.fixture(scope="session")
def in_memory_iso(kernel: Kernel, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A busybox image with the Debian kernel in /boot, as an iso output."""
    work = tmp_path_factory.mktemp("iso")
    image = make_image(
        work / "layout",
        [
            [
                *busybox_base(),
                directory("boot"),
                file(f"boot/vmlinuz-{kernel.version}", kernel.vmlinuz.read_bytes()),
                script(
                    "init",
                    "/bin/busybox mount -t proc proc /proc\n"
                    # Only in memory: the root is the initramfs and there is no disk.
                    "if /bin/busybox grep -q '^rootfs / rootfs' /proc/mounts && "
                    "! /bin/busybox grep -qE ' (sd|vd|hd)[a-z]$' /proc/partitions; then\n"
                    f"  echo {MARKER}\n"
                    "fi\n"
                    "/bin/busybox poweroff -f\n",
                ),
            ]
        ],
    )
    out = work / "live.iso"
    with flatten(image, work / "flat") as rootfs:
        chosen = write_iso_from_rootfs(
            rootfs, out, IsoSpec(append="quiet"), workdir=work / "tmp", source_date_epoch=SDE
        )
    assert chosen.version == kernel.version
    return out


def test_grub_menu_talks_to_the_serial_console() -> None:
    cfg = grub_cfg(IsoSpec(append="rdinit=/sbin/init", console="ttyS1,9600"), "Linux 6.1")
    assert "serial --unit=1 --speed=9600" in cfg
    assert "linux /boot/vmlinuz console=tty0 console=ttyS1,9600 rdinit=/sbin/init" in cfg
    assert "initrd /boot/initrd.img" in cfg


def test_same_input_same_bytes_and_both_firmwares_catalogued(tmp_path: Path) -> None:
    kernel, initrd = tmp_path / "k", tmp_path / "i"
    kernel.write_bytes(b"kernel" * 1000)
    initrd.write_bytes(b"initrd" * 1000)
    one, two = tmp_path / "one.iso", tmp_path / "two.iso"
    write_iso(kernel, initrd, one, source_date_epoch=SDE)
    write_iso(kernel, initrd, two, source_date_epoch=SDE)
    assert one.read_bytes() == two.read_bytes()
    report = subprocess.run(
        ["xorriso", "-indev", str(one), "-report_el_torito", "plain"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert " BIOS " in report and " UEFI " in report
    assert one.read_bytes()[510:512] == b"\x55\xaa"  # an MBR too: boots from a USB stick
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_a_kernel_for_another_architecture_is_refused(tmp_path: Path) -> None:
    image = make_image(
        tmp_path / "layout",
        [[directory("boot"), file("boot/vmlinuz-6.1.0-arm64", ARM64_IMAGE), script("init", "")]],
    )
    with flatten(image, tmp_path / "flat") as rootfs, pytest.raises(ConvertError, match="arm64"):
        write_iso_from_rootfs(rootfs, tmp_path / "out.iso", workdir=tmp_path / "w")
    assert not (tmp_path / "out.iso").exists()


@pytest.mark.slow
def test_boots_with_seabios_from_a_cdrom(in_memory_iso: Path, tmp_path: Path) -> None:
    boot = boot_until(qemu("-cdrom", str(in_memory_iso), "-boot", "d"), MARKER, tmp_path / "log")
    print(f"SeaBIOS CD-ROM boot to the marker: {boot.seconds:.1f} s")


@pytest.mark.slow
def test_boots_with_ovmf_from_a_cdrom(in_memory_iso: Path, tmp_path: Path) -> None:
    argv = qemu("-bios", str(OVMF), "-cdrom", str(in_memory_iso), "-boot", "d")
    boot = boot_until(argv, MARKER, tmp_path / "log")
    print(f"OVMF CD-ROM boot to the marker: {boot.seconds:.1f} s")
