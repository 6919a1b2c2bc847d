"""extfs reads back exactly what the real mke2fs (and debugfs) wrote."""

from __future__ import annotations

import hashlib
import io
import json
import random
import struct
import tarfile
from dataclasses import dataclass, field, replace
from pathlib import Path

import pytest

from oci2disk import run
from oci2disk.diskimage.extfs import ExtFs, open_filesystem
from oci2disk.diskimage.partitions import read_partitions
from oci2disk.errors import VerifyError
from oci2disk.rootfs import Entry, Kind, with_digests
from oci2disk.rootfs.archives import TarTree
from oci2disk.verify import Difference, compare

MTIME = 1_700_000_000
MIB = 1 << 20
NON_UTF8 = b"caf\xe9".decode("utf-8", "surrogateescape")
# vfs_cap_data revision 2 with cap_net_raw permitted and effective (what setcap writes).
CAPABILITY = struct.pack("<5I", 0x02000001, 1 << 13, 0, 0, 0)
# Long names fill many directory blocks: an htree over them needs two levels.
MANY_NAME = "entry-with-a-name-long-enough-to-need-many-blocks"
LONG_TARGET = "../../usr/lib/x86_64-linux-gnu/some/rather/long/directory/name/target-file"


@dataclass(frozen=True)
class Spec:
    """One entry of a test rootfs tar."""

    path: str
    kind: str = "file"
    mode: int = 0o644
    uid: int = 0
    gid: int = 0
    data: bytes = b""
    linkname: str = ""
    dev: tuple[int, int] = (0, 0)
    xattrs: dict[str, bytes] = field(default_factory=dict)
    mtime: float = MTIME


TAR_TYPES = {
    "file": tarfile.REGTYPE,
    "dir": tarfile.DIRTYPE,
    "symlink": tarfile.SYMTYPE,
    "link": tarfile.LNKTYPE,
    "char": tarfile.CHRTYPE,
    "block": tarfile.BLKTYPE,
    "fifo": tarfile.FIFOTYPE,
}


def holey_data() -> bytes:
    # Data blocks between zero blocks: mke2fs leaves the zeros as holes, so the file gets
    # one extent per data block and an extent tree deeper than the inode's four slots.
    return b"".join(bytes([65 + i % 26]) * 4096 + bytes(4096) for i in range(40))


def rootfs_specs() -> list[Spec]:
    big = random.Random(7).randbytes(6 * MIB)
    specs = [
        Spec(".", "dir", 0o755),
        Spec("bin", "dir", 0o755),
        Spec("bin/dash", mode=0o755, data=b"\x7fELF dash"),
        Spec("bin/sh", "symlink", 0o777, linkname="dash"),
        Spec("bin/su", mode=0o4755, data=b"\x7fELF su"),
        Spec(
            "bin/ping", mode=0o755, data=b"\x7fELF ping", xattrs={"security.capability": CAPABILITY}
        ),
        Spec("data", "dir", 0o755),
        Spec("data/big", data=big),
        Spec("data/hello", mode=0o640, uid=33, gid=33, data=b"hello, world\n"),
        Spec("data/hello-link", "link", 0o640, uid=33, gid=33, linkname="data/hello"),
        Spec("data/holey", data=holey_data()),
        Spec("dev", "dir", 0o755),
        Spec("dev/big", "char", 0o600, dev=(4095, 1048575)),
        Spec("dev/dm-0", "block", 0o660, gid=6, dev=(253, 300)),
        Spec("dev/null", "char", 0o666, dev=(1, 3)),
        Spec("dev/sda", "block", 0o660, gid=6, dev=(8, 0)),
        Spec("etc", "dir", 0o755),
        Spec("etc/hostname", data=b"box\n"),
        Spec("etc/motd", data=b"m" * 100),
        Spec("home", "dir", 0o755),
        Spec("home/alice", "dir", 0o700, uid=1000, gid=1000),
        Spec("home/alice/notes", mode=0o600, uid=1000, gid=1000, data=b"secret\n"),
        Spec("many", "dir", 0o755),
        *(
            Spec(f"many/{MANY_NAME}-{i:04d}", data=b"%d\n" % i if i % 100 == 0 else b"")
            for i in range(3000)
        ),
        Spec("naïve", data="ünïcödé\n".encode()),
        Spec(NON_UTF8, data=b"latin-1 name\n"),
        Spec("run", "dir", 0o755),
        Spec("run/initctl", "fifo", 0o600),
        Spec("srv", "dir", 0o750, uid=100000, gid=200000),
        Spec("srv/wide-ids", uid=100000, gid=4000000000, data=b"32-bit owners\n"),
        Spec("tmp", "dir", 0o1777),
        Spec("usr", "dir", 0o755),
        Spec("usr/long", "symlink", 0o777, linkname=LONG_TARGET),
    ]
    return specs


