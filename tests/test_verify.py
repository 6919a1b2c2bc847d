"""verify: a disk made by mke2fs matches its tar; each kind of damage is named exactly."""

from __future__ import annotations

import hashlib
import io
import os
import struct
import subprocess
import tarfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from layerkit import TAG, Member, directory, file, hardlink, make_image, symlink
from oci2disk import run
from oci2disk.convert import ConvertOptions, Format, convert
from oci2disk.diskimage.extfs import ExtFs, open_filesystem
from oci2disk.errors import VerifyError
from oci2disk.recipe import InitramfsSpec
from oci2disk.rootfs import Entry, Kind, with_digests
from oci2disk.rootfs.archives import TarTree
from oci2disk.rootfs.flatten import flatten
from oci2disk.verify import Difference, compare, fsck, verify_artifact
from oci2disk.workspace import Workspace

MTIME = 1_700_000_000
MIB = 1 << 20
NON_UTF8 = b"caf\xe9".decode("utf-8", "surrogateescape")
CAPABILITY = struct.pack("<5I", 0x02000001, 1 << 13, 0, 0, 0)
CAPABILITY_SHOWN = "security.capability=0x" + CAPABILITY.hex()
HELLO = b"hello, world\n"
MEDIUM = bytes(range(256)) * 1200  # 300 KiB: several blocks, some indirection


def entry(
    name: str,
    kind: bytes = tarfile.REGTYPE,
    *,
    mode: int = 0o644,
    uid: int = 0,
    gid: int = 0,
    data: bytes = b"",
    linkname: str = "",
    dev: tuple[int, int] = (0, 0),
    xattrs: dict[str, bytes] | None = None,
) -> tuple[tarfile.TarInfo, bytes]:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.mode, info.uid, info.gid, info.mtime = mode, uid, gid, MTIME
    info.linkname = linkname
    info.devmajor, info.devminor = dev
    info.size = len(data)
    info.pax_headers = {
        "SCHILY.xattr." + key: value.decode("utf-8", "surrogateescape")
        for key, value in (xattrs or {}).items()
    }
    return info, data


def rootfs_entries() -> list[tuple[tarfile.TarInfo, bytes]]:
    return [
        entry(".", tarfile.DIRTYPE, mode=0o755),
        entry("bin", tarfile.DIRTYPE, mode=0o755),
        entry("bin/dash", mode=0o755, data=b"dash"),
        entry("bin/ping", mode=0o755, data=b"ping", xattrs={"security.capability": CAPABILITY}),
        entry("bin/sh", tarfile.SYMTYPE, mode=0o777, linkname="dash"),
        entry("bin/su", mode=0o4755, data=b"su"),
        entry("data", tarfile.DIRTYPE, mode=0o755),
        entry("data/hello", mode=0o640, uid=33, gid=33, data=HELLO),
        # A link entry carries its target's metadata (mke2fs applies it to the inode).
        entry(
            "data/hello-link", tarfile.LNKTYPE, mode=0o640, uid=33, gid=33, linkname="data/hello"
        ),
        entry("data/medium", data=MEDIUM),
        entry("dev", tarfile.DIRTYPE, mode=0o755),
        entry("dev/null", tarfile.CHRTYPE, mode=0o666, dev=(1, 3)),
        entry("dev/dm-0", tarfile.BLKTYPE, mode=0o660, gid=6, dev=(253, 300)),
        entry("etc", tarfile.DIRTYPE, mode=0o755),
        entry("etc/hostname", data=b"box\n"),
        entry("home", tarfile.DIRTYPE, mode=0o755),
        entry("home/alice", tarfile.DIRTYPE, mode=0o700, uid=1000, gid=1000),
        entry("home/alice/notes", mode=0o600, uid=1000, gid=1000, data=b"notes\n"),
        entry(NON_UTF8, data=b"latin-1 name\n"),
        entry("run", tarfile.DIRTYPE, mode=0o755),
        entry("run/initctl", tarfile.FIFOTYPE, mode=0o600),
        entry("srv", tarfile.DIRTYPE, mode=0o750, uid=100000, gid=200000),
        entry("srv/wide", uid=100000, gid=4000000000, data=b"wide\n"),
        entry("usr", tarfile.DIRTYPE, mode=0o755),
        entry("usr/long", tarfile.SYMTYPE, mode=0o777, linkname="../" + "x" * 90),
    ]


