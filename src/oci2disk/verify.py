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

from oci2disk import manifest, run
from oci2disk.compression import open_decompressed
from oci2disk.diskimage import extfs, qemuimg
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


READERS: dict[ArtifactKind, Reader] = {
    ArtifactKind.DISK: Reader(open_disk, made_paths=("lost+found",)),
    ArtifactKind.TAR: Reader(open_tar),
    ArtifactKind.CPIO: Reader(open_cpio, has_xattrs=False),
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
) -> VerifyReport:
    """``oci2disk verify``: what ``artifact`` holds against the flattened ``source``.

    Paths the artifact's manifest lists as generated (etc/fstab) and those its writer
    makes itself (lost+found) are ignored, with ``ignore``.
    """
    from oci2disk.rootfs.flatten import flatten

    if not artifact.exists():
        raise VerifyError(f"{artifact}: no such file or directory")
    known = manifest.find_for_artifact(artifact)
    kind = artifact_kind(artifact)
    reader = READERS[kind]
    ignored = (*reader.made_paths, *(known.generated if known else ()), *ignore)
    ref = parse_ref(source)
    with Workspace() as ws:
        with progress.step(f"opening {ref}"):
            image = open_image(ref, ws.path, platform)
        with progress.step(f"reading {len(image.layers)} layer(s) of {image.digest[:19]}"):
            rootfs = flatten(image, ws.subdir("flatten"))
        with rootfs, progress.step("hashing the image's files"):
            expected = list(with_digests(rootfs))
        if not reader.has_xattrs:
            expected = [replace(e, xattrs=()) for e in expected]
        options = ReadOptions(ws.subdir("read"), partition, progress)
        with progress.step(f"reading the {kind.value}"), reader.open(artifact, options) as tree:
            actual = list(with_digests(tree))
        with progress.step("comparing every path"):
            differences = compare(expected, actual, ignore=ignored)
    return VerifyReport(tuple(differences), ignored, len(expected))