def write_tar(path: Path, specs: list[Spec]) -> Path:
    """A PAX tar as the canonical stream is written: permission bits only in mode."""
    with tarfile.open(
        path, "w", format=tarfile.PAX_FORMAT, encoding="utf-8", errors="surrogateescape"
    ) as archive:
        for spec in specs:
            info = tarfile.TarInfo(spec.path)
            info.type = TAR_TYPES[spec.kind]
            info.mode, info.uid, info.gid, info.mtime = spec.mode, spec.uid, spec.gid, spec.mtime
            info.linkname = spec.linkname
            info.devmajor, info.devminor = spec.dev
            info.pax_headers = {
                "SCHILY.xattr." + name: value.decode("utf-8", "surrogateescape")
                for name, value in spec.xattrs.items()
            }
            info.size = len(spec.data) if spec.kind == "file" else 0
            archive.addfile(info, io.BytesIO(spec.data) if spec.kind == "file" else None)
    return path


def mke2fs(image: Path, tar: Path, fs_type: str = "ext4", *extra: str, size: str = "64M") -> Path:
    run.run(
        [
            "mke2fs",
            "-q",
            "-F",
            "-t",
            fs_type,
            "-d",
            str(tar),
            "-E",
            "root_owner=0:0",
            *extra,
            str(image),
            size,
        ]
    )
    return image


def debugfs(device: str | Path, *commands: str, write: bool = True) -> str:
    """Run debugfs commands; its exit code is 0 even when a command fails, so check stderr."""
    argv = ["debugfs", *(["-w"] if write else []), "-f", "-", str(device)]
    proc = run.run(argv, input="".join(c + "\n" for c in commands).encode())
    banner = "debugfs 1."
    errors = [line for line in proc.stderr.decode().splitlines() if not line.startswith(banner)]
    assert not errors, errors
    return proc.stdout.decode("utf-8", "replace")


@pytest.fixture(scope="module")
def specs() -> list[Spec]:
    return rootfs_specs()


@pytest.fixture(scope="module")
def rootfs_tar(tmp_path_factory: pytest.TempPathFactory, specs: list[Spec]) -> Path:
    return write_tar(tmp_path_factory.mktemp("tar") / "rootfs.tar", specs)


def resolved(specs: list[Spec], spec: Spec) -> Spec:
    """A hard-link spec as the file it links to."""
    if spec.kind != "link":
        return spec
    target = next(s for s in specs if s.path == spec.linkname)
    return Spec(spec.path, "file", target.mode, target.uid, target.gid, target.data)


def tree_order(paths: list[str]) -> list[str]:
    """Depth first, parents first, siblings sorted by name bytes: what entries() promises."""

    def key(path: str) -> list[bytes]:
        return [part.encode("utf-8", "surrogateescape") for part in path.split("/")]

    return [".", *sorted((p for p in paths if p != "."), key=key)]


