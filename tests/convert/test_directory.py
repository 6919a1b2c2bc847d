"""The dir output: the rootfs extracted for an nfsroot, exact as root, honest without root."""

from __future__ import annotations

import errno
import os
import subprocess
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import cast

import pytest

from clikit import oci2disk
from layerkit import Member, device, directory, fifo, file, hardlink, make_image, symlink
from oci2disk.convert import ConvertOptions, convert
from oci2disk.convert.directory import _xattr_failure, extract
from oci2disk.errors import ConvertError
from oci2disk.recipe import Format
from oci2disk.rootfs import Entry, Kind, with_digests
from oci2disk.rootfs.archives import TarTree
from oci2disk.rootfs.directory import DirectoryTree
from oci2disk.rootfs.flat import FlatRootfs
from oci2disk.rootfs.flatten import flatten
from oci2disk.verify import compare
from oci2disk.workspace import Workspace
from outputkit import convert_to, image_of, image_records

NOBODY = 65534
CAP_NET_RAW = bytes.fromhex("0100000200200000000000000000000000000000")

SAMPLE: list[Member] = [
    directory("etc"),
    file("etc/passwd", b"root:x:0:0::/root:/bin/sh\n"),
    file("etc/shadow", b"root:*:1::::::\n", mode=0o640, gid=42),
    symlink("etc/localtime", "/usr/share/zoneinfo/UTC"),
    directory("home/alice", mode=0o750, uid=1000, gid=1000),
    file("home/alice/notes", b"alice's\n", mode=0o600, uid=1000, gid=1000),
    directory("srv", uid=2000, gid=3000, mode=0o2775),
    file("srv/data", b"x" * 200_000, uid=2000, gid=3000),
    directory("tmp", mode=0o1777),
    directory("ro", mode=0o555),
    file("ro/locked", b"no write", mode=0o400),
    file("usr/bin/su", b"\x7fELF-su", mode=0o4755),
    hardlink("usr/bin/su-again", "usr/bin/su", mode=0o4755),
    file("usr/bin/ping", b"\x7fELF-ping", mode=0o755, xattrs={"security.capability": CAP_NET_RAW}),
    file("usr/bin/tagged", b"tagged", xattrs={"user.origin": b"oci2disk-test"}),
    file("usr/share/trusted", b"t", xattrs={"trusted.overlay.x": b"y"}),
    symlink("bin", "usr/bin"),
    # symlinks that point out of the tree must stay symlinks and lead nowhere
    symlink("hostetc", "/etc"),
    symlink("up", "../../../../.."),
    directory("dev"),
    device("dev/null", 1, 3, mode=0o666),
    device("dev/sda", 8, 0, block=True, mode=0o660),
    fifo("run/initctl", mode=0o600),
    file("empty"),
]


def directory_entries(target: Path) -> list[Entry]:
    """The entries of a directory with content digests, as verify reads them."""
    return list(with_digests(DirectoryTree(target)))


@pytest.mark.skipif(os.geteuid() != 0, reason="exact owners and devices need root")
def test_as_root_the_directory_equals_the_image(tmp_path: Path) -> None:
    image = image_of(tmp_path, SAMPLE)
    target = tmp_path / "nfsroot"
    result = convert_to(image, {Format.DIR: target})
    assert result.warnings == ()
    assert compare(image_records(image), directory_entries(target)) == []
    assert (target / "usr/bin/su").stat().st_ino == (target / "usr/bin/su-again").stat().st_ino
    assert os.readlink(target / "hostetc") == "/etc"
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []
    (artifact,) = result.artifacts
    assert artifact.format is Format.DIR and artifact.path == target
    assert len(artifact.sha256) == 64


def test_the_tree_digest_names_the_content(tmp_path: Path) -> None:
    image = image_of(tmp_path, SAMPLE)
    first = convert_to(image, {Format.DIR: tmp_path / "a"}).artifacts[0].sha256
    second = convert_to(image, {Format.DIR: tmp_path / "b"}).artifacts[0].sha256
    other = image_of(tmp_path / "o", [*SAMPLE, file("etc/hostname", b"other\n")])
    third = convert_to(other, {Format.DIR: tmp_path / "c"}).artifacts[0].sha256
    assert first == second != third


def test_a_second_run_replaces_the_directory_whole(tmp_path: Path) -> None:
    target = tmp_path / "nfsroot"
    convert_to(image_of(tmp_path / "one", [*SAMPLE, file("old-only", b"1")]), {Format.DIR: target})
    second = image_of(tmp_path / "two", SAMPLE)
    with pytest.raises(ConvertError, match="not empty"):
        convert_to(second, {Format.DIR: target})  # replacing deletes: only when asked
    convert_to(second, {Format.DIR: target}, ConvertOptions(replace=True))
    assert not (target / "old-only").exists()
    assert (target / "etc/passwd").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["nfsroot", "one", "two"]


def test_a_failing_output_leaves_no_directory_behind(tmp_path: Path) -> None:
    # The cgz fails (no /init) while the dir is being written: neither is left behind.
    image = image_of(tmp_path, SAMPLE)
    with pytest.raises(ConvertError, match="no /init"):
        convert_to(image, {Format.DIR: tmp_path / "nfsroot", Format.CGZ: tmp_path / "i.cgz"})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["layout"]


