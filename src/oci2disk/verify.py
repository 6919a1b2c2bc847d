"""Read an artifact back and compare what it holds with the rootfs it was made from.

Each kind of artifact has one reader in :data:`READERS` that opens it as a rootfs
:class:`~oci2disk.rootfs.Tree`: a disk or filesystem image (any format qemu-img reads;
its ext filesystem is read without mounting and checked with ``e2fsck -fn``), a newc
cpio, a tar, or a directory. The expected side is the flattened image itself. Both
sides go through :func:`~oci2disk.rootfs.with_digests`, and :func:`compare` lists every
:class:`Difference` of kind, mode, owner, size, content hash, link target, device
numbers, xattrs or hard-link set. Content is compared by sha256, so silent losses such
as ``mke2fs -d`` turning a hard link into an empty file show up.

Host tools: e2fsck (disks), qemu-img (disks not in raw format).
"""

from __future__ import annotations

import enum
import os
from collections import defaultdict
from collections.abc import Callable, Collection, Iterable, Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, replace
from pathlib import Path

from oci2disk import run
from oci2disk.compression import open_decompressed
from oci2disk.convert.cpio import initramfs_additions
from oci2disk.convert.job import Job
from oci2disk.convert.options import ConvertOptions, Table
from oci2disk.diskimage import bootfiles, extfs, qemuimg
from oci2disk.errors import VerifyError
from oci2disk.oci.layout import Platform
from oci2disk.progress import SILENT, Progress
from oci2disk.refs import parse_ref
from oci2disk.rootfs import Entry, Kind, Tree, normalize_path, with_digests
from oci2disk.rootfs.archives import CpioTree, TarTree
from oci2disk.rootfs.directory import DirectoryTree
from oci2disk.sources import open_image
from oci2disk.workspace import Workspace

# Longest xattr value shown in a Difference; longer ones are cut and marked.
XATTR_SHOWN = 64


@dataclass(frozen=True)
class Difference:
    path: str
    what: str  # missing extra kind mode owner size content linkname device xattrs hardlink
    expected: str
    actual: str

    def __str__(self) -> str:
        return f"{self.path}: {self.what}: expected {self.expected!r}, found {self.actual!r}"


# ---------------------------------------------------------------- comparison


def _is_ignored(path: str, ignored: set[str]) -> bool:
    if path in ignored:
        return True
    parts = path.split("/")
    return any("/".join(parts[:i]) in ignored for i in range(1, len(parts)))


def _index(entries: Iterable[Entry], ignored: set[str]) -> dict[str, Entry]:
    indexed: dict[str, Entry] = {}
    for entry in entries:
        path = normalize_path(entry.path)
        if not _is_ignored(path, ignored):
            indexed[path] = entry
    return indexed


def _link_sets(indexed: dict[str, Entry], common: set[str]) -> dict[str, frozenset[str]]:
    # Only paths present on both sides count: a missing path is reported as missing,
    # not again as a broken link on each of its siblings.
    groups: dict[str, set[str]] = defaultdict(set)
    for path, entry in indexed.items():
        if entry.link_group and path in common:
            groups[entry.link_group].add(path)
    return {path: frozenset(members) for members in groups.values() for path in members}


def _format_value(value: bytes) -> str:
    shown = value[:XATTR_SHOWN]
    if shown.isascii() and shown.decode("ascii").isprintable():
        text = shown.decode("ascii")
    else:
        text = "0x" + shown.hex()
    return text + ("..." if len(value) > XATTR_SHOWN else "")


def _format_xattrs(xattrs: tuple[tuple[str, bytes], ...]) -> str:
    return ", ".join(f"{name}={_format_value(value)}" for name, value in xattrs)


def _format_links(path: str, members: frozenset[str] | None) -> str:
    others = sorted((members or frozenset()) - {path})
    return ", ".join(others) if others else "(no other links)"


