"""An arm64 image built, converted and booted on this amd64 machine.

`oci2disk bootstrap --platform linux/arm64` makes an arm64 Debian base, `oci2disk build
--platform linux/arm64` runs the recipe's RUN steps (apt-get installing a kernel, an
initramfs being made) through qemu-user binfmt; the disk gets GRUB for UEFI from the
image's own grub-efi-arm64-bin (an amd64 host has no arm64 GRUB), and `oci2disk boot`
starts it through AAVMF under qemu-system-aarch64 -M virt (TCG), with no -kernel, until
the marker the image prints appears on the serial console.

Slow (a few minutes: emulated dpkg and mkinitramfs), and run in CI like every test.
The image stays small: minbase, the kernel, and an initramfs with only the modules a
virtio disk needs (MODULES=list), since MODULES=most under emulation takes > 10 minutes.
"""

from __future__ import annotations

import gzip
import json
import struct
import subprocess
from pathlib import Path

import pytest

from clikit import oci2disk
from oci2disk.arch import Arch
from oci2disk.boot import kernel_arch
from oci2disk.diskimage.extfs import open_filesystem
from oci2disk.errors import BootError

BASE = "oci2disk-test/debian-arm64:bookworm"
ELF_MACHINE_AARCH64 = 0xB7
MARKER = "OCI2DISK-ARM64-MARKER"

DOCKERFILE = f"""\
FROM {BASE}
# Only the modules a virtio disk with ext4 needs: quick to make under emulation.
RUN mkdir -p /etc/initramfs-tools/conf.d \\
 && echo MODULES=list > /etc/initramfs-tools/conf.d/oci2disk.conf \\
 && printf 'virtio_pci\\nvirtio_blk\\next4\\n' >> /etc/initramfs-tools/modules \\
 && apt-get update -q \\
 && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends \\
      linux-image-arm64 grub-efi-arm64-bin \\
 && rm -rf /var/lib/apt/lists/*
COPY marker /usr/local/sbin/oci2disk-marker
RUN chmod 0755 /usr/local/sbin/oci2disk-marker && uname -m > /etc/oci2disk-built-on
"""
MARKER_SCRIPT = f"""\
#!/bin/sh
# init= of the test boot: say what ran, then idle until QEMU is stopped.
echo "{MARKER} $(uname -m) built-on=$(cat /etc/oci2disk-built-on)"
while :; do sleep 60; done
"""


def image_exists(name: str) -> bool:
    probe = subprocess.run(
        ["buildah", "inspect", "--type", "image", f"localhost/{name}"],
        capture_output=True,
        check=False,
    )
    return probe.returncode == 0


@pytest.fixture(scope="module")
def arm64_base() -> str:
    """An arm64 Debian minbase in buildah's storage, bootstrapped when missing."""
    if not image_exists(BASE):
        result = oci2disk(
            "--json", "bootstrap", "bookworm", "--platform", "linux/arm64",
            "--to", f"containers-storage:{BASE}",
        )  # fmt: skip
        assert result.code == 0, result.stderr
        assert json.loads(result.stdout)["dest"] == f"containers-storage:{BASE}"
    return BASE


def elf_machine(data: bytes) -> int:
    assert data[:4] == b"\x7fELF"
    return int(struct.unpack_from("<H", data, 18)[0])


@pytest.mark.slow
def test_arm64_build_convert_and_boot(arm64_base: str, outdir: Path) -> None:
    recipe = outdir / "arm64"
    recipe.mkdir()
    (recipe / "Dockerfile").write_text(DOCKERFILE)
    (recipe / "marker").write_text(MARKER_SCRIPT)
    # [boot] cmdline reaches the kernel through the grub.cfg oci2disk writes
    (recipe / "recipe.toml").write_text(
        '[outputs]\nname = "arm64"\n\n[boot]\ncmdline = "init=/usr/local/sbin/oci2disk-marker"\n'
    )

    built = oci2disk(
        "--json", "build", str(recipe), "--builder", "buildah", "--platform", "linux/arm64",
        "-o", str(outdir / "out"),
    )  # fmt: skip
    assert built.code == 0, built.stderr
    manifest = json.loads(built.stdout)
    disk = outdir / "out" / "arm64.raw"

    with open_filesystem(disk) as fs:
        with fs.open("etc/oci2disk-built-on") as f:
            assert f.read() == b"aarch64\n"  # the RUN step ran as arm64, through qemu-user
        with fs.open("usr/bin/dash") as f:
            assert elf_machine(f.read(64)) == ELF_MACHINE_AARCH64
        boot_files = {
            e.path.removeprefix("boot/") for e in fs.entries() if e.path.startswith("boot/")
        }
        assert any(name.startswith("vmlinuz-") and name.endswith("-arm64") for name in boot_files)
        assert any(name.startswith("initrd.img-") for name in boot_files)

    check = oci2disk(
        "verify", str(disk), "--against", manifest["source"]["ref"], "--platform", "linux/arm64",
        "--recipe", str(recipe),  # its [boot] cmdline is in the grub.cfg verify expects
    )  # fmt: skip
    assert check.code == 0, check.stdout + check.stderr

    booted = oci2disk(
        "boot", str(disk), "--expect", f"{MARKER} aarch64 built-on=aarch64", "--timeout", "900",
    )  # fmt: skip
    assert booted.code == 0, booted.stdout + booted.stderr
    assert "(tcg)" in booted.stdout
    console = Path(f"{disk}.boot.log").read_text(errors="replace")
    # qemu-system-aarch64's virt board; booted through UEFI, the kernel describes it from
    # the firmware's ACPI and SMBIOS tables rather than the device tree's model
    assert "DMI: QEMU QEMU Virtual Machine" in console
    assert "console=ttyAMA0" in console
    assert "efi: EFI v" in console  # started by AAVMF through BOOTAA64.EFI, not -kernel
    assert manifest["bootloader"]["firmware"] == ["uefi"]  # arm64's default
    assert manifest["bootloader"]["efi_loader"] == "/EFI/BOOT/BOOTAA64.EFI"
    assert manifest["bootloader"]["modules"] == {"arm64-efi": "image"}
    print(f"\n{booted.stdout.strip()}")


def _kernel(tmp_path: Path, name: str, data: bytes) -> Path:
    path = tmp_path / name
    path.write_bytes(data)
    return path


def test_boot_tells_the_kernel_architecture_from_its_header(tmp_path: Path) -> None:
    """`oci2disk boot` picks qemu-system-aarch64 and ttyAMA0 from the kernel itself."""
    bzimage = bytearray(8192)
    bzimage[0x202:0x206] = b"HdrS"
    arm64 = bytearray(8192)
    arm64[0x38:0x3C] = b"ARM\x64"
    elf = bytearray(64)
    elf[:4] = b"\x7fELF"
    struct.pack_into("<H", elf, 18, ELF_MACHINE_AARCH64)
    assert kernel_arch(_kernel(tmp_path, "bz", bytes(bzimage))) is Arch.X86_64
    assert kernel_arch(_kernel(tmp_path, "Image", bytes(arm64))) is Arch.AARCH64
    assert kernel_arch(_kernel(tmp_path, "Image.gz", gzip.compress(bytes(arm64)))) is Arch.AARCH64
    assert kernel_arch(_kernel(tmp_path, "vmlinux", bytes(elf))) is Arch.AARCH64
    with pytest.raises(BootError, match="cannot tell which architecture"):
        kernel_arch(_kernel(tmp_path, "junk", b"not a kernel" * 100))
