"""vmdk, vpc and vdi are as reproducible as raw and qcow2: qemu-img's random ids and
time stamps are replaced by values derived from the image and SOURCE_DATE_EPOCH."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from layerkit import directory, file
from oci2disk.convert import ConvertOptions
from oci2disk.recipe import Format
from outputkit import convert_to, image_of

MEMBERS = [directory("etc"), file("etc/hostname", b"vm\n"), file("srv/data", b"x" * 300_000)]


@pytest.mark.parametrize("fmt", [Format.VMDK, Format.VPC, Format.VDI])
def test_the_same_image_gives_the_same_bytes(tmp_path: Path, fmt: Format) -> None:
    image = image_of(tmp_path, MEMBERS)
    options = ConvertOptions(source_date_epoch=1_700_000_000)
    made = []
    for n in range(2):
        folder = tmp_path / str(n)  # the same file names: a vmdk names its extent file
        folder.mkdir()
        out, raw = folder / f"disk.{fmt.plugin.name}", folder / "disk.raw"
        convert_to(image, {fmt: out, Format.RAW: raw}, options)
        made.append(out.read_bytes())
        # still the raw disk's content, as qemu-img reads it
        subprocess.run(
            ["qemu-img", "compare", "-f", "raw", str(raw), str(out)],
            check=True,
            capture_output=True,
        )
    assert made[0] == made[1]