def _compare_one(e: Entry, a: Entry) -> Iterator[Difference]:
    path = e.path
    if e.kind is not a.kind:
        # Nothing else is comparable between, say, a file and a directory.
        yield Difference(path, "kind", e.kind.value, a.kind.value)
        return
    # Linux ignores a symlink's permission bits and tools disagree on them (0777 or the
    # tar's), so they are not compared.
    if e.kind is not Kind.SYMLINK and e.mode != a.mode:
        yield Difference(path, "mode", f"{e.mode:04o}", f"{a.mode:04o}")
    if (e.uid, e.gid) != (a.uid, a.gid):
        yield Difference(path, "owner", f"{e.uid}:{e.gid}", f"{a.uid}:{a.gid}")
    if e.kind is Kind.FILE:
        # Directory sizes depend on the filesystem, not the content: never compared.
        if e.size != a.size:
            yield Difference(path, "size", str(e.size), str(a.size))
        elif e.digest != a.digest:
            yield Difference(path, "content", e.digest, a.digest)
    if e.kind is Kind.SYMLINK and e.linkname != a.linkname:
        yield Difference(path, "linkname", e.linkname, a.linkname)
    if e.kind.is_device and (e.devmajor, e.devminor) != (a.devmajor, a.devminor):
        yield Difference(path, "device", f"{e.devmajor}:{e.devminor}", f"{a.devmajor}:{a.devminor}")
    if tuple(sorted(e.xattrs)) != tuple(sorted(a.xattrs)):
        yield Difference(
            path,
            "xattrs",
            _format_xattrs(tuple(sorted(e.xattrs))),
            _format_xattrs(tuple(sorted(a.xattrs))),
        )


def compare(
    expected: Iterable[Entry],
    actual: Iterable[Entry],
    *,
    ignore: Collection[str] = (),
) -> list[Difference]:
    """Every difference between two entry streams (with digests), sorted by path.

    ``ignore`` names paths to skip together with everything below them ("lost+found",
    "etc/fstab"). Per path: a ``kind`` difference hides the others; a file's ``size``
    difference hides its ``content`` difference.

    Modification times are NOT compared: mke2fs stamps directories it creates itself
    (the root, lost+found, parents missing from the tar) with the current time, and
    exporters disagree on directory mtimes after they add entries, so mtimes would
    report noise on every correct disk.

    The root "." is compared for mode, owner and xattrs when both sides have it; a tar
    without a "." entry says nothing about the root, so its absence is not reported.
    """
    ignored = {normalize_path(path) for path in ignore}
    want = _index(expected, ignored)
    have = _index(actual, ignored)
    common = want.keys() & have.keys()
    want_links = _link_sets(want, common)
    have_links = _link_sets(have, common)
    differences: list[Difference] = []
    for path in sorted(want.keys() | have.keys()):
        e = want.get(path)
        a = have.get(path)
        if e is None or a is None:
            if path == ".":
                continue
            if a is None and e is not None:
                differences.append(Difference(path, "missing", e.kind.value, ""))
            elif a is not None:
                differences.append(Difference(path, "extra", "", a.kind.value))
            continue
        e, a = replace(e, path=path), replace(a, path=path)
        found = list(_compare_one(e, a))
        differences += found
        if any(d.what == "kind" for d in found):
            continue
        links_e, links_a = want_links.get(path), have_links.get(path)
        if (links_e or frozenset({path})) != (links_a or frozenset({path})):
            differences.append(
                Difference(
                    path, "hardlink", _format_links(path, links_e), _format_links(path, links_a)
                )
            )
    return differences


def fsck(image: Path, offset: int) -> None:
    """Check the filesystem at byte ``offset`` of ``image`` with ``e2fsck -fn`` (read-only)."""
    device = f"{os.fspath(image)}?offset={offset}"
    proc = run.run(["e2fsck", "-fn", device], check=False)
    if proc.returncode != 0:
        output = (proc.stdout or b"") + (proc.stderr or b"")
        raise VerifyError(
            f"e2fsck finds errors in the filesystem at byte {offset} of {image} "
            f"(exit code {proc.returncode}):\n{run.tail(output.decode('utf-8', 'replace'))}",
            hint="the image is damaged or was written incompletely; rebuild it",
        )


