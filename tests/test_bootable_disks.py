"""Disks that boot on their own: `convert --firmware bios,uefi` by an unprivileged user,
then the same file booted by SeaBIOS and by OVMF with no -kernel; the vdi, vhdx and vmdk
outputs too; the guest's own update-grub; the same bytes twice; refusals that write nothing.

The image is recipes/debian-qemu's (the session's debian_qemu_build), which ships GRUB's
module folders, so the bootloaders on the disk are the guest's own GRUB.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import select
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from clikit import ROOT, CliResult, oci2disk
from layerkit import directory, file, make_image
from oci2disk import run
from oci2disk.diskimage import bootfiles, partitions
from oci2disk.diskimage.extfs import open_filesystem

IMAGE = "oci2disk-recipe/debian-qemu:latest"
ANSI = re.compile(r"\x1b(?:\[[0-9;?=]*[ -/]*[@-~]|[@-Z\\-_])")
MARKER = "oci2disk-boot-ok"
NOBODY = 65534


def as_nobody(*args: str) -> CliResult:
    """The real command line as uid 65534 with every capability dropped."""
    argv = [
        "setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups",
        "--inh-caps=-all", "--bounding-set=-all",
        sys.executable, "-m", "oci2disk.cli", *args,
    ]  # fmt: skip
    env = {"PATH": "/usr/local/bin:/usr/bin:/usr/sbin:/bin:/sbin", "HOME": "/nonexistent"}
    proc = subprocess.run(
        argv, capture_output=True, text=True, env=env, check=False, timeout=900, cwd=ROOT
    )
    return CliResult(proc.returncode, proc.stdout, proc.stderr)


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


@pytest.fixture(scope="module")
def work(debian_qemu_build: Path) -> Iterator[Path]:
    """A folder uid 65534 can use, with the recipe's image saved as a docker archive."""
    path = Path(tempfile.mkdtemp(prefix="oci2disk-bootable-"))
    path.chmod(0o777)
    archive = path / "image.tar"
    run.run(["docker", "save", "-o", os.fspath(archive), IMAGE])
    archive.chmod(0o644)
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="module")
def disks(work: Path) -> dict[str, Path]:
    """The image converted by uid 65534 to qcow2 with BIOS and UEFI bootloaders, and to
    vdi, vhdx and vmdk with the default firmware (bios,uefi for an amd64 kernel image)."""
    out: dict[str, Path] = {}
    for fmt in ("qcow2", "vdi", "vhdx", "vmdk"):
        target = work / f"disk.{fmt}"
        given = ["--firmware", "bios,uefi"] if fmt == "qcow2" else []
        result = as_nobody(
            "--json", "convert", f"docker-archive:{work / 'image.tar'}", "-f", fmt,
            *given, "-o", os.fspath(target),
        )  # fmt: skip
        assert result.code == 0, result.stderr
        if fmt == "qcow2":
            manifest = json.loads(result.stdout)
            assert manifest["bootloader"]["firmware"] == ["bios", "uefi"]
            assert manifest["bootloader"]["efi_loader"] == "/EFI/BOOT/BOOTX64.EFI"
            # the image ships grub-pc-bin and grub-efi-amd64-bin: its own GRUB is used
            assert manifest["bootloader"]["modules"] == {"i386-pc": "image", "x86_64-efi": "image"}
        out[fmt] = target
    return out


def boot(disk: Path, firmware: str, log: Path) -> float:
    result = oci2disk(
        "boot", os.fspath(disk), "--firmware", firmware, "--expect", MARKER,
        "--timeout", "400", "--memory", "512", "--log", os.fspath(log),
    )  # fmt: skip
    console = ANSI.sub("", log.read_text(errors="replace"))  # systemd colours its status
    assert result.code == 0, f"{result.stderr}\n{console[-3000:]}"
    assert "GNU GRUB" in console  # the menu of the GRUB on the disk
    assert "Kernel panic" not in console and "Failed to mount" not in console
    if firmware == "uefi":
        assert "efi: EFI v" in console  # started by UEFI firmware
        assert "Mounted boot-efi.mount" in console  # the ESP, from the fstab oci2disk wrote
    else:
        assert "efi: EFI v" not in console
    return float(result.stdout.split(" after ")[1].split(" s")[0])