def assert_reads_back(
    fs: ExtFs, specs: list[Spec], written: dict[str, bytes] | None = None
) -> None:
    """``written``: content that mke2fs is known to write differently from the tar."""
    entries = {entry.path: entry for entry in fs.entries()}
    walked = list(entries)
    assert walked == tree_order(walked), "entries() is not in sorted tree order"
    assert set(entries) == {s.path for s in specs} | {"lost+found"}
    assert entries["lost+found"].kind is Kind.DIR
    for original in specs:
        spec = resolved(specs, original)
        entry = entries[spec.path]
        if written and spec.path in written:
            spec = replace(spec, data=written[spec.path])
        assert fs.lookup(spec.path) == entry
        assert (entry.kind.value, entry.mode, entry.uid, entry.gid) == (
            spec.kind,
            spec.mode,
            spec.uid,
            spec.gid,
        ), spec.path
        assert entry.xattrs == tuple(sorted(spec.xattrs.items())), spec.path
        if spec.kind == "file":
            assert entry.size == len(spec.data)
            with fs.open(spec.path) as stream:
                assert (
                    hashlib.sha256(stream.read()).digest() == hashlib.sha256(spec.data).digest()
                ), spec.path
        elif spec.kind == "symlink":
            assert entry.linkname == spec.linkname == fs.read_symlink(spec.path)
            assert entry.size == len(spec.linkname)
        elif spec.kind in ("char", "block"):
            assert (entry.devmajor, entry.devminor) == spec.dev, spec.path
        if spec.path != ".":
            assert entry.mtime == spec.mtime, spec.path
    assert fs.inode_number("data/hello") == fs.inode_number("data/hello-link")
    assert fs.link_count("data/hello") == 2
    assert entries["data/hello"].link_group == entries["data/hello-link"].link_group == "data/hello"


FS_VARIANTS = {
    "ext4": ("ext4", ()),
    "ext4-4k": ("ext4", ("-b", "4096")),
    "ext4-32bit": ("ext4", ("-O", "^64bit,^metadata_csum,^flex_bg")),
    "ext4-inline": ("ext4", ("-O", "inline_data")),
    "ext4-128-byte-inodes": ("ext4", ("-I", "128")),
    "ext3": ("ext3", ()),
    "ext2": ("ext2", ()),
    "ext2-4k": ("ext2", ("-b", "4096")),
}


@pytest.mark.parametrize("variant", FS_VARIANTS)
def test_reads_back_what_mke2fs_wrote(
    tmp_path: Path, rootfs_tar: Path, specs: list[Spec], variant: str
) -> None:
    fs_type, extra = FS_VARIANTS[variant]
    image = mke2fs(tmp_path / "fs.img", rootfs_tar, fs_type, *extra)
    with ExtFs(image) as fs:
        assert fs.fs_type == fs_type
        assert fs.block_size == (4096 if "4096" in extra else 1024)
        # mke2fs 1.47.2 with -O inline_data drops a trailing hole from the size of a file
        # it copies from a tar (debugfs shows the same short size).
        written = {"data/holey": holey_data()[:-4096]} if variant == "ext4-inline" else {}
        assert_reads_back(fs, specs, written)
        differences = compare(
            TarTree(rootfs_tar).entries(), with_digests(fs), ignore=["lost+found"]
        )
        if variant == "ext4-inline":
            size = len(holey_data())
            assert differences == [Difference("data/holey", "size", str(size), str(size - 4096))]
        else:
            assert differences == []
        if variant == "ext4":
            assert {"extent", "64bit", "flex_bg", "metadata_csum"} <= fs.features
        if variant == "ext4-32bit":
            assert "64bit" not in fs.features


def test_fs_identity_matches_dumpe2fs(tmp_path: Path, rootfs_tar: Path) -> None:
    image = mke2fs(
        tmp_path / "fs.img",
        rootfs_tar,
        "ext4",
        "-L",
        "rootfs",
        "-U",
        "0b5c3f4e-0d2a-4c4a-9a43-7f1d9a1b2c3d",
    )
    with ExtFs(image) as fs:
        assert fs.uuid == "0b5c3f4e-0d2a-4c4a-9a43-7f1d9a1b2c3d"
        assert fs.label == "rootfs"
        assert fs.size == 64 * MIB


def test_mtime_nanoseconds_and_epoch_bits(tmp_path: Path, rootfs_tar: Path) -> None:
    # mke2fs keeps whole seconds from a tar, so set i_mtime_extra directly: nanoseconds
    # in its upper 30 bits, bits 32-33 of the seconds in its lower 2.
    image = mke2fs(tmp_path / "fs.img", rootfs_tar, size="16M")
    debugfs(
        image,
        f"sif /etc/hostname mtime_extra {250_000_000 << 2}",
        f"sif /etc/motd mtime_extra {(5 << 2) | 1}",
    )
    with ExtFs(image) as fs:
        hostname, motd = fs.lookup("etc/hostname"), fs.lookup("etc/motd")
    assert hostname is not None and motd is not None
    assert hostname.mtime_ns == MTIME * 10**9 + 250_000_000
    assert hostname.mtime == MTIME + 0.25
    assert motd.mtime_ns == (MTIME + 2**32) * 10**9 + 5