# ---------------------------------------------------------------- artifacts


class ArtifactKind(enum.Enum):
    DISK = "disk"  # a disk or bare filesystem image, any format qemu-img reads
    TAR = "tar"
    CPIO = "cpio"
    DIR = "dir"


@dataclass(frozen=True)
class ReadOptions:
    """What a reader may need: the partition to read, where to put temporary files."""

    workdir: Path
    partition: int | None = None
    progress: Progress = SILENT


@dataclass(frozen=True)
class Reader:
    """How to open one kind of artifact as a Tree, and what that kind cannot hold."""

    open: Callable[[Path, ReadOptions], AbstractContextManager[Tree]]
    has_xattrs: bool = True  # newc cpio has no field for them
    made_paths: tuple[str, ...] = ()  # paths the writer adds itself (mke2fs: lost+found)
    # what the artifact holds beyond its tree that oci2disk would not have written
    # (a filesystem label or UUID other than the options', immutable inode flags, a
    # second archive after a cpio's trailer): one Difference each
    checks: Callable[[Tree, Job], list[Difference]] | None = None


@contextmanager
def open_disk(artifact: Path, options: ReadOptions) -> Iterator[Tree]:
    """The ext filesystem of a disk image of any format, checked with ``e2fsck -fn``."""
    raw = artifact
    if qemuimg.image_format(artifact) != qemuimg.RAW:
        raw = options.workdir / "artifact.raw"
        with options.progress.step(f"reading {artifact.name} with qemu-img"):
            qemuimg.convert_to_raw(artifact, raw)
    with extfs.open_filesystem(raw, options.partition) as fs:
        with options.progress.step("e2fsck -fn"):
            fsck(raw, fs.offset)
        yield fs


@contextmanager
def open_tar(artifact: Path, options: ReadOptions) -> Iterator[Tree]:
    yield TarTree(artifact)


@contextmanager
def open_cpio(artifact: Path, options: ReadOptions) -> Iterator[Tree]:
    yield CpioTree(artifact)


@contextmanager
def open_directory(artifact: Path, options: ReadOptions) -> Iterator[Tree]:
    yield DirectoryTree(artifact)


def disk_checks(tree: Tree, job: Job) -> list[Difference]:
    """The filesystem's label and UUID are the options', and no inode is made immutable."""
    assert isinstance(tree, extfs.ExtFs)
    want = job.identity
    found = [
        Difference(".", what, expected, actual)
        for what, expected, actual in (
            ("fs-uuid", want.uuid, tree.uuid),
            ("fs-label", want.label, tree.label),
        )
        if expected != actual
    ]
    for path, flags in sorted(tree.flagged.items()):
        shown = ", ".join(n for bit, n in extfs.SHOWN_FLAGS.items() if flags & bit)
        found.append(Difference(path, "flags", "", shown))
    if job.boot is None:
        found += _boot_code(tree)
    return found


# Code a disk (the MBR's first 440 bytes) or a bare filesystem (its first 1024 bytes)
# runs or hands over at boot; oci2disk leaves them zero unless it installs a bootloader.
BOOT_CODE = 440
FS_BOOT_BLOCK = 1024


def _boot_code(fs: extfs.ExtFs) -> list[Difference]:
    size = FS_BOOT_BLOCK if fs.offset == 0 else BOOT_CODE
    with fs.path.open("rb") as f:
        head = f.read(size)
    if not head.strip(b"\0"):
        return []
    where = "boot block" if fs.offset == 0 else "MBR boot code"
    written = len(head) - head.count(0)
    return [Difference(".", "boot-sector", f"{where}: zeros", f"{written} bytes written")]


