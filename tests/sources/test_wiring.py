"""``disk:`` and ``iso:`` are image references like the others: parsed, then opened."""

from __future__ import annotations

from pathlib import Path

import pytest

from oci2disk.errors import ImageError, RefError
from oci2disk.refs import Transport, parse_ref
from oci2disk.sources import open_image
from sourcekit import canonical_tar, make_disk, rich_image


def test_refs_parse() -> None:
    ref = parse_ref("disk:cloud.qcow2:2")
    assert (ref.transport, ref.name, str(ref)) == (
        Transport.DISK,
        "cloud.qcow2:2",
        "disk:cloud.qcow2:2",
    )
    assert parse_ref("iso:live.iso").transport is Transport.ISO
    with pytest.raises(RefError, match="disk:FILE"):
        parse_ref("floppy:a.img")


def test_open_image_reads_a_disk_and_names_a_bad_partition(tmp_path: Path) -> None:
    image = rich_image(tmp_path / "layout")
    tar = tmp_path / "rootfs.tar"
    canonical_tar(image, tmp_path / "flat", tar)
    disk = tmp_path / "disk.raw"
    make_disk(tar, disk, table="mbr")
    opened = open_image(parse_ref(f"disk:{disk}:1"), tmp_path / "w1")
    assert opened.config.architecture == "amd64" and len(opened.layers) == 1
    with pytest.raises(ImageError, match="no partition 3"):
        open_image(parse_ref(f"disk:{disk}:3"), tmp_path / "w2")
    with pytest.raises(ImageError, match="not a file"):
        open_image(parse_ref(f"iso:{tmp_path / 'missing.iso'}"), tmp_path / "w3")
