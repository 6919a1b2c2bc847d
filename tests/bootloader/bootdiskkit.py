"""Lay out a bootable disk file the way the disk writer will: sfdisk on the file, the
root filesystem by ``mke2fs -d TAR -E offset=``, then the bootloader installers."""

from __future__ import annotations

import io
import os
import tarfile
from pathlib import Path

from oci2disk import run
from oci2disk.bootloader import BootLayout, TableKind

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
            fields.append(f'name="{part.name}"')
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


def tar_with_files(rootfs_tar: Path, out: Path, files: dict[str, bytes]) -> None:
    """A copy of the rootfs tar with ``files`` (path -> bytes) appended."""
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
            for name, data in files.items():
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
        "-E", f"offset={root.start},root_owner=0:0", "-d", os.fspath(tar),
        os.fspath(disk), str(root.size // 4096),
    ]  # fmt: skip
    env = {"E2FSPROGS_FAKE_TIME": str(EPOCH), "MKE2FS_DEVICE_SECTSIZE": "512"}
    run.run(argv, env=env)