def boot_differences(artifact: Path, tree: Tree, job: Job, workdir: Path) -> list[Difference]:
    """The disk's own bootloaders, those the options ask for: core.img where boot.img
    points, the ESP's loader, and grub.cfg, each naming the root filesystem's UUID."""
    assert isinstance(tree, extfs.ExtFs)
    probed = bootfiles.probe(artifact, workdir)
    has = probed.found
    if job.boot is None:
        return []
    found = []
    if job.boot.bios and not has.bios:
        found.append(Difference("MBR", "bootloader", "GRUB boot.img (BIOS)", "none"))
    if job.boot.uefi and has.uefi_arch is None:
        found.append(Difference("ESP", "bootloader", "/EFI/BOOT/BOOT*.EFI (UEFI)", "none"))
    cfg = None
    entry = tree.lookup("boot/grub/grub.cfg")
    if entry is not None and entry.kind is Kind.FILE:
        with tree.open(entry.path) as f:
            cfg = f.read()
    for where, what in bootfiles.problems(probed, tree.uuid, cfg):
        found.append(Difference(where, "bootloader", "a disk that boots on its own", what))
    if job.boot.bios and has.bios:
        found += _boot_code_differences(probed.head[:SECTOR], tree, workdir)
    return found


SECTOR = 512


def _boot_code_differences(sector0: bytes, tree: Tree, workdir: Path) -> list[Difference]:
    """The MBR's code is GRUB's boot.img as oci2disk patches it, byte for byte: only the
    fields grub-bios-setup sets (core.img's sector, the drive), the partition table and
    the BPB may differ from the module folder's boot.img."""
    from oci2disk.bootloader import GrubTarget
    from oci2disk.bootloader.grub_pc import KERNEL_SECTOR, boot_image, patch_boot_sector
    from oci2disk.convert import bootable

    if len(sector0) < SECTOR:
        return [Difference("MBR", "boot sector", "GRUB's boot.img", "a short read")]
    folder = bootable.modules(tree, GrubTarget.I386_PC, workdir / "grub-modules")
    core_sector = int.from_bytes(sector0[KERNEL_SECTOR : KERNEL_SECTOR + 8], "little")
    if core_sector < 1:
        return [Difference("MBR", "boot sector", "GRUB's boot.img", "no core.img sector")]
    expected = patch_boot_sector(boot_image(folder.path), sector0, core_sector)
    if expected == sector0:
        return []
    first = next(i for i, (a, b) in enumerate(zip(expected, sector0, strict=True)) if a != b)
    return [
        Difference(
            "MBR",
            "boot sector",
            f"GRUB's boot.img ({folder.origin})",
            f"other code at byte {first}",
        )
    ]


def cpio_checks(tree: Tree, job: Job) -> list[Difference]:
    """Nothing after the trailer: the kernel would unpack a second archive over the first."""
    assert isinstance(tree, CpioTree)
    if tree.trailing is None:
        return []
    return [Difference(".", "trailing", "nothing after the trailer", f"data at {tree.trailing}")]


READERS: dict[ArtifactKind, Reader] = {
    ArtifactKind.DISK: Reader(open_disk, made_paths=("lost+found",), checks=disk_checks),
    ArtifactKind.TAR: Reader(open_tar),
    ArtifactKind.CPIO: Reader(open_cpio, has_xattrs=False, checks=cpio_checks),
    ArtifactKind.DIR: Reader(open_directory),
}


def artifact_kind(path: Path) -> ArtifactKind:
    """What ``path`` is, by its content: a directory, a cpio, a tar, else a disk."""
    if path.is_dir():
        return ArtifactKind.DIR
    with open_decompressed(path) as stream:
        head = stream.read(512)
    if head.startswith((b"070701", b"070702")):
        return ArtifactKind.CPIO
    if head[257:262] == b"ustar":
        return ArtifactKind.TAR
    return ArtifactKind.DISK


@dataclass(frozen=True)
class VerifyReport:
    differences: tuple[Difference, ...]
    ignored: tuple[str, ...]
    checked: int

    @property
    def equal(self) -> bool:
        return not self.differences


