"""The ``squashfs`` output, read back with ``sqfs2tar``, equals the image."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from oci2disk.convert.options import SquashfsCompressor, SquashfsSpec
from oci2disk.convert.squashfs import write_squashfs
from oci2disk.errors import CommandError, ConvertError
from oci2disk.oci.layout import layout_from_rootfs_tar
from oci2disk.rootfs.flatten import flatten
from sourcekit import entries, rich_image

SDE = 1_700_000_000


def squashfs_of(layout: Path, work: Path, out: Path, spec: SquashfsSpec, jobs: int) -> None:
    image = rich_image(layout)
    with flatten(image, work, source_date_epoch=SDE) as rootfs:
        write_squashfs(rootfs.write_tar, out, spec, source_date_epoch=SDE, jobs=jobs)


def test_read_back_by_sqfs2tar_it_equals_the_image(tmp_path: Path) -> None:
    image = rich_image(tmp_path / "layout")
    out = tmp_path / "rootfs.squashfs"
    with flatten(image, tmp_path / "flat", source_date_epoch=SDE) as rootfs:
        write_squashfs(rootfs.write_tar, out, source_date_epoch=SDE)
    assert out.read_bytes()[:4] == b"hsqs"
    assert not list(tmp_path.glob(".*.part"))
    back = tmp_path / "back.tar"
    with back.open("wb") as sink:
        subprocess.run(["sqfs2tar", "--root-becomes", ".", str(out)], stdout=sink, check=True)
    again = layout_from_rootfs_tar(back, tmp_path / "again", None)
    got = entries(again, tmp_path / "f1")
    want = entries(image, tmp_path / "f2")
    assert [e.path for e in got] == [e.path for e in want]
    for mine, theirs in zip(got, want, strict=True):
        assert mine == theirs


def test_same_rootfs_same_bytes_whatever_the_jobs(tmp_path: Path) -> None:
    spec = SquashfsSpec(SquashfsCompressor.ZSTD, block_size=65536)
    one, two = tmp_path / "one.sqfs", tmp_path / "two.sqfs"
    squashfs_of(tmp_path / "l1", tmp_path / "w1", one, spec, jobs=1)
    squashfs_of(tmp_path / "l2", tmp_path / "w2", two, spec, jobs=2)
    assert one.read_bytes() == two.read_bytes()
    # The compressor and block size are the ones asked for (superblock fields).
    head = one.read_bytes()[:32]
    assert int.from_bytes(head[12:16], "little") == 65536
    assert int.from_bytes(head[20:22], "little") == 6  # zstd


def test_bad_options_and_a_failing_stream_leave_nothing(tmp_path: Path) -> None:
    with pytest.raises(ConvertError, match="block size 1000"):
        SquashfsSpec(block_size=1000)
    with pytest.raises(ConvertError, match="unknown squashfs compressor"):
        SquashfsCompressor.parse("brotli")
    out = tmp_path / "bad.squashfs"

    def garbage(sink: object) -> None:
        assert hasattr(sink, "write")
        sink.write(b"not a tar" * 1000)

    with pytest.raises(CommandError, match="tar2sqfs"):
        write_squashfs(garbage, out)
    assert list(tmp_path.iterdir()) == []
