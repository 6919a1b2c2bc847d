"""A directory on the host (an nfsroot written by ``-f dir``) read as a :class:`Tree`.

Nothing is followed: symlinks are entries, and content is opened with ``O_NOFOLLOW``.
Names of one inode share a ``link_group`` (the first of them in canonical order), found
with one walk of the whole tree. Digests are left to :func:`~oci2disk.rootfs.with_digests`.

Host tools: none.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import BinaryIO

from oci2disk.errors import VerifyError
from oci2disk.rootfs.model import ENCODING, ERRORS, Entry, Kind, Xattrs, normalize_path


class DirectoryTree:
    """The files under ``root`` as rootfs entries (the root itself is ".")."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        if not self.root.is_dir():
            raise VerifyError(f"{self.root} is not a directory")
        self._groups: dict[tuple[int, int], str] | None = None

    def _full(self, path: str) -> str:
        return os.fspath(self.root) if path == "." else os.path.join(self.root, path)

    def _walk(self) -> Iterator[tuple[str, os.stat_result]]:
        yield ".", os.lstat(self.root)
        stack = [iter(self._listing("."))]
        while stack:
            path = next(stack[-1], None)
            if path is None:
                stack.pop()
                continue
            st = os.lstat(self._full(path))
            yield path, st
            if stat.S_ISDIR(st.st_mode):
                stack.append(iter(self._listing(path)))

    def _listing(self, path: str) -> list[str]:
        names = sorted(os.listdir(self._full(path)), key=lambda n: n.encode(ENCODING, ERRORS))
        return [name if path == "." else f"{path}/{name}" for name in names]

    def _entry(self, path: str, st: os.stat_result) -> Entry:
        kind = Kind.from_mode(st.st_mode) or Kind.SOCKET  # lstat always names a type
        full = self._full(path)
        return Entry(
            path=path,
            kind=kind,
            mode=stat.S_IMODE(st.st_mode),
            uid=st.st_uid,
            gid=st.st_gid,
            size=st.st_size if kind in (Kind.FILE, Kind.SYMLINK) else 0,
            mtime_ns=st.st_mtime_ns,
            linkname=os.readlink(full) if kind is Kind.SYMLINK else "",
            devmajor=os.major(st.st_rdev) if kind.is_device else 0,
            devminor=os.minor(st.st_rdev) if kind.is_device else 0,
            xattrs=_xattrs(full),
        )

    def entries(self) -> Iterator[Entry]:
        """Every path, depth first, a directory before its contents, names sorted as bytes."""
        found = [(path, st) for path, st in self._walk()]
        names: dict[tuple[int, int], list[str]] = {}
        for path, st in found:
            if stat.S_ISREG(st.st_mode) and st.st_nlink > 1:
                names.setdefault((st.st_dev, st.st_ino), []).append(path)
        self._groups = {key: paths[0] for key, paths in names.items() if len(paths) > 1}
        for path, st in found:
            entry = self._entry(path, st)
            group = self._groups.get((st.st_dev, st.st_ino), "") if entry.is_file else ""
            yield replace(entry, link_group=group) if group else entry

    def lookup(self, path: str) -> Entry | None:
        key = normalize_path(path)
        try:
            st = os.lstat(self._full(key))
        except (FileNotFoundError, NotADirectoryError):
            return None
        entry = self._entry(key, st)
        if entry.is_file and st.st_nlink > 1:
            if self._groups is None:  # the other names are known only after a full walk
                for _ in self.entries():
                    pass
            assert self._groups is not None
            group = self._groups.get((st.st_dev, st.st_ino), "")
            if group:
                entry = replace(entry, link_group=group)
        return entry

    def open(self, path: str) -> BinaryIO:
        key = normalize_path(path)
        # O_NONBLOCK: opening a FIFO must not wait for a writer before it is refused.
        flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK
        try:
            fd = os.open(self._full(key), flags)
        except OSError as exc:
            raise VerifyError(f"cannot open {key} in {self.root}: {exc.strerror}") from exc
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            os.close(fd)
            raise VerifyError(f"{key} in {self.root} is not a regular file")
        os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")


def _xattrs(path: str) -> Xattrs:
    try:
        names = os.listxattr(path, follow_symlinks=False)
    except OSError:
        return ()
    found = [(n, os.getxattr(path, n, follow_symlinks=False)) for n in names]
    return tuple(sorted(found, key=lambda kv: kv[0].encode(ENCODING, ERRORS)))