@pytest.mark.slow
@pytest.mark.docker
def test_one_qcow2_boots_with_seabios_and_with_ovmf(disks: dict[str, Path], work: Path) -> None:
    qcow2 = disks["qcow2"]
    seabios = boot(qcow2, "bios", work / "seabios.log")
    ovmf = boot(qcow2, "uefi", work / "ovmf.log")
    print(f"\nqcow2: SeaBIOS -> marker {seabios:.1f} s, OVMF -> marker {ovmf:.1f} s (TCG)")

    check = oci2disk("verify", os.fspath(qcow2), "--against", f"docker-daemon:{IMAGE}")
    assert check.code == 0, check.stdout + check.stderr


@pytest.mark.slow
@pytest.mark.docker
def test_vdi_and_vhdx_boot_through_their_firmware(disks: dict[str, Path], work: Path) -> None:
    vdi = boot(disks["vdi"], "bios", work / "vdi.log")
    vhdx = boot(disks["vhdx"], "uefi", work / "vhdx.log")
    print(f"\nvdi: SeaBIOS {vdi:.1f} s; vhdx: OVMF {vhdx:.1f} s (TCG)")


@pytest.mark.slow
@pytest.mark.docker
def test_the_guests_update_grub_keeps_the_vmdk_booting(disks: dict[str, Path], work: Path) -> None:
    """Boot the vmdk, run the guest's own update-grub (what a kernel upgrade runs), reboot
    in the same QEMU (writes kept in its snapshot overlay), and boot again."""
    argv = [
        "qemu-system-x86_64", "-machine", "pc", "-accel", "tcg", "-m", "768",
        "-nodefaults", "-display", "none", "-monitor", "none", "-serial", "stdio",
        "-nic", "none",
        "-drive", f"file={disks['vmdk']},format=vmdk,if=virtio,snapshot=on",
    ]  # fmt: skip
    log = work / "update-grub.log"
    proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    assert proc.stdin is not None and proc.stdout is not None
    seen = bytearray()
    started = time.monotonic()

    def wait_for(text: bytes, after: int = 0, timeout: float = 400) -> int:
        """Read the console until ``text`` shows after byte ``after``; where it ends."""
        assert proc.stdout is not None
        deadline = time.monotonic() + timeout
        while text not in seen[after:]:
            assert time.monotonic() < deadline, (
                f"no {text!r}:\n{seen[-3000:].decode(errors='replace')}"
            )
            ready, _, _ = select.select([proc.stdout], [], [], 1.0)
            if ready:
                chunk = os.read(proc.stdout.fileno(), 65536)
                assert chunk, "QEMU exited:\n" + seen[-3000:].decode(errors="replace")
                seen.extend(chunk)
        return seen.index(text, after) + len(text)

    try:
        wait_for(MARKER.encode())
        first = time.monotonic() - started
        wait_for(b"root@debian-qemu")  # the recipe logs root in on ttyS0
        # A setting only the guest's update-grub can bring into the menu: the next boot's
        # kernel command line shows that the GRUB on the disk read the guest's grub.cfg.
        proc.stdin.write(
            b"sed -i 's/^GRUB_CMDLINE_LINUX_DEFAULT=.*/"
            b'GRUB_CMDLINE_LINUX_DEFAULT="oci2disk.updated=1"/\' /etc/default/grub'
            b" && update-grub && echo UPDATE-GRUB-$((6*7)) && systemctl reboot\n"
        )  # $((6*7)): the echoed command line does not match
        proc.stdin.flush()
        updated = wait_for(b"UPDATE-GRUB-42", timeout=300)
        wait_for(b"GNU GRUB", after=updated)  # the reboot reached GRUB's menu again
        wait_for(b"Kernel command line:", after=updated)
        wait_for(MARKER.encode(), after=updated)
    finally:
        proc.kill()
        proc.wait()
        log.write_bytes(bytes(seen))
    console = ANSI.sub("", seen.decode(errors="replace"))
    after = console[console.index("UPDATE-GRUB-42") :]
    assert "Found linux image: /boot/vmlinuz-" in console  # update-grub saw the kernel
    assert "GNU GRUB" in after and "Kernel panic" not in after
    booted = after[after.index("Kernel command line:") :].splitlines()[0]
    assert "oci2disk.updated=1" in booted, booted
    print(f"\nvmdk: first boot {first:.1f} s; update-grub + reboot to the marker again")


