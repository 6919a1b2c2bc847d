"""The manifest's sha256 skips reading holes but must equal a plain full read."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest

from oci2disk.bytestreams import sha256_file

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
