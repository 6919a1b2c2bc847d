"""File types by the names verify's records use, from the type bits of a stat mode."""

from __future__ import annotations

import stat

KIND_BY_FORMAT = {
    stat.S_IFREG: "file",
    stat.S_IFDIR: "dir",
    stat.S_IFLNK: "symlink",
    stat.S_IFCHR: "char",
    stat.S_IFBLK: "block",
    stat.S_IFIFO: "fifo",
    stat.S_IFSOCK: "socket",
}


def kind_of(mode: int) -> str | None:
    """ "file", "dir", "symlink", "char", "block", "fifo", "socket"; None if unknown."""
    return KIND_BY_FORMAT.get(stat.S_IFMT(mode))