def write_tar(path: Path, entries: list[tuple[tarfile.TarInfo, bytes]]) -> Path:
    with tarfile.open(
        path, "w", format=tarfile.PAX_FORMAT, encoding="utf-8", errors="surrogateescape"
    ) as archive:
        for info, data in entries:
            archive.addfile(info, io.BytesIO(data) if info.isreg() else None)
    return path


def mke2fs(image: Path, tar: Path, *extra: str, size: str = "16M") -> Path:
    options = ["-q", "-F", "-t", "ext4", "-d", str(tar), "-E", "root_owner=0:0", *extra]
    run.run(["mke2fs", *options, str(image), size])
    return image


def debugfs_w(device: str | Path, *commands: str) -> None:
    """Change an image with debugfs, which exits 0 even when a command fails."""
    proc = run.run(
        ["debugfs", "-w", "-f", "-", str(device)],
        input="".join(command + "\n" for command in commands).encode(),
    )
    errors = [
        line for line in proc.stderr.decode().splitlines() if not line.startswith("debugfs 1.")
    ]
    assert not errors, errors


@pytest.fixture(scope="module")
def rootfs_tar(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tar(tmp_path_factory.mktemp("tar") / "rootfs.tar", rootfs_entries())


def tar_records(tar: Path) -> list[Entry]:
    return list(TarTree(tar).entries())


def fs_records(image: Path | str, offset: int = 0) -> list[Entry]:
    with ExtFs(Path(image), offset) as fs:
        return list(with_digests(fs))


def test_tar_tree(rootfs_tar: Path) -> None:
    records = {record.path: record for record in tar_records(rootfs_tar)}
    assert "." in records and "./bin" not in records and "bin" in records
    hello, link = records["data/hello"], records["data/hello-link"]
    assert link.kind is Kind.FILE
    assert link.digest == hello.digest == hashlib.sha256(HELLO).hexdigest()
    assert (link.size, link.mode, link.uid, link.gid) == (len(HELLO), 0o640, 33, 33)
    assert hello.link_group == link.link_group == "data/hello"
    assert records["etc/hostname"].link_group == ""
    assert records["bin/ping"].xattrs == (("security.capability", CAPABILITY),)
    assert records["bin/su"].mode == 0o4755
    assert (
        records["dev/dm-0"].kind,
        records["dev/dm-0"].devmajor,
        records["dev/dm-0"].devminor,
    ) == (
        Kind.BLOCK,
        253,
        300,
    )
    assert records["bin/sh"].linkname == "dash"
    assert records[NON_UTF8].digest == hashlib.sha256(b"latin-1 name\n").hexdigest()
    assert (records["srv/wide"].uid, records["srv/wide"].gid) == (100000, 4000000000)


def test_tar_tree_reads_a_pipe(rootfs_tar: Path) -> None:
    class Pipe(io.RawIOBase):
        """Not seekable, like the stdout of a flattener."""

        def __init__(self, data: bytes) -> None:
            self._data = io.BytesIO(data)

        def readable(self) -> bool:
            return True

        def readinto(self, buffer: bytearray | memoryview) -> int:  # type: ignore[override]
            return self._data.readinto(buffer)

    pipe = io.BufferedReader(Pipe(rootfs_tar.read_bytes()))
    assert list(TarTree.from_stream(pipe).entries()) == tar_records(rootfs_tar)


def test_tar_tree_rejects_dangling_hard_link(tmp_path: Path) -> None:
    tar = write_tar(tmp_path / "bad.tar", [entry("b", tarfile.LNKTYPE, linkname="a")])
    with pytest.raises(VerifyError, match="hard link to 'a'"):
        tar_records(tar)


def test_libarchive_xattr_headers(tmp_path: Path) -> None:
    info, data = entry("f", data=b"x")
    info.pax_headers = {"LIBARCHIVE.xattr.user.caf%C3%A9": "YmluYXJ5AP8"}  # base64, unpadded
    records = tar_records(write_tar(tmp_path / "la.tar", [(info, data)]))
    assert records[0].xattrs == (("user.café", b"binary\0\xff"),)


def test_disk_matches_its_tar(tmp_path: Path, rootfs_tar: Path) -> None:
    image = mke2fs(tmp_path / "fs.img", rootfs_tar)
    expected, actual = tar_records(rootfs_tar), fs_records(image)
    assert compare(expected, actual, ignore=["lost+found"]) == []
    assert compare(expected, actual) == [Difference("lost+found", "extra", "", "dir")]
    links = {r.path: r.link_group for r in actual if r.link_group}
    assert links == {"data/hello": "data/hello", "data/hello-link": "data/hello"}
    assert {r.path for r in actual} >= {NON_UTF8, "."}


def test_disk_with_partition_table_matches(tmp_path: Path, rootfs_tar: Path) -> None:
    disk = tmp_path / "disk.raw"
    with disk.open("wb") as handle:
        handle.truncate(20 * MIB)
    run.run(["sfdisk", "-q", str(disk)], input=b"label: gpt\nstart=2048, type=linux\n")
    mke2fs(disk, rootfs_tar, "-E", "offset=1048576")
    with open_filesystem(disk) as fs:
        actual = list(with_digests(fs))
    assert compare(tar_records(rootfs_tar), actual, ignore=["/lost+found/"]) == []
    fsck(disk, MIB)


def _host_file(tmp_path: Path, name: str, data: bytes) -> str:
    path = tmp_path / name
    path.write_bytes(data)
    return str(path)


# Each change made with debugfs -> exactly the differences verify must report.
CHANGES: dict[str, tuple[list[str], list[Difference]]] = {
    "owner": (["sif /etc/hostname uid 5"], [Difference("etc/hostname", "owner", "0:0", "5:0")]),
    "group of a 32-bit owner": (
        ["sif /srv/wide gid 7"],
        [Difference("srv/wide", "owner", "100000:4000000000", "100000:7")],
    ),
    "removed": (["rm /etc/hostname"], [Difference("etc/hostname", "missing", "file", "")]),
    "added": (
        ["cd /etc", "write {other4} extra"],
        [Difference("etc/extra", "extra", "", "file")],
    ),
    "content": (
        [
            "rm /etc/hostname",
            "cd /etc",
            "write {other4} hostname",
            "sif /etc/hostname uid 0",
            "sif /etc/hostname gid 0",
            "sif /etc/hostname mode 0100644",
        ],
        [
            Difference(
                "etc/hostname",
                "content",
                hashlib.sha256(b"box\n").hexdigest(),
                hashlib.sha256(b"BOX\n").hexdigest(),
            )
        ],
    ),
    "setuid lost": (
        ["sif /bin/su mode 0100755"],
        [Difference("bin/su", "mode", "4755", "0755")],
    ),
    "root mode": (["sif / mode 040700"], [Difference(".", "mode", "0755", "0700")]),
    "size": (["sif /data/medium size 4096"], [Difference("data/medium", "size", "307200", "4096")]),
    "xattr added": (
        ["ea_set /bin/ping user.foo bar"],
        [Difference("bin/ping", "xattrs", CAPABILITY_SHOWN, CAPABILITY_SHOWN + ", user.foo=bar")],
    ),
    "capability lost": (
        ["ea_rm /bin/ping security.capability"],
        [Difference("bin/ping", "xattrs", CAPABILITY_SHOWN, "")],
    ),
    "device": (["sif /dev/null block[0] 0x0105"], [Difference("dev/null", "device", "1:3", "1:5")]),
    "symlink target": (
        ["rm /bin/sh", "symlink /bin/sh bash"],
        [Difference("bin/sh", "linkname", "dash", "bash")],
    ),
    "kind": (
        ["rm /run/initctl", "mkdir /run/initctl"],
        [Difference("run/initctl", "kind", "fifo", "dir")],
    ),
    "hard link broken": (
        [
            "rm /data/hello-link",
            "cd /data",
            "write {hello} hello-link",
            "sif /data/hello-link uid 33",
            "sif /data/hello-link gid 33",
            "sif /data/hello-link mode 0100640",
        ],
        [
            Difference("data/hello", "hardlink", "data/hello-link", "(no other links)"),
            Difference("data/hello-link", "hardlink", "data/hello", "(no other links)"),
        ],
    ),
}


@pytest.mark.parametrize("change", CHANGES)
def test_each_change_is_reported(tmp_path: Path, rootfs_tar: Path, change: str) -> None:
    commands, expected = CHANGES[change]
    files = {
        "other4": _host_file(tmp_path, "other4", b"BOX\n"),
        "hello": _host_file(tmp_path, "hello", HELLO),
    }
    image = mke2fs(tmp_path / "fs.img", rootfs_tar)
    debugfs_w(image, *(command.format(**files) for command in commands))
    differences = compare(tar_records(rootfs_tar), fs_records(image), ignore=["lost+found"])
    assert differences == expected


def test_ignore_skips_subtrees(tmp_path: Path, rootfs_tar: Path) -> None:
    image = mke2fs(tmp_path / "fs.img", rootfs_tar)
    debugfs_w(image, "rm /home/alice/notes", "sif /etc/hostname uid 9")
    expected, actual = tar_records(rootfs_tar), fs_records(image)
    assert compare(expected, actual, ignore=["lost+found", "home", "./etc/hostname"]) == []
    # "home" does not hide "homeward" and friends: only the path and what is below it.
    assert [d.path for d in compare(expected, actual, ignore=["lost+found", "hom"])] == [
        "etc/hostname",
        "home/alice/notes",
    ]


def go_style_link_tar(path: Path) -> Path:
    """A tar as Go's archive/tar writes it: the link entry's mode field has type bits."""
    write_tar(
        path,
        [
            entry(".", tarfile.DIRTYPE, mode=0o755),
            entry("a", data=HELLO),
            entry("b", tarfile.LNKTYPE, linkname="a"),
        ],
    )
    data = bytearray(path.read_bytes())
    for offset in range(0, len(data), 512):
        header = data[offset : offset + 512]
        if header[:2] == b"b\0" and header[156:157] == tarfile.LNKTYPE:
            data[offset + 100 : offset + 108] = b"0100644\0"
            data[offset + 148 : offset + 156] = b" " * 8
            data[offset + 148 : offset + 156] = b"%06o\0 " % sum(data[offset : offset + 512])
    path.write_bytes(bytes(data))
    return path


def test_catches_the_mke2fs_hard_link_trap(tmp_path: Path) -> None:
    # mke2fs turns such a link into an empty regular file.
    tar = go_style_link_tar(tmp_path / "go.tar")
    image = mke2fs(tmp_path / "fs.img", tar, size="4M")
    assert compare(tar_records(tar), fs_records(image), ignore=["lost+found"]) == [
        Difference("a", "hardlink", "b", "(no other links)"),
        Difference("b", "size", str(len(HELLO)), "0"),
        Difference("b", "hardlink", "a", "(no other links)"),
    ]


def record(path: str, kind: str = "file", **changes: object) -> Entry:
    fields: dict[str, object] = {
        "path": path,
        "kind": Kind(kind),
        "mode": 0o644,
        "uid": 0,
        "gid": 0,
        "size": 0,
        "digest": "",
        "linkname": "",
        "devmajor": 0,
        "devminor": 0,
        "xattrs": (),
    }
    fields.update(changes)
    return Entry(**fields)  # type: ignore[arg-type]


def test_compare_rules() -> None:
    expected = [
        record(".", "dir", mode=0o755),
        record("d", "dir", size=0),
        record("l", "symlink", mode=0o777, linkname="t"),
        record("f", size=3, digest="aa"),
        record("g", size=3, digest="aa"),
    ]
    actual = [
        # Directory sizes and symlink permission bits differ between tools: not compared.
        record("d", "dir", size=4096),
        record("l", "symlink", mode=0o755, linkname="t"),
        # A size difference already says the content differs.
        record("f", size=4, digest="bb"),
        record("g", "dir", mode=0o700, uid=5),
    ]
    # A tar without "." says nothing about the root, and a fs without it cannot exist.
    assert (
        compare(expected[1:], actual)
        == compare(expected, actual)
        == [
            Difference("f", "size", "3", "4"),
            Difference("g", "kind", "file", "dir"),
        ]
    )


def test_fsck(tmp_path: Path, rootfs_tar: Path) -> None:
    image = mke2fs(tmp_path / "fs.img", rootfs_tar, "-b", "4096")
    fsck(image, 0)
    with image.open("r+b") as handle:
        handle.seek(4096)  # the group descriptor block follows the superblock's block
        handle.write(bytes(4096))
    with pytest.raises(VerifyError, match=r"e2fsck finds errors[\s\S]*[Gg]roup descriptor"):
        fsck(image, 0)


def test_fsck_a_partition(tmp_path: Path, rootfs_tar: Path) -> None:
    disk = tmp_path / "disk.raw"
    with disk.open("wb") as handle:
        handle.truncate(20 * MIB)
    mke2fs(disk, rootfs_tar, "-E", "offset=2097152")
    fsck(disk, 2 * MIB)
    with pytest.raises(VerifyError, match="e2fsck"):
        fsck(disk, MIB)


def walk_paths(fs: ExtFs) -> Iterator[str]:
    return (entry.path for entry in fs.entries())


def test_non_utf8_name_round_trip(tmp_path: Path, rootfs_tar: Path) -> None:
    image = mke2fs(tmp_path / "fs.img", rootfs_tar)
    with ExtFs(image) as fs:
        assert NON_UTF8 in set(walk_paths(fs))
    assert b"caf\xe9" in run.run(["debugfs", "-R", "ls -p /", str(image)]).stdout
    tar = {r.path: r for r in tar_records(rootfs_tar)}[NON_UTF8]
    disk = {r.path: r for r in fs_records(image)}[NON_UTF8]
    assert tar == disk


VERIFY_SAMPLE: list[Member] = [
    directory("etc"),
    file("etc/hostname", b"box\n"),
    file("usr/bin/python3.11", b"python" * 5000, mode=0o755),
    hardlink("usr/bin/python3", "usr/bin/python3.11"),
    symlink("bin", "usr/bin"),
    file("usr/bin/su", b"su", mode=0o4755),
    file("sbin/init", b"#!/bin/sh\n", mode=0o755),
]


@pytest.mark.parametrize(
    ("fmt", "name"),
    [
        (Format.TAR, "root.tar"),
        (Format.CGZ, "root.cgz"),
        (Format.DIR, "root.d"),
        (Format.RAW, "disk.raw"),
        (Format.QCOW2, "disk.qcow2"),
    ],
)
def test_verify_artifact_reads_each_kind(tmp_path: Path, fmt: Format, name: str) -> None:
    """One reader per kind of artifact; the expected side is the flattened image."""
    image = make_image(tmp_path / "layout", [VERIFY_SAMPLE])
    out = tmp_path / name
    options = ConvertOptions(initramfs=InitramfsSpec(init="/sbin/init"))
    with Workspace() as ws, flatten(image, ws.subdir("flat")) as rootfs:
        result = convert(image, rootfs, {fmt: out}, options, ws)
    source = f"oci:{tmp_path / 'layout'}:{TAG}"
    # The same options as the conversion: the generated files are compared, not skipped.
    report = verify_artifact(out, source, options=options)
    assert report.equal, report.differences
    # ".", usr, usr/bin, sbin, and what oci2disk wrote (/etc/fstab, /init, /dev/console)
    assert report.checked == len(VERIFY_SAMPLE) + 4 + len(result.generated)
    if fmt is Format.TAR:
        (tmp_path / "changed").mkdir()
        subprocess.run(["tar", "-xf", os.fspath(out), "-C", os.fspath(tmp_path / "changed")])
        (tmp_path / "changed" / "etc" / "hostname").write_bytes(b"BOX\n")
        changed = verify_artifact(tmp_path / "changed", source, ignore=result.generated)
        assert [(d.path, d.what) for d in changed.differences] == [("etc/hostname", "content")]
