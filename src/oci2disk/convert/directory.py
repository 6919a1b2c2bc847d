"""The rootfs extracted into a directory (an nfsroot, a chroot, ``mkfs -d`` input).

As root, every owner, mode, device node, xattr and modification time is exact. As
another user the tool keeps what it can: file data, modes, symlinks, hard links,
fifos and the xattrs it may set; it lists what it could not keep (owners, device
nodes, privileged xattrs) in :class:`DirectoryReport`, which the caller shows.

Every path is created relative to an open descriptor of its parent directory, opened
without following symlinks, and nothing is ever created through a symlink, so a
symlink in the image (``/lib -> /usr/lib``, or one pointing at ``/etc`` of the host)
never leads a write out of the target directory.

The directory is written under a temporary name beside the target and renamed into
place at the end (see :class:`oci2disk.workspace.AtomicDirectory`).

Host tools: none.
"""

from __future__ import annotations

import errno
import hashlib
import logging
import os
import stat
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from oci2disk.bytestreams import CHUNK
from oci2disk.convert.plugin import OutputFormat, named
from oci2disk.errors import ConvertError
from oci2disk.rootfs import Entry, Kind, Tree

if TYPE_CHECKING:
    from oci2disk.convert.job import Job

log = logging.getLogger("oci2disk.directory")

SHOWN = 10  # paths named per kind of loss in the summary
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_NEW_FILE = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC


@dataclass
class DirectoryReport:
    """What could not be kept; empty when the directory equals the image."""

    owners: list[str] = field(default_factory=list)
    devices: list[str] = field(default_factory=list)
    xattrs: list[str] = field(default_factory=list)
    setid: list[str] = field(default_factory=list)  # set-user/group-ID files now the user's
    digest: str = ""  # sha256 over every path's metadata and content: equal trees, equal digest

    def summary(self) -> list[str]:
        """One line per kind of loss, naming the first paths and why."""
        lines = []
        who = f"uid {os.geteuid()}"
        if self.owners:
            lines.append(
                f"could not keep the owner of {len(self.owners)} path(s) (running as {who}; "
                f"they belong to {who} now): {_some(self.owners)}"
            )
        if self.devices:
            lines.append(
                f"could not create {len(self.devices)} device node(s) (needs root; "
                f"they are left out): {_some(self.devices)}"
            )
        if self.setid:
            lines.append(
                f"{len(self.setid)} set-user/group-ID file(s) now belong to {who}, so they run "
                f"with the rights of {who}, not of their owner in the image: "
                f"{_some(self.setid)}"
            )
        if self.xattrs:
            lines.append(
                f"could not set {len(self.xattrs)} xattr(s) (why, for each): {_some(self.xattrs)}"
            )
        if self.owners or self.devices or any("needs root" in x for x in self.xattrs):
            lines.append("run oci2disk as root for an exact copy of the image")
        return lines


def _some(paths: list[str]) -> str:
    shown = ", ".join("/" + p for p in paths[:SHOWN])
    return shown + (f" and {len(paths) - SHOWN} more" if len(paths) > SHOWN else "")


class _Tree:
    """Open descriptors of the directories on the current path, so lookups never follow."""

    def __init__(self, root_fd: int) -> None:
        self.fds: dict[str, int] = {".": root_fd}

    def parent(self, path: str) -> tuple[int, str]:
        head, _, base = path.rpartition("/")
        return self.dir_fd(head or "."), base

    def dir_fd(self, path: str) -> int:
        fd = self.fds.get(path)
        if fd is None:
            parent, base = self.parent(path)
            try:
                fd = os.open(base, _DIR_FLAGS, dir_fd=parent)
            except OSError as exc:
                # ELOOP / ENOTDIR: the path passes through a symlink or a non-directory.
                raise ConvertError(f"cannot open /{path} as a directory ({exc.strerror})") from None
            self.fds[path] = fd
        return fd

    def close(self) -> None:
        for path, fd in self.fds.items():
            if path != ".":
                os.close(fd)
        self.fds = {}


def extract(
    rootfs: Tree, target: Path, *, check: Callable[[], None] | None = None
) -> DirectoryReport:
    """Write every entry of ``rootfs`` into the empty directory ``target``."""
    report = DirectoryReport()
    digest = hashlib.sha256()
    root_fd = os.open(target, _DIR_FLAGS)
    tree = _Tree(root_fd)
    dirs: list[Entry] = []
    try:
        for entry in rootfs.entries():
            if check is not None:
                check()
            if entry.path == ".":
                dirs.append(entry)
                digest.update(_line(entry, ""))
                continue
            parent, name = tree.parent(entry.path)
            content = ""
            if entry.kind is Kind.DIR:
                os.mkdir(name, 0o700, dir_fd=parent)
                dirs.append(entry)
            elif entry.hardlink_to:
                src_parent, src_name = tree.parent(entry.hardlink_to)
                os.link(
                    src_name, name, src_dir_fd=src_parent, dst_dir_fd=parent, follow_symlinks=False
                )
                content = "link:" + entry.hardlink_to
            elif entry.kind is Kind.FILE:
                content = _write_file(rootfs, entry, parent, name, report)
            elif entry.kind is Kind.SYMLINK:
                os.symlink(entry.linkname, name, dir_fd=parent)
                _metadata(entry, parent, name, report)
            elif not _make_node(entry, parent, name, report):
                continue
            else:
                _metadata(entry, parent, name, report)
            digest.update(_line(entry, content))
        # Directories last, deepest first: their mode may forbid writing into them and
        # adding children changes their mtime.
        for entry in reversed(dirs):
            if entry.path == ".":
                _metadata(entry, root_fd, None, report)
            else:
                parent, name = tree.parent(entry.path)
                _metadata(entry, parent, name, report)
    finally:
        tree.close()
        os.close(root_fd)
    report.digest = digest.hexdigest()
    return report


