"""Fuzzing the readers `verify` and the disk:/iso: sources run on untrusted artifacts: the
ext reader (diskimage.extfs), the tar reader (TarTree) and the newc cpio reader
(CpioTree). Mutated inputs must give a tree or an Oci2DiskError, never another
exception or a hang.

Bounded like test_fuzz_oci.py (OCI2DISK_FUZZ_EXAMPLES, OCI2DISK_FUZZ_RANDOM); crashers
found are kept as @example regression cases.
"""

from __future__ import annotations

import contextlib
import io
import os
import subprocess
from pathlib import Path

import hypothesis.strategies as st
import pytest
from hypothesis import HealthCheck, given, settings

from layerkit import directory, file, hardlink, symlink, tar_bytes
from oci2disk.convert.cpio import write_cpio
from oci2disk.diskimage import extfs
from oci2disk.errors import Oci2DiskError
from oci2disk.rootfs import Tree
from oci2disk.rootfs.archives import CpioTree, TarTree

FUZZ_EXAMPLES = int(os.environ.get("OCI2DISK_FUZZ_EXAMPLES", "150"))
FUZZ = settings(
    max_examples=FUZZ_EXAMPLES,
    deadline=None,
    derandomize=not os.environ.get("OCI2DISK_FUZZ_RANDOM"),
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
    database=None,
)
READ = 1 << 16  # bytes read of each file: a corrupt size must not make a run long

MEMBERS = [
    directory("etc"),
    file("etc/hostname", b"vm\n"),
    file("etc/big", bytes(range(256)) * 300, xattrs={"user.k": b"v"}),
    symlink("etc/link", "hostname"),
    symlink("etc/long", "x" * 200),
    hardlink("etc/again", "etc/hostname"),
    directory("var/lib/deep/er"),
    file("var/lib/deep/er/f", b"deep"),
]


def walk(tree: Tree) -> None:
    """Everything a verify does with a tree: every entry, lookups, file content."""
    for entry in tree.entries():
        tree.lookup(entry.path)
        if entry.kind.value == "file":
            with tree.open(entry.path) as f:
                f.read(READ)


def mutate(data: bytes, edits: list[tuple[int, int]], limit: int) -> bytes:
    out = bytearray(data)
    for at, value in edits:
        out[at % min(limit, len(out))] = value
    return bytes(out)


EDITS = st.lists(st.tuples(st.integers(0, 2**20), st.integers(0, 255)), min_size=1, max_size=12)


@pytest.fixture(scope="module")
def ext4_image(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    """A small ext4 image made with mke2fs -d, as oci2disk makes them."""
    folder = tmp_path_factory.mktemp("ext4")
    root = folder / "root"
    for name, data in (("etc/hostname", b"vm\n"), ("etc/big", bytes(range(256)) * 300)):
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(data)
    (root / "etc/link").symlink_to("hostname")
    (root / "etc/long").symlink_to("x" * 200)
    os.link(root / "etc/hostname", root / "etc/again")
    (root / "var/lib/deep/er").mkdir(parents=True)
    (root / "var/lib/deep/er/f").write_bytes(b"deep")
    image = folder / "fs.img"
    subprocess.run(
        ["mke2fs", "-q", "-t", "ext4", "-b", "1024", "-d", str(root), str(image), "1M"],
        check=True,
        capture_output=True,
        env={**os.environ, "E2FSPROGS_FAKE_TIME": "1700000000"},
    )
    return image.read_bytes()


@FUZZ
@given(edits=EDITS)
def test_fuzz_ext_reader(ext4_image: bytes, edits: list[tuple[int, int]], tmp_path: Path) -> None:
    # The superblock, group descriptors, bitmaps and inode tables are in the first
    # 64 KiB of a 1 MiB filesystem with 1 KiB blocks; file data and directories after.
    image = tmp_path / "fs.img"
    image.write_bytes(mutate(ext4_image, edits, 1 << 16))
    with contextlib.suppress(Oci2DiskError), extfs.open_filesystem(image) as fs:
        walk(fs)


@pytest.fixture(scope="module")
def tar_image() -> bytes:
    return tar_bytes(MEMBERS)


@FUZZ
@given(edits=EDITS, cut=st.integers(0, 1 << 16))
def test_fuzz_tar_reader(
    tar_image: bytes, edits: list[tuple[int, int]], cut: int, tmp_path: Path
) -> None:
    data = mutate(tar_image, edits, 4096)[: len(tar_image) - cut % 512 * 8]
    path = tmp_path / "rootfs.tar"
    path.write_bytes(data)
    with contextlib.suppress(Oci2DiskError):
        walk(TarTree(path))
    with contextlib.suppress(Oci2DiskError):
        TarTree.from_stream(io.BytesIO(data))


@pytest.fixture(scope="module")
def cpio_image(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    """The newc archive oci2disk's cgz writer makes of the same files."""
    source = tmp_path_factory.mktemp("cpio") / "rootfs.tar"
    source.write_bytes(tar_bytes(MEMBERS))
    out = io.BytesIO()
    write_cpio(TarTree(source), out)
    return out.getvalue()


@FUZZ
@given(edits=EDITS, tail=st.binary(max_size=64))
def test_fuzz_cpio_reader(
    cpio_image: bytes, edits: list[tuple[int, int]], tail: bytes, tmp_path: Path
) -> None:
    data = mutate(cpio_image, edits, len(cpio_image)) + tail
    path = tmp_path / "initrd.cpio"
    path.write_bytes(data)
    with contextlib.suppress(Oci2DiskError):
        walk(CpioTree(path))