def test_without_root_it_keeps_what_it_can_and_says_what_it_could_not(outdir: Path) -> None:
    make_image(outdir / "layout", [SAMPLE])
    target = outdir / "nfsroot"
    result = oci2disk(
        "convert", f"oci:{outdir / 'layout'}:test", "-f", "dir", "-o", str(target), user=NOBODY
    )
    assert result.code == 0, result.stderr
    err = result.stderr
    assert "could not keep the owner of" in err and f"running as uid {NOBODY}" in err
    assert "could not create 2 device node(s)" in err and "/dev/null, /dev/sda" in err
    # each xattr with what really happened to it
    assert "/usr/bin/ping (security.capability: security.* needs root)" in err
    assert "/usr/share/trusted (trusted.overlay.x: trusted.* needs root)" in err
    # a setuid file owned by the invoking user runs as that user: said, not silent
    assert f"set-user/group-ID file(s) now belong to uid {NOBODY}" in err
    assert "/usr/bin/su" in err.split("set-user/group-ID")[1].splitlines()[0]
    assert "run oci2disk as root for an exact copy" in err

    got = {r.path: r for r in directory_entries(target)}
    want = {r.path: r for r in image_records(make_image(outdir / "layout2", [SAMPLE]))}
    assert "dev/null" not in got and "dev/sda" not in got
    for path, record in want.items():
        if record.kind.is_device:
            continue
        mine = got[path]
        # data, modes (setuid too), links and user xattrs are kept; owners are not
        keep_xattrs = tuple(x for x in record.xattrs if x[0].startswith("user."))
        expected = replace(record, uid=NOBODY, gid=NOBODY, xattrs=keep_xattrs)
        assert compare([expected], [replace(mine, path=path)]) == [], path
    assert got["run/initctl"].kind is Kind.FIFO
    assert got["usr/bin/su"].link_group == got["usr/bin/su-again"].link_group != ""
    # the symlinks that point out of the tree stay symlinks; nothing lands beside the target
    assert (target / "up").is_symlink() and (target / "hostetc").is_symlink()
    assert sorted(p.name for p in outdir.iterdir()) == [
        "layout",
        "layout2",
        "nfsroot",
        "nfsroot.manifest.json",
    ]


@pytest.mark.slow
@pytest.mark.docker
@pytest.mark.skipif(os.geteuid() != 0, reason="exact owners and devices need root")
def test_debian_rootfs_as_root_equals_the_image(base_image: str, outdir: Path) -> None:
    from oci2disk.oci.source import open_image
    from oci2disk.refs import parse_ref

    target = outdir / "nfsroot"
    with Workspace() as ws:
        image = open_image(parse_ref(f"docker-daemon:{base_image}"), ws.path)
        with flatten(image, ws.subdir("flat")) as rootfs:
            result = convert(image, rootfs, {Format.DIR: target}, ConvertOptions(), ws)
            tar = ws.path / "rootfs.tar"
            with tar.open("wb") as f:
                rootfs.write_tar(f)
        expected = list(TarTree(tar).entries())
    assert result.warnings == ()
    assert len(expected) > 5000
    assert any(r.kind is Kind.CHAR for r in expected)
    assert compare(expected, directory_entries(target)) == []
    os_release = subprocess.run(
        ["cat", str(target / "usr/lib/os-release")], capture_output=True, text=True, check=True
    )
    assert "bookworm" in os_release.stdout


class _HostileRootfs:
    """Entries the flattener would never give (a path through a symlink), to show that
    extraction refuses to follow one even so."""

    def __init__(self, outside: Path) -> None:
        self.outside = outside

    def entries(self) -> Iterator[Entry]:
        yield Entry(".", Kind.DIR, 0o755)
        yield Entry("evil", Kind.SYMLINK, 0o777, linkname=os.fspath(self.outside))
        yield Entry("evil/pwned", Kind.FILE, 0o644)


def test_extraction_never_writes_through_a_symlink(tmp_path: Path) -> None:
    outside, target = tmp_path / "outside", tmp_path / "target"
    outside.mkdir()
    target.mkdir()
    hostile = cast(FlatRootfs, _HostileRootfs(outside))
    with pytest.raises(ConvertError, match="cannot open /evil as a directory"):
        extract(hostile, target)
    assert list(outside.iterdir()) == []


def test_a_sparse_file_stays_sparse(tmp_path: Path) -> None:
    data = b"head" + bytes(8 << 20) + b"tail"
    image = image_of(tmp_path, [directory("srv"), file("srv/sparse", data)])
    target = tmp_path / "nfsroot"
    convert_to(image, {Format.DIR: target})
    written = target / "srv/sparse"
    assert written.read_bytes() == data
    assert written.stat().st_blocks * 512 < 1 << 20  # the zeros are holes, not blocks


def test_xattr_failures_say_what_happened() -> None:
    denied = OSError(errno.EPERM, "Operation not permitted")
    unsupported = OSError(errno.EOPNOTSUPP, "Operation not supported")
    assert _xattr_failure("security.capability", denied) == "security.* needs root"
    acl = _xattr_failure("system.posix_acl_access", unsupported)
    assert acl == "the target filesystem does not take POSIX ACLs"
    assert _xattr_failure("system.posix_acl_access", OSError(errno.EINVAL, "Invalid argument")) == (
        "Invalid argument"
    )