def test_deep_extent_tree_with_holes(tmp_path: Path, rootfs_tar: Path) -> None:
    image = mke2fs(tmp_path / "fs.img", rootfs_tar)
    extents = debugfs(image, "ex /data/holey", write=False)
    assert " 1/ 1 " in extents, "expected an extent tree of depth 1:\n" + extents
    with ExtFs(image) as fs, fs.open("data/holey") as stream:
        assert stream.read() == holey_data()
        # Seek into a hole and into data: the stream is random access.
        stream.seek(4096 * 3 + 10)
        assert stream.read(5) == bytes(5)
        stream.seek(4096 * 4)
        assert stream.read(3) == b"CCC"


def test_uninitialized_extents_read_as_zeros(tmp_path: Path, rootfs_tar: Path) -> None:
    image = mke2fs(tmp_path / "fs.img", rootfs_tar)
    host = tmp_path / "prealloc"
    with host.open("wb") as handle:
        handle.write(b"head")
        handle.truncate(MIB)
        handle.write(b"tail")
    debugfs(image, "write " + str(host) + " /prealloc", "fallocate /prealloc 0 300")
    assert "Uninit" in debugfs(image, "ex /prealloc", write=False)
    with ExtFs(image) as fs, fs.open("prealloc") as stream:
        assert stream.read() == host.read_bytes()


def test_triple_indirect_block_map(tmp_path: Path, rootfs_tar: Path) -> None:
    # 1 KiB blocks: 12 direct + 256 single + 65536 double cover 64.3 MiB; past that the
    # triple-indirect block is needed. A sparse host file keeps the image small.
    image = mke2fs(tmp_path / "fs.img", rootfs_tar, "ext2", "-b", "1024")
    host = tmp_path / "sparse"
    pieces = {0: b"start", 13 * 1024: b"single", 300 * 1024: b"double", 70 * MIB: b"triple"}
    with host.open("wb") as handle:
        for position, data in pieces.items():
            handle.seek(position)
            handle.write(data)
    debugfs(image, f"write {host} /sparse")
    assert "(TIND)" in debugfs(image, "stat /sparse", write=False)
    with ExtFs(image) as fs:
        entry = fs.lookup("sparse")
        assert entry is not None and entry.size == 70 * MIB + 6
        with fs.open(entry.path) as stream:
            assert (
                hashlib.sha256(stream.read()).digest() == hashlib.sha256(host.read_bytes()).digest()
            )
            stream.seek(70 * MIB)
            assert stream.read() == b"triple"


def test_xattrs_in_inode_and_external_block(tmp_path: Path, rootfs_tar: Path) -> None:
    image = mke2fs(tmp_path / "fs.img", rootfs_tar)
    big = tmp_path / "big-value"
    big.write_bytes(bytes(range(256)) + b"x" * 44)
    # A POSIX ACL as getfattr shows it (version 2): user::rw-, user:1000:r--, group::r--,
    # mask::r--, other::---. ext4 stores it in a shorter form of its own.
    acl = struct.pack("<I", 2) + b"".join(
        struct.pack("<HHI", tag, perm, ident)
        for tag, perm, ident in (
            (1, 6, 0xFFFFFFFF),
            (2, 4, 1000),
            (4, 4, 0xFFFFFFFF),
            (0x10, 4, 0xFFFFFFFF),
            (0x20, 0, 0xFFFFFFFF),
        )
    )
    acl_file = tmp_path / "acl"
    acl_file.write_bytes(acl)
    debugfs(
        image,
        "ea_set /etc/hostname user.foo bar",
        f"ea_set -f {big} /etc/hostname user.big",
        "ea_set /etc/hostname trusted.t 1",
        f"ea_set -f {acl_file} /etc/hostname system.posix_acl_access",
    )
    stat_text = debugfs(image, "stat /etc/hostname", write=False)
    assert "File ACL: 0" not in stat_text, "the large value should be in an external block"
    with ExtFs(image) as fs:
        entry = fs.lookup("/etc/hostname")
        assert entry is not None
        assert entry.xattrs == (
            ("system.posix_acl_access", acl),
            ("trusted.t", b"1"),
            ("user.big", big.read_bytes()),
            ("user.foo", b"bar"),
        )


