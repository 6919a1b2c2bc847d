"""Lay out a bootable disk file the way the disk writer will: sfdisk on the file, the
root filesystem by ``mke2fs -d TAR -E offset=``, then the bootloader installers."""

from __future__ import annotations

import io
import os
import re
import select
import subprocess
import tarfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from oci2disk import run
from oci2disk.bootloader import (
    BootLayout,
    GrubTarget,
    Installed,
    Role,
    TableKind,
    fat_volume_id,
    fat_volume_uuid,
    grub_cfg,
    install,
    kernels_in_boot,
)

ROOT_UUID = "5a1e2c3d-4b5a-4c6d-8e7f-0123456789ab"
DISK_UUID = "0b0c1d2e-3f40-4152-8364-758697a8b9ca"
EPOCH = 1_700_000_000


def sfdisk_script(layout: BootLayout, disk: Path) -> str:
    """An sfdisk script for the layout; partition numbers come from the device names."""
    if layout.table is TableKind.GPT:
        lines = ["label: gpt", f"label-id: {DISK_UUID}"]
    else:
        lines = ["label: dos", "label-id: 0x1234abcd"]
    for part in layout.partitions:
        fields = [f"start={part.start_sector}", f"size={part.sectors}", f"type={part.type}"]
        if layout.table is TableKind.GPT:
            # sfdisk picks random partition UUIDs unless told
            fields += [f'name="{part.name}"', f"uuid={uuid.uuid5(uuid.NAMESPACE_OID, part.name)}"]
        if part.bootable:
            fields.append("bootable")
        lines.append(f"{os.fspath(disk)}{part.number} : " + ", ".join(fields))
    return "\n".join(lines) + "\n"


def write_table(disk: Path, layout: BootLayout) -> None:
    with disk.open("wb") as f:
        f.truncate(layout.disk_bytes)
    run.run(
        ["sfdisk", "--quiet", "--no-reread", "--no-tell-kernel", "--wipe=always", os.fspath(disk)],
        input=sfdisk_script(layout, disk).encode(),
    )


def tar_with_files(
    rootfs_tar: Path, out: Path, files: dict[str, bytes], dirs: list[str] | None = None
) -> None:
    """A copy of the rootfs tar with ``files`` (path -> bytes) and ``dirs`` appended."""
    with rootfs_tar.open("rb") as src, out.open("wb") as dst:
        # Drop the two zero end-of-archive blocks and anything after them.
        with tarfile.open(fileobj=src) as tar:
            members = tar.getmembers()
            end = tar.offset
        src.seek(0)
        remaining = end
        while remaining:
            chunk = src.read(min(remaining, 1 << 20))
            dst.write(chunk)
            remaining -= len(chunk)
        present = {m.name.removeprefix("./").rstrip("/") for m in members}
        with tarfile.open(fileobj=dst, mode="w", format=tarfile.GNU_FORMAT) as tar:
            for name, data in [*((d + "/.", b"") for d in dirs or []), *files.items()]:
                parts = name.split("/")
                for i in range(1, len(parts)):
                    parent = "/".join(parts[:i])
                    if parent not in present:
                        info = tarfile.TarInfo(parent)
                        info.type = tarfile.DIRTYPE
                        info.mode = 0o755
                        info.mtime = EPOCH
                        tar.addfile(info)
                        present.add(parent)
                if parts[-1] == ".":
                    continue
                info = tarfile.TarInfo(name)
                info.size = len(data)
                info.mode = 0o644
                info.mtime = EPOCH
                tar.addfile(info, io.BytesIO(data))


