"""The manifest's sha256 skips reading holes but must equal a plain full read."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest

from oci2disk.bytestreams import copy_sparse, sha256_file

MiB = 1 << 20


@pytest.mark.parametrize(
    "writes",
    [
        [],  # all hole
        [(0, b"start")],  # data at the very start, hole to the end
        [(3 * MiB + 7, os.urandom(MiB + 3))],  # data in the middle, unaligned
        [(0, b"a"), (20 * MiB - 1, b"z")],  # data at both ends
        [(i * MiB, os.urandom(4096)) for i in range(0, 20, 3)],  # many runs
    ],
)
def test_sparse_file_hash_equals_full_read(tmp_path: Path, writes: list[tuple[int, bytes]]) -> None:
    path = tmp_path / "disk.raw"
    with path.open("wb") as f:
        f.truncate(20 * MiB)
        for offset, data in writes:
            f.seek(offset)
            f.write(data)
    assert sha256_file(path) == hashlib.sha256(path.read_bytes()).hexdigest()


def test_dense_file(tmp_path: Path) -> None:
    path = tmp_path / "dense"
    path.write_bytes(os.urandom(5 * MiB + 1))
    assert sha256_file(path) == hashlib.sha256(path.read_bytes()).hexdigest()


def _allocated(path: Path) -> int:
    return path.stat().st_blocks * 512


def test_copy_sparse_copies_data_and_keeps_holes(tmp_path: Path) -> None:
    """A mostly-empty 64 MiB image (an ESP) copied into a bigger file at an offset:
    the bytes match, and the holes cost the target nothing."""
    src, dst = tmp_path / "esp.img", tmp_path / "disk.raw"
    with src.open("wb") as f:
        f.truncate(64 << 20)
        for offset, data in ((0, b"boot" * 128), (1 << 20, os.urandom(8192)), (40 << 20, b"x")):
            f.seek(offset)
            f.write(data)
    with dst.open("wb") as f:
        f.truncate(256 << 20)
    with src.open("rb") as s, dst.open("r+b") as d:
        copy_sparse(s.fileno(), d.fileno(), 64 << 20, 0, 3 << 20)
    copied = dst.read_bytes()[3 << 20 : 67 << 20]
    assert copied == src.read_bytes()
    assert _allocated(dst) < 1 << 20


def test_copy_sparse_zeroes_old_data_under_the_source_holes(tmp_path: Path) -> None:
    """Where the source is a hole and the target held something, the target ends up
    zero there: the copied range equals the source whatever was under it."""
    src, dst = tmp_path / "src", tmp_path / "dst"
    with src.open("wb") as f:
        f.truncate(4 << 20)
        f.write(b"head")
    dst.write_bytes(b"\xff" * (6 << 20))
    with src.open("rb") as s, dst.open("r+b") as d:
        copy_sparse(s.fileno(), d.fileno(), 4 << 20, 0, 1 << 20)
    data = dst.read_bytes()
    assert data[: 1 << 20] == b"\xff" * (1 << 20)
    assert data[1 << 20 : 5 << 20] == src.read_bytes()
    assert data[5 << 20 :] == b"\xff" * (1 << 20)