def test_inline_data(tmp_path: Path, rootfs_tar: Path, specs: list[Spec]) -> None:
    image = mke2fs(tmp_path / "fs.img", rootfs_tar, "ext4", "-O", "inline_data")
    for path in ("/etc/hostname", "/etc/motd", "/home/alice", "/usr/long"):
        assert "Flags: 0x10000000" in debugfs(image, "stat " + path, write=False), path
    with ExtFs(image) as fs:
        assert fs.lookup("etc/motd") is not None
        with fs.open("etc/motd") as stream:
            assert stream.read() == b"m" * 100  # 60 bytes in i_block, 40 in system.data
        assert fs.read_symlink("usr/long") == LONG_TARGET
        assert [e.path for e in fs.entries() if e.path.startswith("home/")] == [
            "home/alice",
            "home/alice/notes",
        ]
        entry = fs.lookup("etc/motd")
        assert entry is not None and entry.xattrs == ()  # system.data is content, not an xattr


@pytest.mark.parametrize("fs_type", ["ext4", "ext3"])
def test_htree_directory(tmp_path: Path, rootfs_tar: Path, specs: list[Spec], fs_type: str) -> None:
    # mke2fs -d writes linear directories; e2fsck -D rebuilds them as hashed b-trees.
    image = mke2fs(tmp_path / "fs.img", rootfs_tar, fs_type, "-b", "1024")
    proc = run.run(["e2fsck", "-fyD", str(image)], check=False)
    assert proc.returncode in (0, 1), proc.stdout.decode()
    # (Without metadata_csum debugfs also complains on stderr about checksum space.)
    dump = run.run(["debugfs", "-R", "htree /many", str(image)]).stdout.decode()
    assert "Indirect levels: 1" in dump
    with ExtFs(image) as fs:
        names = [e.path for e in fs.entries() if e.path.startswith("many/")]
        assert names == sorted(s.path for s in specs if s.path.startswith("many/"))
        assert len(names) == 3000
        entry = fs.lookup(f"many/{MANY_NAME}-2999")
        assert entry is not None and entry.kind is Kind.FILE
        expected = TarTree(rootfs_tar).entries()
        assert compare(expected, with_digests(fs), ignore=["lost+found"]) == []


def test_lookup_does_not_follow_symlinks(tmp_path: Path, rootfs_tar: Path) -> None:
    image = mke2fs(tmp_path / "fs.img", rootfs_tar)
    with ExtFs(image) as fs:
        sh = fs.lookup("bin/sh")
        assert sh is not None and sh.kind is Kind.SYMLINK and sh.linkname == "dash"
        assert fs.lookup("bin/sh/x") is None
        assert fs.lookup("no/such") is None
        root = fs.lookup(".")
        assert root is not None
        assert (fs.inode_number("."), root.kind, root.mode) == (2, Kind.DIR, 0o755)
        with pytest.raises(VerifyError, match="not a regular file"):
            fs.open("bin")
        with pytest.raises(VerifyError, match="no such path"):
            fs.open("missing")


def sfdisk(disk: Path, script: str) -> None:
    run.run(["sfdisk", "--no-reread", "--no-tell-kernel", "-q", str(disk)], input=script.encode())


def sfdisk_layout(disk: Path) -> list[tuple[int, int, int]]:
    """(number, start byte, size bytes) of each partition, as sfdisk itself reads them."""
    table = json.loads(run.run(["sfdisk", "--json", str(disk)]).stdout)["partitiontable"]
    sector = table.get("sectorsize", 512)
    return [
        (int(p["node"].removeprefix(str(disk))), p["start"] * sector, p["size"] * sector)
        for p in table["partitions"]
    ]


