"""Compare what an artifact holds with the rootfs it was made from.

Both sides become :class:`Record` streams (one per path: type, mode, owner, size,
content hash, link target, device numbers, xattrs, hard-link group), and
:func:`compare` lists every :class:`Difference`. Content is compared by sha256, not by
name, so silent losses such as ``mke2fs -d`` turning a hard link into an empty file
(see DESIGN.md, "Known traps") show up.

Host tools: e2fsck (for :func:`fsck` only).
"""

from __future__ import annotations

import base64
import hashlib
import os
import tarfile
import urllib.parse
from collections import defaultdict
from collections.abc import Collection, Iterable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import IO, BinaryIO

from oci2disk import run
from oci2disk.errors import VerifyError
from oci2disk.extfs import ExtFs

CHUNK = 1 << 20
SCHILY_XATTR = "SCHILY.xattr."
LIBARCHIVE_XATTR = "LIBARCHIVE.xattr."
# Longest xattr value shown in a Difference; longer ones are cut and marked.
XATTR_SHOWN = 64


@dataclass(frozen=True)
class Record:
    """One path of a rootfs as the comparison sees it."""

    path: str  # "." for the root, else relative without a leading "./"
    kind: str  # file, dir, symlink, char, block, fifo, socket
    mode: int  # permission bits (& 0o7777)
    uid: int
    gid: int
    size: int
    sha256: str  # "" unless kind == "file"
    linkname: str  # symlink target
    devmajor: int
    devminor: int
    xattrs: tuple[tuple[str, bytes], ...]
    # Paths that are hard links of each other share a non-empty link_group; its value is
    # a name for the set (one of its paths), so only membership is ever compared.
    link_group: str = ""


@dataclass(frozen=True)
class Difference:
    path: str
    what: str  # missing extra kind mode owner size content linkname device xattrs hardlink
    expected: str
    actual: str

    def __str__(self) -> str:
        return f"{self.path}: {self.what}: expected {self.expected!r}, found {self.actual!r}"


def normalize_path(name: str) -> str:
    """ "./etc/", "/etc" and "etc" all become "etc"; the root becomes "."."""
    parts = [part for part in name.split("/") if part not in ("", ".")]
    return "/".join(parts) or "."


# -- tar side ---------------------------------------------------------------------------


def _tar_kind(member: tarfile.TarInfo) -> str:
    if member.isreg():
        return "file"
    if member.isdir():
        return "dir"
    if member.issym():
        return "symlink"
    if member.ischr():
        return "char"
    if member.isblk():
        return "block"
    if member.isfifo():
        return "fifo"
    raise VerifyError(
        f"tar entry {member.name!r} has type {member.type!r}, which no filesystem can hold"
    )


def _tar_xattrs(member: tarfile.TarInfo) -> tuple[tuple[str, bytes], ...]:
    found: dict[str, bytes] = {}
    for key, value in member.pax_headers.items():
        if key.startswith(SCHILY_XATTR):
            # tarfile decodes PAX values as UTF-8 with surrogateescape: undo it exactly.
            found[key[len(SCHILY_XATTR) :]] = value.encode("utf-8", "surrogateescape")
    for key, value in member.pax_headers.items():
        if key.startswith(LIBARCHIVE_XATTR):
            name = urllib.parse.unquote_to_bytes(key[len(LIBARCHIVE_XATTR) :])
            found.setdefault(
                name.decode("utf-8", "surrogateescape"),
                base64.b64decode(value.encode("ascii", "surrogateescape") + b"=="),
            )
    return tuple(sorted(found.items()))


def _sha256_of(stream: IO[bytes]) -> str:
    digest = hashlib.sha256()
    while chunk := stream.read(CHUNK):
        digest.update(chunk)
    return digest.hexdigest()


def records_from_tar(stream: BinaryIO) -> Iterator[Record]:
    """The records of a rootfs tar, read once as a stream, in the order of the tar.

    A hard-link entry becomes a record of its target's kind with the target's content
    hash, size and metadata. A path that appears twice keeps its last entry. The records
    are produced after the whole tar is read, because only then is every link set known.
    """
    records: dict[str, Record] = {}
    group_of: dict[str, str] = {}
    try:
        with tarfile.open(
            fileobj=stream, mode="r|", encoding="utf-8", errors="surrogateescape"
        ) as archive:
            for member in archive:
                path = normalize_path(member.name)
                group_of.pop(path, None)
                if member.islnk():
                    target = normalize_path(member.linkname)
                    if target not in records:
                        raise VerifyError(
                            f"tar entry {path!r} is a hard link to {target!r}, "
                            "which does not come before it in the tar"
                        )
                    root = group_of.setdefault(target, target)
                    group_of[path] = root
                    records[path] = replace(records[target], path=path)
                    continue
                kind = _tar_kind(member)
                sha256 = ""
                size = 0
                if kind == "file":
                    content = archive.extractfile(member)
                    if content is None:
                        raise VerifyError(f"tar entry {path!r} has no readable content")
                    sha256 = _sha256_of(content)
                    size = member.size
                elif kind == "symlink":
                    size = len(member.linkname.encode("utf-8", "surrogateescape"))
                records[path] = Record(
                    path=path,
                    kind=kind,
                    mode=member.mode & 0o7777,
                    uid=member.uid,
                    gid=member.gid,
                    size=size,
                    sha256=sha256,
                    linkname=member.linkname if kind == "symlink" else "",
                    devmajor=member.devmajor if kind in ("char", "block") else 0,
                    devminor=member.devminor if kind in ("char", "block") else 0,
                    xattrs=_tar_xattrs(member),
                )
    except tarfile.TarError as exc:
        raise VerifyError(f"cannot read the tar stream: {exc}") from exc
    members: dict[str, int] = defaultdict(int)
    for root in group_of.values():
        members[root] += 1
    for path, record in records.items():
        root = group_of.get(path, "")
        yield replace(record, link_group=root) if members.get(root, 0) > 1 else record


