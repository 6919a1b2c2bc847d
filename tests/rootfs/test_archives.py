"""TarTree, CpioTree and DirectoryTree: the same rootfs read from a tar, a cpio and a
directory gives the same entries, links and content."""

from __future__ import annotations

import gzip
import hashlib
import io
import lzma
import os
import subprocess
import tarfile
from collections.abc import Callable
from pathlib import Path

import pytest
import zstandard

from oci2disk.errors import VerifyError
from oci2disk.rootfs import Kind, Tree, follow, with_digests
from oci2disk.rootfs.archives import CpioTree, TarTree
from oci2disk.rootfs.directory import DirectoryTree
from oci2disk.verify import compare

HELLO = b"hello, world\n"
BIG = bytes(range(256)) * 5000


def _plain(data: bytes) -> bytes:
    return data


def _gzip(data: bytes) -> bytes:
    return gzip.compress(data, mtime=0)


def _zstd(data: bytes) -> bytes:
    return zstandard.ZstdCompressor().compress(data)


COMPRESSORS: dict[str, Callable[[bytes], bytes]] = {
    "plain": _plain,
    "gzip": _gzip,
    "zstd": _zstd,
    "xz": lzma.compress,
}


def rootfs_tar() -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as archive:

        def add(name: str, kind: bytes, data: bytes = b"", **fields: object) -> None:
            info = tarfile.TarInfo(name)
            info.type = kind
            info.mode = int(str(fields.pop("mode", 0o644)))
            for key, value in fields.items():
                setattr(info, key, value)
            info.size = len(data) if kind == tarfile.REGTYPE else 0
            archive.addfile(info, io.BytesIO(data) if kind == tarfile.REGTYPE else None)

        add("./", tarfile.DIRTYPE, mode=0o755)
        add("./etc/", tarfile.DIRTYPE, mode=0o755)
        add("./etc/hello", tarfile.REGTYPE, HELLO, uid=33, gid=33)
        add("./etc/hello-again", tarfile.LNKTYPE, linkname="./etc/hello")
        add("./etc/big", tarfile.REGTYPE, BIG, pax_headers={"mtime": "1700000000.25"})
        add("./etc/link", tarfile.SYMTYPE, linkname="hello", mode=0o777)
        add(
            "./etc/tagged",
            tarfile.REGTYPE,
            b"x",
            pax_headers={"LIBARCHIVE.xattr.user.caf%C3%A9": "YmluYXJ5AP8"},
        )
        add("./dev/", tarfile.DIRTYPE, mode=0o755)
        add("./dev/null", tarfile.CHRTYPE, mode=0o666, devmajor=1, devminor=3)
    return buf.getvalue()


@pytest.mark.parametrize("compression", COMPRESSORS)
def test_tar_tree(tmp_path: Path, compression: str) -> None:
    path = tmp_path / "rootfs.tar"
    path.write_bytes(COMPRESSORS[compression](rootfs_tar()))
    tree = TarTree(path)
    assert isinstance(tree, Tree)
    entries = {e.path: e for e in tree.entries()}
    assert list(entries) == [
        ".", "etc", "etc/hello", "etc/hello-again", "etc/big", "etc/link", "etc/tagged",
        "dev", "dev/null",
    ]  # fmt: skip
    hello, again = entries["etc/hello"], entries["etc/hello-again"]
    assert again.kind is Kind.FILE and (again.uid, again.gid, again.size) == (33, 33, len(HELLO))
    assert hello.digest == again.digest == hashlib.sha256(HELLO).hexdigest()
    assert hello.link_group == again.link_group == "etc/hello"
    assert again.hardlink_to == "etc/hello" and hello.hardlink_to == ""
    assert entries["etc/big"].mtime_ns == 1_700_000_000_250_000_000
    assert entries["etc/tagged"].xattrs == (("user.café", b"binary\0\xff"),)
    assert (entries["dev/null"].kind, entries["dev/null"].devmajor) == (Kind.CHAR, 1)
    assert tree.lookup("/etc/link") == entries["etc/link"]
    assert follow(tree, "etc/link") == hello
    with tree.open("etc/hello-again") as stream:
        assert stream.read() == HELLO
    with tree.open("./etc/big") as stream:
        stream.read(1000)
        assert stream.read(10) == BIG[1000:1010]
    with pytest.raises(VerifyError, match="no regular file"):
        tree.open("etc")