@pytest.mark.parametrize("label", ["dos", "gpt"])
def test_filesystem_in_a_partition(
    tmp_path: Path, rootfs_tar: Path, specs: list[Spec], label: str
) -> None:
    disk = tmp_path / "disk.raw"
    with disk.open("wb") as handle:
        handle.truncate(80 * MIB)
    sfdisk(disk, f"label: {label}\nstart=2048, size=2048, type=uefi\nstart=4096, type=linux\n")
    run.run(
        [
            "mke2fs",
            "-q",
            "-F",
            "-t",
            "ext4",
            "-d",
            str(rootfs_tar),
            "-E",
            "root_owner=0:0,offset=2097152",
            str(disk),
            "64M",
        ]
    )
    partitions = read_partitions(disk)
    assert [(p.number, p.start, p.size) for p in partitions] == sfdisk_layout(disk)
    assert [p.is_linux for p in partitions] == [False, True]
    assert {p.table for p in partitions} == {"gpt" if label == "gpt" else "mbr"}
    with open_filesystem(disk) as fs:
        assert fs.offset == 2 * MIB
        assert_reads_back(fs, specs)
    with pytest.raises(VerifyError, match="no ext2/ext3/ext4 filesystem"):
        open_filesystem(disk, partition=1)
    with open_filesystem(disk, partition=2) as fs:
        assert fs.lookup("etc/hostname") is not None
    with pytest.raises(VerifyError, match="no partition 3"):
        open_filesystem(disk, partition=3)


def test_mbr_logical_partitions(tmp_path: Path) -> None:
    disk = tmp_path / "disk.raw"
    with disk.open("wb") as handle:
        handle.truncate(64 * MIB)
    sfdisk(disk, "label: dos\n,8M,L\n,8M,L\n,4M,L\n,,E\n,10M,L\n,10M,L\n")
    partitions = read_partitions(disk)
    assert [(p.number, p.start, p.size) for p in partitions] == sfdisk_layout(disk)
    assert [p.number for p in partitions] == [1, 2, 3, 4, 5, 6]
    assert partitions[3].type == "0x05"


def test_bare_filesystem_and_errors(tmp_path: Path, rootfs_tar: Path) -> None:
    image = mke2fs(tmp_path / "fs.img", rootfs_tar, size="16M")
    assert read_partitions(image) == []
    with open_filesystem(image) as fs:
        assert fs.offset == 0 and fs.lookup("etc/hostname") is not None
    with pytest.raises(VerifyError, match="no partition table"):
        open_filesystem(image, partition=1)

    junk = tmp_path / "junk.img"
    junk.write_bytes(random.Random(1).randbytes(64 * 1024))
    with pytest.raises(VerifyError, match="no ext2/ext3/ext4 filesystem at byte 0"):
        ExtFs(junk)
    empty = tmp_path / "empty.img"
    empty.write_bytes(b"")
    with pytest.raises(VerifyError, match="ends before the superblock"):
        ExtFs(empty)

    truncated = tmp_path / "truncated.img"
    truncated.write_bytes(image.read_bytes()[: 256 * 1024])
    with pytest.raises(VerifyError, match="truncated"), ExtFs(truncated) as fs:
        for entry in fs.entries():
            if entry.kind is Kind.FILE:
                fs.open(entry.path).read()


def test_zeroed_group_descriptors_are_reported(tmp_path: Path, rootfs_tar: Path) -> None:
    image = mke2fs(tmp_path / "fs.img", rootfs_tar, "ext4", "-b", "4096", size="16M")
    with image.open("r+b") as handle:
        handle.seek(4096)
        handle.write(bytes(4096))
    with (
        pytest.raises(VerifyError, match="corrupt: group 0 has its inode table at block 0"),
        ExtFs(image) as fs,
    ):
        list(fs.entries())


def test_entries_are_plain_values(tmp_path: Path, rootfs_tar: Path) -> None:
    image = mke2fs(tmp_path / "fs.img", rootfs_tar, size="16M")
    with ExtFs(image) as fs:
        entry = fs.lookup(NON_UTF8)
    assert isinstance(entry, Entry)
    assert entry.path.encode("utf-8", "surrogateescape") == b"caf\xe9"
    with pytest.raises(VerifyError, match="closed"):
        fs.lookup("etc")
