"""The rootfs: one vocabulary for a path in a root filesystem, and the trees that hold them."""

from oci2disk.rootfs.model import (
    Entry,
    ExtraFile,
    Kind,
    RootfsStats,
    Tree,
    follow,
    normalize_path,
    pax_xattrs,
    with_digests,
)

__all__ = [
    "Entry",
    "ExtraFile",
    "Kind",
    "RootfsStats",
    "Tree",
    "follow",
    "normalize_path",
    "pax_xattrs",
    "with_digests",
]