def test_a_tar_read_from_a_stream_cannot_be_opened_again() -> None:
    tree = TarTree.from_stream(io.BytesIO(rootfs_tar()))
    assert tree.lookup("etc/hello") is not None
    with pytest.raises(VerifyError, match="read from a stream"):
        tree.open("etc/hello")


def make_directory(root: Path) -> Path:
    (root / "etc").mkdir(parents=True)
    (root / "etc" / "hello").write_bytes(HELLO)
    os.link(root / "etc" / "hello", root / "etc" / "hello-again")
    (root / "etc" / "big").write_bytes(BIG)
    (root / "etc" / "link").symlink_to("hello")
    (root / "empty").write_bytes(b"")
    os.mkfifo(root / "fifo")
    return root


def test_directory_tree(tmp_path: Path) -> None:
    root = make_directory(tmp_path / "root")
    tree = DirectoryTree(root)
    assert isinstance(tree, Tree)
    paths = [e.path for e in tree.entries()]
    assert paths == [
        ".", "empty", "etc", "etc/big", "etc/hello", "etc/hello-again", "etc/link", "fifo",
    ]  # fmt: skip
    again = tree.lookup("etc/hello-again")
    assert again is not None and again.link_group == "etc/hello"
    assert DirectoryTree(root).lookup("etc/hello-again") == again  # lookup before entries()
    assert tree.lookup("etc/missing") is None and tree.lookup("empty/x") is None
    assert follow(tree, "etc/link") == tree.lookup("etc/hello")
    with tree.open("etc/hello-again") as stream:
        assert stream.read() == HELLO
    with pytest.raises(VerifyError, match="cannot open"):
        tree.open("etc/link")
    with pytest.raises(VerifyError, match="not a regular file"):
        tree.open("fifo")


@pytest.mark.parametrize("compression", ["plain", "gzip"])
def test_cpio_tree_matches_the_directory_gnu_cpio_packed(tmp_path: Path, compression: str) -> None:
    root = make_directory(tmp_path / "root")
    names = subprocess.run(["find", "."], cwd=root, capture_output=True, check=True).stdout
    packed = subprocess.run(
        ["cpio", "-o", "-H", "newc", "--quiet"],
        input=names,
        cwd=root,
        capture_output=True,
        check=True,
    ).stdout
    path = tmp_path / "root.cpio"
    path.write_bytes(COMPRESSORS[compression](packed))
    tree = CpioTree(path)
    assert isinstance(tree, Tree)
    hello, again = tree.lookup("etc/hello"), tree.lookup("etc/hello-again")
    # GNU cpio stores a link set's data once, on its last name: both get it.
    assert hello is not None and again is not None
    assert hello.size == again.size == len(HELLO)
    assert hello.digest == again.digest == hashlib.sha256(HELLO).hexdigest()
    assert hello.link_group == again.link_group != ""
    for name in ("etc/hello", "etc/hello-again"):
        with tree.open(name) as stream:
            assert stream.read() == HELLO
    assert compare(with_digests(DirectoryTree(root)), tree.entries()) == []


def test_cpio_errors(tmp_path: Path) -> None:
    bad = tmp_path / "bad.cpio"
    bad.write_bytes(b"070707" + bytes(200))
    with pytest.raises(VerifyError, match="not a newc cpio archive"):
        CpioTree(bad)
    short = tmp_path / "short.cpio"
    short.write_bytes(b"070701" + b"0" * 50)
    with pytest.raises(VerifyError, match="ends early"):
        CpioTree(short)