def write_root_fs(disk: Path, layout: BootLayout, tar: Path) -> None:
    root = layout.root
    argv = [
        "mke2fs", "-q", "-F", "-t", "ext4", "-b", "4096", "-U", ROOT_UUID, "-L", "root",
        "-O", "^orphan_file,^metadata_csum_seed",
        "-E", f"offset={root.start},root_owner=0:0,hash_seed={DISK_UUID}", "-d", os.fspath(tar),
        os.fspath(disk), str(root.size // 4096),
    ]  # fmt: skip
    env = {"E2FSPROGS_FAKE_TIME": str(EPOCH), "MKE2FS_DEVICE_SECTSIZE": "512"}
    run.run(argv, env=env)


FIRMWARE = {
    "seabios": [],  # QEMU's default BIOS
    "ovmf": ["-bios", "/usr/share/ovmf/OVMF.fd"],
}


@dataclass(frozen=True)
class Console:
    matched: bool
    seconds: float
    text: str  # escape sequences removed


def boot_disk(disk: Path, firmware: str, *, expect: bytes, timeout: float, log: Path) -> Console:
    """Boot the disk file with no -kernel (the firmware and the bootloader on the disk do
    it), TCG, serial console on stdout; stop at the first ``expect`` or at ``timeout``."""
    argv = [
        "qemu-system-x86_64", "-machine", "pc", "-accel", "tcg", "-m", "1024", "-smp", "2",
        "-nodefaults", "-display", "none", "-monitor", "none", "-serial", "stdio",
        "-no-reboot", "-nic", "none", *FIRMWARE[firmware],
        "-drive", f"file={os.fspath(disk)},format=raw,if=virtio,snapshot=on",
    ]  # fmt: skip
    started = time.monotonic()
    output = bytearray()
    proc = run.start(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    assert proc.stdout is not None
    matched = False
    try:
        fd = proc.stdout.fileno()
        while not matched and time.monotonic() - started < timeout:
            ready, _, _ = select.select([fd], [], [], 1.0)
            if not ready:
                continue
            chunk = os.read(fd, 65536)
            if not chunk:
                break  # QEMU exited
            output += chunk
            matched = expect in output
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        proc.stdout.close()
        if proc.stderr is not None:
            proc.stderr.close()
    seconds = time.monotonic() - started
    log.write_bytes(bytes(output))
    text = re.sub(r"\x1b(?:\[[0-9;?]*[ -/]*[@-~]|[@-Z\\-_])", "", output.decode(errors="replace"))
    return Console(matched, seconds, text)


def boot_names(rootfs_tar: Path) -> list[str]:
    """The base names of the files in the rootfs's /boot."""
    with tarfile.open(rootfs_tar) as tar:
        return [
            name.rsplit("/", 1)[1]
            for name in (m.name.removeprefix("./") for m in tar.getmembers())
            if name.startswith("boot/") and name.count("/") == 1
        ]


def make_bootable_disk(
    rootfs_tar: Path, work: Path, layout: BootLayout, *, cmdline: str, seed: str
) -> tuple[Path, Installed]:
    """The integration recipe of oci2disk.bootloader, end to end, into work/disk.raw."""
    work.mkdir(parents=True, exist_ok=True)
    gpt = layout.table is TableKind.GPT
    cfg = grub_cfg(
        ROOT_UUID,
        kernels_in_boot(boot_names(rootfs_tar)),
        cmdline=cmdline,
        partmap="gpt" if gpt else "msdos",
    )
    esp = layout.get(Role.ESP)
    esp_uuid = fat_volume_uuid(fat_volume_id(seed))
    fstab = f"UUID={ROOT_UUID}\t/\text4\terrors=remount-ro\t0\t1\n"
    if esp is not None:
        fstab += f"UUID={esp_uuid}\t/boot/efi\tvfat\tumask=0077\t0\t1\n"
    files = {"boot/grub/grub.cfg": cfg.encode(), "etc/fstab": fstab.encode()}
    tar = work / "rootfs+boot.tar"
    tar_with_files(rootfs_tar, tar, files, dirs=["boot/efi"] if esp else [])
    disk = work / "disk.raw"
    write_table(disk, layout)
    write_root_fs(disk, layout, tar)
    tar.unlink()
    installed = install(
        disk,
        layout,
        root_uuid=ROOT_UUID,
        bios_modules=Path("/usr/lib/grub/i386-pc"),
        efi_target=GrubTarget.X86_64_EFI if esp else None,
        efi_modules=Path("/usr/lib/grub/x86_64-efi") if esp else None,
        seed=seed,
        epoch=EPOCH,
        workdir=work,
    )
    assert installed.esp_uuid == (esp_uuid if esp else None)
    return disk, installed
