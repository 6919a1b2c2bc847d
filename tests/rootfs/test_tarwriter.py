"""The canonical tar of any Tree is the flattened image's own canonical tar."""

from __future__ import annotations

import io
from pathlib import Path

import pytest

from layerkit import file, make_image
from oci2disk.errors import ImageError
from oci2disk.rootfs.flatten import flatten
from oci2disk.rootfs.model import Entry, Kind
from oci2disk.rootfs.tarwriter import write_entries_tar, write_tree_tar
from sourcekit import rich_image


def test_same_bytes_as_flatrootfs_write_tar(tmp_path: Path) -> None:
    image = rich_image(tmp_path / "layout")
    with flatten(image, tmp_path / "flat", source_date_epoch=1_600_000_000) as rootfs:
        model, mine = io.BytesIO(), io.BytesIO()
        rootfs.write_tar(model)
        stats = write_tree_tar(rootfs, mine)
    assert mine.getvalue() == model.getvalue()
    assert stats.hardlinks == 2 and stats.skipped_sockets == 0


def test_sockets_are_left_out_and_short_files_are_an_error(tmp_path: Path) -> None:
    image = make_image(tmp_path / "layout", [[file("data", b"12345")]])
    with flatten(image, tmp_path / "flat") as rootfs:
        entries = [*rootfs.entries(), Entry("sock", Kind.SOCKET, 0o755)]
        out = io.BytesIO()
        stats = write_entries_tar(rootfs, entries, out)
        assert stats.skipped_sockets == 1 and stats.entries == 2
        longer = [Entry(".", Kind.DIR, 0o755), Entry("data", Kind.FILE, 0o644, size=9)]
        with pytest.raises(ImageError, match="ended 4 bytes before its size"):
            write_entries_tar(rootfs, longer, io.BytesIO())