# -- filesystem side --------------------------------------------------------------------


def records_from_extfs(fs: ExtFs) -> Iterator[Record]:
    """The records of every path of ``fs`` (walk order), content hashed once per inode."""
    entries = list(fs.walk())
    paths_of: dict[int, list[str]] = defaultdict(list)
    for entry in entries:
        if entry.kind != "dir":
            paths_of[entry.inode].append(entry.path)
    digests: dict[int, str] = {}
    for entry in entries:
        sha256 = ""
        if entry.kind == "file":
            sha256 = digests.get(entry.inode, "")
            if not sha256:
                with fs.open(entry) as content:
                    sha256 = digests[entry.inode] = _sha256_of(content)
        paths = paths_of.get(entry.inode, [])
        yield Record(
            path=entry.path,
            kind=entry.kind,
            mode=entry.mode,
            uid=entry.uid,
            gid=entry.gid,
            size=entry.size,
            sha256=sha256,
            linkname=entry.linkname,
            devmajor=entry.devmajor,
            devminor=entry.devminor,
            xattrs=entry.xattrs,
            link_group=min(paths) if len(paths) > 1 else "",
        )


# -- comparison -------------------------------------------------------------------------


def _is_ignored(path: str, ignored: set[str]) -> bool:
    if path in ignored:
        return True
    parts = path.split("/")
    return any("/".join(parts[:i]) in ignored for i in range(1, len(parts)))


def _index(records: Iterable[Record], ignored: set[str]) -> dict[str, Record]:
    indexed: dict[str, Record] = {}
    for record in records:
        path = normalize_path(record.path)
        if not _is_ignored(path, ignored):
            indexed[path] = record
    return indexed


def _link_sets(indexed: dict[str, Record], common: set[str]) -> dict[str, frozenset[str]]:
    # Only paths present on both sides count: a missing path is reported as missing,
    # not again as a broken link on each of its siblings.
    groups: dict[str, set[str]] = defaultdict(set)
    for path, record in indexed.items():
        if record.link_group and path in common:
            groups[record.link_group].add(path)
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


def _compare_one(e: Record, a: Record) -> Iterator[Difference]:
    path = e.path
    if e.kind != a.kind:
        # Nothing else is comparable between, say, a file and a directory.
        yield Difference(path, "kind", e.kind, a.kind)
        return
    # Linux ignores a symlink's permission bits and tools disagree on them (0777 or the
    # tar's), so they are not compared.
    if e.kind != "symlink" and e.mode != a.mode:
        yield Difference(path, "mode", f"{e.mode:04o}", f"{a.mode:04o}")
    if (e.uid, e.gid) != (a.uid, a.gid):
        yield Difference(path, "owner", f"{e.uid}:{e.gid}", f"{a.uid}:{a.gid}")
    if e.kind == "file":
        # Directory sizes depend on the filesystem, not the content: never compared.
        if e.size != a.size:
            yield Difference(path, "size", str(e.size), str(a.size))
        elif e.sha256 != a.sha256:
            yield Difference(path, "content", e.sha256, a.sha256)
    if e.kind == "symlink" and e.linkname != a.linkname:
        yield Difference(path, "linkname", e.linkname, a.linkname)
    if e.kind in ("char", "block") and (e.devmajor, e.devminor) != (a.devmajor, a.devminor):
        yield Difference(path, "device", f"{e.devmajor}:{e.devminor}", f"{a.devmajor}:{a.devminor}")
    if tuple(sorted(e.xattrs)) != tuple(sorted(a.xattrs)):
        yield Difference(
            path,
            "xattrs",
            _format_xattrs(tuple(sorted(e.xattrs))),
            _format_xattrs(tuple(sorted(a.xattrs))),
        )


def compare(
    expected: Iterable[Record],
    actual: Iterable[Record],
    *,
    ignore: Collection[str] = (),
) -> list[Difference]:
    """Every difference between two record streams, sorted by path.

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
                differences.append(Difference(path, "missing", e.kind, ""))
            elif a is not None:
                differences.append(Difference(path, "extra", "", a.kind))
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