@pytest.mark.docker
def test_two_conversions_give_the_same_bytes(work: Path) -> None:
    made = []
    for name in ("a", "b"):
        target = work / f"same-{name}.raw"
        result = oci2disk(
            "convert", f"docker-archive:{work / 'image.tar'}", "-f", "raw",
            "--firmware", "bios,uefi", "-o", os.fspath(target),
        )  # fmt: skip
        assert result.code == 0, result.stderr
        made.append(target)
        time.sleep(2.1)  # a host clock anywhere (FAT keeps 2 s steps) would now differ
    assert sha256(made[0]) == sha256(made[1])
    probed = bootfiles.probe(made[0], work)
    assert probed.found.bios and probed.found.uefi_arch == "x86_64"
    table = partitions.read_table(made[0])
    assert table is not None and table.label == partitions.GPT
    numbers = {p.number: p.type for p in table.partitions}
    assert numbers[14] == partitions.GPT_BIOS_BOOT
    assert numbers[15] == "c12a7328-f81f-11d2-ba4b-00a0c93ec93b"  # the ESP
    with open_filesystem(made[0]) as fs:
        with fs.open("boot/grub/grub.cfg") as f:
            assert f"root=UUID={fs.uuid} ro console=tty0 console=ttyS0,115200".encode() in f.read()
        with fs.open("etc/fstab") as f:
            assert b"/boot/efi\tvfat\tumask=0077" in f.read()
        assert fs.lookup("boot/efi") is not None
    for path in made:
        path.unlink()


def test_changed_boot_code_of_a_bootable_disk_is_found(work: Path) -> None:
    """verify compares the MBR's code with GRUB's boot.img as oci2disk patched it."""
    source = f"docker-archive:{work / 'image.tar'}"
    target = work / "tampered.raw"
    made = oci2disk("-q", "convert", source, "-f", "raw", "--firmware", "bios", "-o", str(target))
    assert made.code == 0, made.stderr
    same = oci2disk("verify", os.fspath(target), "--against", source, "--firmware", "bios")
    assert same.code == 0, same.stdout + same.stderr
    with target.open("r+b") as f:
        f.seek(0x80)  # inside boot.img's code, away from every field setup patches
        f.write(b"\x90\x90\xeb\xfe")
    check = oci2disk("verify", os.fspath(target), "--against", source, "--firmware", "bios")
    assert check.code == 1 and "boot sector" in check.stdout, check.stdout + check.stderr
    target.unlink()


def test_a_bare_filesystem_of_a_kernel_image_verifies_without_options(work: Path) -> None:
    """`-f fs` writes no table and so no bootloader; verify sees that, unasked."""
    source = f"docker-archive:{work / 'image.tar'}"
    target = work / "bare.ext4"
    made = oci2disk("-q", "convert", source, "-f", "fs", "-o", os.fspath(target))
    assert made.code == 0, made.stderr
    check = oci2disk("verify", os.fspath(target), "--against", source)
    assert check.code == 0, check.stdout + check.stderr
    target.unlink()


# ---------------------------------------------------------------- refusals


@pytest.fixture
def no_kernel_image(outdir: Path) -> Path:
    layout = outdir / "no-kernel"
    make_image(layout, [[directory("etc"), file("etc/hostname", b"tiny\n")]])
    return layout


def refused(result: CliResult, output: Path, *words: str) -> None:
    assert result.code != 0
    message = result.stderr.split("error: ", 1)[1]
    assert "\n\n" not in message.strip()  # one paragraph (and its hint)
    for word in words:
        assert word in message, message
    assert not output.exists(), "nothing may be written"
    assert not [p for p in output.parent.iterdir() if p.name.startswith(f".{output.name}")]


def test_uefi_for_an_image_without_a_kernel_is_refused(no_kernel_image: Path) -> None:
    out = no_kernel_image.parent / "disk.qcow2"
    result = oci2disk(
        "convert", f"oci:{no_kernel_image}", "-f", "qcow2", "--firmware", "uefi", "-o", str(out)
    )
    refused(result, out, "no kernel", "/boot", "--firmware none")


def test_bios_for_an_arm64_image_is_refused(outdir: Path) -> None:
    arm = outdir / "arm64"
    kernel = file("boot/vmlinuz-6.1.0-9-arm64", b"k" * 4096)
    make_image(arm, [[directory("etc"), directory("boot"), kernel]], architecture="arm64")
    out = outdir / "arm.raw"
    result = oci2disk("convert", f"oci:{arm}", "-f", "raw", "--firmware", "bios", "-o", str(out))
    refused(result, out, "bios", "arm64", "--firmware uefi")


def test_firmware_for_a_bare_filesystem_is_refused(no_kernel_image: Path) -> None:
    out = no_kernel_image.parent / "disk.ext4"
    result = oci2disk(
        "convert", f"oci:{no_kernel_image}", "-f", "raw", "--table", "none",
        "--firmware", "bios", "-o", str(out),
    )  # fmt: skip
    refused(result, out, "table", "bare filesystem")
