"""The EFI system partition, made as a FAT32 image in a plain file and copied into
the disk file: never mounted.

``make_esp_image`` makes the filesystem with ``mkfs.fat -C`` in a file and puts the
files in with mtools (``mlabel``, ``mmd``, ``mcopy -m``). The bytes are reproducible:
the volume serial comes from the caller (``common.fat_volume_id(seed)``), and every
time stamp mtools writes (files, directories, volume label) is ``SOURCE_DATE_EPOCH``;
mkfs.fat is given no label because it stamps the label's directory entry with the host
clock.

``copy_into_disk`` copies that image into the ESP's byte range of the disk file,
skipping zero runs where the disk is already zero, so a sparse disk stays sparse.

Host tools: mkfs.fat (dosfstools); mlabel, mmd, mcopy (mtools).
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Mapping
from pathlib import Path

from oci2disk import run
from oci2disk.bootloader.common import SECTOR, BootloaderError, MiB
from oci2disk.bytestreams import copy_sparse

ESP_LABEL = "EFI"


def make_esp_image(
    path: Path,
    size: int,
    files: Mapping[str, bytes],
    *,
    volume_id: int,
    epoch: int,
    label: str = ESP_LABEL,
    hidden_sectors: int = 0,
) -> None:
    """Make a FAT32 filesystem of ``size`` bytes in the new file ``path`` holding ``files``
    (paths relative to the ESP root, "/"-separated).

    ``volume_id`` is the 32-bit serial (``common.fat_volume_id``); ``epoch`` (the
    build's SOURCE_DATE_EPOCH) is every time stamp; ``hidden_sectors`` is the
    partition's first sector, recorded in the boot sector as mkfs.fat does on a device.
    """
    if size % SECTOR or size < 33 * MiB:
        raise BootloaderError(
            f"an ESP of {size} bytes cannot hold FAT32",
            hint="give the ESP a whole number of MiB, at least 33 MiB",
        )
    if not 0 <= volume_id <= 0xFFFFFFFF:
        raise BootloaderError(f"FAT volume id {volume_id:#x} does not fit in 32 bits")
    if path.exists():
        path.unlink()
    env = {"SOURCE_DATE_EPOCH": str(epoch), "MTOOLS_SKIP_CHECK": "1", "TZ": "UTC"}
    image = os.fspath(path)
    run.run(
        [
            "mkfs.fat",
            "-C",
            "-F",
            "32",
            "-S",
            str(SECTOR),
            "-s",
            "1",
            "-i",
            f"{volume_id:08x}",
            "-h",
            str(hidden_sectors),
            image,
            str(size // 1024),
        ],
        env=env,
        what="mkfs.fat could not make the ESP",
    )
    run.run(["mlabel", "-i", image, f"::{label}"], env=env, what="mlabel failed on the ESP")
    dirs = sorted(
        {"/".join(name.split("/")[:i]) for name in files for i in range(1, name.count("/") + 1)}
    )
    if dirs:
        run.run(["mmd", "-i", image, *(f"::/{d}" for d in dirs)], env=env, what="mmd failed")
    with tempfile.TemporaryDirectory(prefix="oci2disk-esp-") as tmp:
        for number, name in enumerate(sorted(files)):
            source = Path(tmp, str(number))
            source.write_bytes(files[name])
            os.utime(source, (epoch, epoch))
            run.run(
                ["mcopy", "-m", "-o", "-i", image, os.fspath(source), f"::/{name}"],
                env=env,
                what=f"mcopy could not put {name} on the ESP",
            )


def copy_into_disk(image: Path, disk: Path, offset: int, size: int) -> None:
    """Copy the filesystem image into ``disk`` at ``offset``; it must fit in ``size`` bytes."""
    length = image.stat().st_size
    if length > size:
        raise BootloaderError(
            f"the ESP image is {length} bytes but its partition has {size}",
            hint="make the ESP image with the partition's size",
        )
    if disk.stat().st_size < offset + size:
        raise BootloaderError(
            f"{os.fspath(disk)} is smaller than the end of the ESP partition "
            f"({offset + size} bytes)",
            hint="size the disk file before writing the ESP into it",
        )
    with image.open("rb") as src, disk.open("r+b") as dst:
        # The FAT image is mostly holes: only its data extents are copied (in the
        # kernel), and the disk's part of the partition stays sparse.
        copy_sparse(src.fileno(), dst.fileno(), length, 0, offset)