def verify_artifact(
    artifact: Path,
    source: str,
    *,
    ignore: tuple[str, ...] = (),
    partition: int | None = None,
    platform: Platform | None = None,
    progress: Progress = SILENT,
    options: ConvertOptions | None = None,
) -> VerifyReport:
    """``oci2disk verify``: what ``artifact`` holds against ``source`` as oci2disk writes it.

    The expected side is the flattened image with what a conversion with ``options``
    changes: the identity edits (unless keep_identity; not in a tar), the generated files
    (/etc/fstab in a disk, /init in a cgz) compared with what oci2disk writes, and for a
    disk the filesystem's label and UUID. Nothing is taken from the manifest beside the
    artifact: whoever can change the artifact can change that file too. Only the writer's
    own empty directories (lost+found, not what is in it) and ``ignore`` are skipped.
    """
    from oci2disk.rootfs.flatten import flatten

    options = options or ConvertOptions()
    if not os.path.lexists(artifact):
        raise VerifyError(
            f"{artifact}: no such file or directory",
            hint="give the path of a disk, cgz, tar or directory oci2disk made",
        )
    kind = artifact_kind(artifact)
    reader = READERS[kind]
    ignored = tuple(ignore)
    if kind is ArtifactKind.DISK and not options.disk.table_given and _bare_filesystem(artifact):
        # an `-f fs` output: written with no table, so with no bootloader either
        options = replace(options, disk=replace(options.disk, table=Table.NONE))
    ref = parse_ref(source)
    with Workspace() as ws:
        with progress.step(f"opening {ref}"):
            image = open_image(ref, ws.path, platform)
        with progress.step(f"reading {len(image.layers)} layer(s) of {image.digest[:19]}"):
            # clamped as the conversion clamped them (the UUID derives from them then)
            rootfs = flatten(
                image, ws.subdir("flatten"), source_date_epoch=options.source_date_epoch
            )
        with rootfs, progress.step("hashing the image's files"):
            job = Job(image, rootfs, options, ws, SILENT)
            expected = _as_written(job, kind)
        if not reader.has_xattrs:
            expected = [replace(e, xattrs=()) for e in expected]
        read = ReadOptions(ws.subdir("read"), partition, progress)
        with progress.step(f"reading the {kind.value}"), reader.open(artifact, read) as tree:
            actual = list(with_digests(tree))
            found = reader.checks(tree, job) if reader.checks is not None else []
            if kind is ArtifactKind.DISK:
                found += boot_differences(artifact, tree, job, ws.subdir("boot"))
        made = set(reader.made_paths)
        actual = [a for a in actual if a.path not in made or a.kind is not Kind.DIR]
        expected = [e for e in expected if e.path not in made]
        with progress.step("comparing every path"):
            differences = found + compare(expected, actual, ignore=ignored)
    return VerifyReport(tuple(differences), (*reader.made_paths, *ignored), len(expected))


def _bare_filesystem(artifact: Path) -> bool:
    """A raw file that starts with an ext filesystem, not a partition table."""
    from oci2disk.diskimage.extfs import has_ext_magic

    return artifact.is_file() and has_ext_magic(artifact, 0)


def _as_written(job: Job, kind: ArtifactKind) -> list[Entry]:
    """The entries (with digests) a conversion writes into an artifact of ``kind``."""
    base = job.plain_rootfs if kind is ArtifactKind.TAR else job.rootfs
    extra = job.extra_for(disk_output=kind is ArtifactKind.DISK)
    dirs = job.dirs_for(disk_output=kind is ArtifactKind.DISK)
    view = base.edited(files=extra, dirs=dirs) if extra or dirs else base
    entries = {e.path: e for e in with_digests(view)}
    if kind is ArtifactKind.CPIO:
        for added in initramfs_additions(view, job.options.initramfs, 0):
            entries[added.path] = added
    return list(entries.values())
