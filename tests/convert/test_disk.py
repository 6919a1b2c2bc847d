"""The raw and fs formats with the real mke2fs: a filesystem too small is named as such."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from layerkit import directory, file, make_image
from oci2disk.convert import disk
from oci2disk.convert.options import FsType, Table
from oci2disk.errors import ConvertError
from oci2disk.rootfs.flatten import flatten
from oci2disk.workspace import Workspace

MiB = 1 << 20


def test_mke2fs_running_out_of_space_is_reported_as_too_small(tmp_path: Path) -> None:
    """Recognised by libext2fs's error code, not the strerror text of the user's locale
    (mke2fs's last line even says "Operation not permitted" here)."""
    image = make_image(
        tmp_path / "layout",
        [[directory("etc"), file("etc/big", os.urandom(3 * MiB))]],
    )
    out = tmp_path / "fs.img"
    out.write_bytes(b"")
    layout = disk.DiskLayout(Table.NONE, 2 * MiB, 0, 2 * MiB)
    identity = disk.FsIdentity("0b5c3f0e-7c1d-4b5e-9a6f-2d8e4f1a3b7c", "root", FsType.EXT2)
    os.truncate(out, layout.disk_bytes)
    os.environ["LC_ALL"] = "fr_FR.UTF-8"
    try:
        with (
            Workspace() as ws,
            flatten(image, ws.subdir("flat")) as rootfs,
            pytest.raises(ConvertError, match="too small for this image") as caught,
        ):
            disk.write_filesystem(rootfs, out, layout, identity, extra=[], timestamp=1)
    finally:
        del os.environ["LC_ALL"]
    assert caught.value.hint is not None and "--size auto" in caught.value.hint