def _line(entry: Entry, content: str) -> bytes:
    fields = (
        entry.path,
        entry.kind.value,
        f"{entry.mode:o}",
        f"{entry.uid}:{entry.gid}",
        content,
        entry.linkname,
        f"{entry.devmajor}:{entry.devminor}",
    )
    return "\0".join(fields).encode("utf-8", "surrogateescape") + b"\n"


def _write_file(rootfs: Tree, entry: Entry, parent: int, name: str, report: DirectoryReport) -> str:
    digest = hashlib.sha256()
    fd = os.open(name, _NEW_FILE, 0o600, dir_fd=parent)
    try:
        if entry.size:
            with rootfs.open(entry.path) as src:
                while chunk := src.read(CHUNK):
                    digest.update(chunk)
                    _write_sparse(fd, chunk)
            os.ftruncate(fd, entry.size)  # a hole at the end is a size, not a write
        _metadata(entry, fd, None, report)
    finally:
        os.close(fd)
    return digest.hexdigest()


HOLE = 64 << 10  # zero runs this long (and aligned) become holes, as in the image
_ZEROS = bytes(HOLE)


def _write_sparse(fd: int, chunk: bytes) -> None:
    """Write ``chunk`` at the file offset, leaving its all-zero blocks as holes."""
    view = memoryview(chunk)
    for start in range(0, len(view), HOLE):
        block = view[start : start + HOLE]
        if len(block) == HOLE and block == _ZEROS:
            os.lseek(fd, HOLE, os.SEEK_CUR)
            continue
        while block:
            block = block[os.write(fd, block) :]


def _make_node(entry: Entry, parent: int, name: str, report: DirectoryReport) -> bool:
    kind = {Kind.CHAR: stat.S_IFCHR, Kind.BLOCK: stat.S_IFBLK, Kind.FIFO: stat.S_IFIFO}
    device = os.makedev(entry.devmajor, entry.devminor) if entry.kind is not Kind.FIFO else 0
    try:
        os.mknod(name, kind[entry.kind] | 0o600, device, dir_fd=parent)
    except PermissionError:
        report.devices.append(entry.path)
        return False
    return True


def _metadata(entry: Entry, fd: int, name: str | None, report: DirectoryReport) -> None:
    """Owner, then mode (chown clears set-id bits), xattrs (capabilities too), then times.

    With ``name`` None, ``fd`` is the file itself; else ``fd`` is its parent directory.
    """
    try:
        if name is None:
            os.fchown(fd, entry.uid, entry.gid)
        else:
            os.chown(name, entry.uid, entry.gid, dir_fd=fd, follow_symlinks=False)
    except PermissionError:
        report.owners.append(entry.path)
        if entry.kind is Kind.FILE and entry.mode & 0o6000:
            report.setid.append(entry.path)
    if entry.kind is not Kind.SYMLINK:  # Linux has no symlink modes
        if name is None:
            os.fchmod(fd, entry.mode & 0o7777)
        else:
            os.chmod(name, entry.mode & 0o7777, dir_fd=fd)
    for key, value in entry.xattrs:
        try:
            if name is None:
                os.setxattr(fd, key, value)
            else:
                _setxattr_at(fd, name, key, value)
        except OSError as exc:
            if exc.errno not in _XATTR_REFUSALS:
                raise
            report.xattrs.append(f"{entry.path} ({key}: {_xattr_failure(key, exc)})")
    times = (entry.mtime_ns, entry.mtime_ns)
    if name is None:
        os.utime(fd, ns=times)
    else:
        os.utime(name, ns=times, dir_fd=fd, follow_symlinks=False)


# What setxattr answers for a value the target cannot hold (ENOSPC, E2BIG: too large for
# one block of an ext4 without ea_inode, say), besides the refusals of namespaces.
_XATTR_REFUSALS = (
    errno.EPERM,
    errno.EACCES,
    errno.ENOTSUP,
    errno.EOPNOTSUPP,
    errno.ENOSPC,
    errno.E2BIG,
    errno.ERANGE,
)


def _xattr_failure(key: str, exc: OSError) -> str:
    """What really happened: a namespace reserved to root, or a filesystem that refuses."""
    if exc.errno in (errno.EPERM, errno.EACCES) and key.startswith(("trusted.", "security.")):
        return f"{key.split('.')[0]}.* needs root"
    if exc.errno in (errno.ENOTSUP, errno.EOPNOTSUPP):
        if key.startswith("system.posix_acl_"):
            return "the target filesystem does not take POSIX ACLs"
        return "the target filesystem does not take them"
    if exc.errno in (errno.ENOSPC, errno.E2BIG, errno.ERANGE):
        return "too large for the target filesystem's xattr space"
    return exc.strerror or str(exc)


def _setxattr_at(parent: int, name: str, key: str, value: bytes) -> None:
    # No setxattrat() in Python: go through /proc's view of the parent descriptor, which
    # resolves the final name without following it.
    os.setxattr(f"/proc/self/fd/{parent}/{name}", key, value, follow_symlinks=False)


# ------------------------------------------------------------------ the dir format


def write(job: Job, out: Path) -> None:
    target = job.targets[DIR]
    with job.progress.step(f"extracting the rootfs into {target.name}/"):
        report = extract(job.rootfs, out, check=job.check)
    for line in report.summary():
        job.warn(f"{target}: {line}")
    job.digests[out] = report.digest


DIR = OutputFormat(
    name="dir",
    summary="the rootfs as a directory, for an nfsroot",
    write=write,
    output_name=named("rootfs"),
    directory=True,
)
