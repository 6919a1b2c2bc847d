"""A large --size does not make mke2fs write every inode table and the whole journal
(minutes and gigabytes for --size 1T): in the new, sparse file they are zeros already."""

from __future__ import annotations

import subprocess
from pathlib import Path

from layerkit import directory, file
from oci2disk.convert import ConvertOptions
from oci2disk.convert.options import DiskSpec
from oci2disk.recipe import Format
from outputkit import convert_to, image_of


def test_a_large_filesystem_takes_little_room_on_disk(tmp_path: Path) -> None:
    image = image_of(tmp_path, [directory("etc"), file("etc/hostname", b"vm\n")])
    out = tmp_path / "big.img"
    convert_to(image, {Format.FS: out}, ConvertOptions(DiskSpec(size=8 << 30)))
    assert out.stat().st_size == 8 << 30
    assert out.stat().st_blocks * 512 < 16 << 20, "the inode tables were written out"
    subprocess.run(["e2fsck", "-fn", str(out)], check=True, capture_output=True)
