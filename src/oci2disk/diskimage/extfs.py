"""Read ext2/ext3/ext4 filesystems inside a file, read-only, without mounting anything.

``oci2disk verify`` reads back what ``mke2fs -d`` wrote into a disk image, as an
unprivileged user: no loop device, no ``mount``, no ``debugfs`` text to parse. The
reader follows the on-disk format of the Linux kernel's ``fs/ext4`` (and e2fsprogs)
for everything a rootfs uses: block maps and extent trees, htree directories (read
linearly), inline data, fast and slow symlinks, device numbers, 32-bit owners,
nanosecond mtimes and extended attributes (in the inode, in an external block, or in
an EA inode). It reads with positioned reads, so an image of any size costs only the
blocks it touches.

:class:`ExtFs` is a :class:`~oci2disk.rootfs.model.Tree`: ``entries()`` in canonical
order, ``lookup()`` and ``open()``, so ``verify`` and ``boot`` read it as they read any
other rootfs. :func:`open_filesystem` picks the filesystem of a disk (through
:mod:`oci2disk.diskimage.partitions`) or of a bare filesystem image.

Host tools: none.
"""

from __future__ import annotations

import io
import logging
import os
import struct
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from types import TracebackType
from typing import BinaryIO

from oci2disk.bytestreams import RunReader
from oci2disk.diskimage import partitions
from oci2disk.errors import VerifyError
from oci2disk.rootfs.model import ENCODING, ERRORS, Entry, Kind, normalize_path

log = logging.getLogger("oci2disk.extfs")

SUPERBLOCK_OFFSET = 1024
EXT_MAGIC = 0xEF53
ROOT_INODE = 2
XATTR_MAGIC = 0xEA020000
EXTENT_MAGIC = 0xF30A
# An extent longer than this marks an uninitialized (preallocated, reads as zeros) one.
EXTENT_INIT_MAX_LEN = 32768
N_BLOCKS_BYTES = 60  # i_block: 15 little-endian u32
MAX_EXTENT_DEPTH = 5
DIR_CACHE_SIZE = 64  # directories whose listings lookup() keeps

# Superblock feature bits (names as dumpe2fs prints them).
COMPAT_FEATURES = {
    0x1: "dir_prealloc",
    0x2: "imagic_inodes",
    0x4: "has_journal",
    0x8: "ext_attr",
    0x10: "resize_inode",
    0x20: "dir_index",
    0x40: "lazy_bg",
    0x100: "snapshot_bitmap",
    0x200: "sparse_super2",
    0x400: "fast_commit",
    0x800: "stable_inodes",
    0x1000: "orphan_file",
}
INCOMPAT_FEATURES = {
    0x1: "compression",
    0x2: "filetype",
    0x4: "needs_recovery",
    0x8: "journal_dev",
    0x10: "meta_bg",
    0x40: "extent",
    0x80: "64bit",
    0x100: "mmp",
    0x200: "flex_bg",
    0x400: "ea_inode",
    0x1000: "dirdata",
    0x2000: "metadata_csum_seed",
    0x4000: "large_dir",
    0x8000: "inline_data",
    0x10000: "encrypt",
    0x20000: "casefold",
}
RO_COMPAT_FEATURES = {
    0x1: "sparse_super",
    0x2: "large_file",
    0x4: "btree_dir",
    0x8: "huge_file",
    0x10: "uninit_bg",
    0x20: "dir_nlink",
    0x40: "extra_isize",
    0x80: "snapshot",
    0x100: "quota",
    0x200: "bigalloc",
    0x400: "metadata_csum",
    0x800: "replica",
    0x1000: "read-only",
    0x2000: "project",
    0x4000: "shared_blocks",
    0x8000: "verity",
    0x10000: "orphan_present",
}
COMPAT_SPARSE_SUPER2 = 0x200
COMPAT_HAS_JOURNAL = 0x4
INCOMPAT_FILETYPE = 0x2
INCOMPAT_RECOVER = 0x4
INCOMPAT_META_BG = 0x10
INCOMPAT_64BIT = 0x80
RO_COMPAT_SPARSE_SUPER = 0x1
RO_COMPAT_HUGE_FILE = 0x8
# Features whose data this reader would silently misread: refuse them instead.
INCOMPAT_UNSUPPORTED = 0x1 | 0x8 | 0x1000  # compression, journal_dev, dirdata
# Anything beyond these makes a filesystem "ext4" rather than ext2/ext3.
INCOMPAT_EXT23 = INCOMPAT_FILETYPE | INCOMPAT_RECOVER | INCOMPAT_META_BG
RO_COMPAT_EXT23 = 0x1 | 0x2 | 0x4

# Inode flags.
FL_IMMUTABLE = 0x10
FL_APPEND = 0x20
SHOWN_FLAGS = {FL_IMMUTABLE: "immutable", FL_APPEND: "append-only"}  # chattr +i, +a
FL_HUGE_FILE = 0x40000
FL_EXTENTS = 0x80000
FL_EA_INODE = 0x200000
FL_INLINE_DATA = 0x10000000

XATTR_PREFIXES = {
    0: "",
    1: "user.",
    2: "system.posix_acl_access",
    3: "system.posix_acl_default",
    4: "trusted.",
    6: "security.",
    7: "system.",
    8: "system.richacl",
}
ACL_INDEXES = (2, 3)
# Inline data keeps its tail in this xattr: part of the content, not a user-visible xattr.
INLINE_DATA_XATTR = "system.data"

# POSIX ACL tags (ext4 stores the short form of the entries without an id).
ACL_USER = 0x02
ACL_GROUP = 0x08
ACL_UNDEFINED_ID = 0xFFFFFFFF
EXT4_ACL_VERSION = 1
VFS_ACL_VERSION = 2


@dataclass(frozen=True)
class _Inode:
    number: int
    raw: bytes
    mode: int
    uid: int
    gid: int
    size: int
    mtime_ns: int
    nlink: int
    flags: int
    blocks_512: int
    file_acl: int
    extra_isize: int

    @property
    def kind(self) -> Kind | None:
        return Kind.from_mode(self.mode)

    @property
    def i_block(self) -> bytes:
        return self.raw[0x28 : 0x28 + N_BLOCKS_BYTES]


@dataclass(frozen=True)
class _Run:
    """``count`` logical blocks from ``logical`` stored at ``physical`` (0: reads as zeros)."""

    logical: int
    count: int
    physical: int


class ExtFs:
    """An ext2/3/4 filesystem at byte ``offset`` of the file ``path``, opened read-only.

    Attributes: ``uuid``, ``label``, ``block_size``, ``inode_size``, ``blocks_count``,
    ``size`` (bytes), ``fs_type`` ("ext2", "ext3" or "ext4"), ``features`` (names as
    dumpe2fs prints them) and the raw ``feature_compat/incompat/ro_compat`` bits.
    """

    def __init__(self, path: Path, offset: int = 0) -> None:
        self.path = Path(path)
        self.offset = offset
        try:
            self._fd = os.open(os.fspath(self.path), os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
        except OSError as exc:
            raise VerifyError(f"cannot open {self.path}: {exc.strerror}") from exc
        self._closed = False
        self._desc_cache: dict[int, int] = {}
        self._xattr_block_cache: dict[int, list[tuple[str, bytes]]] = {}
        self._dir_cache: dict[int, dict[bytes, int]] = {}
        self._groups: dict[int, str] | None = None  # inode -> its first name, once walked
        try:
            self._load_superblock()
        except BaseException:
            self.close()
            raise

    # -- context manager ------------------------------------------------------------

    def __enter__(self) -> ExtFs:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            os.close(self._fd)

    # -- superblock -----------------------------------------------------------------

    def _load_superblock(self) -> None:
        sb = self._pread(SUPERBLOCK_OFFSET, 1024, what="the superblock")
        (magic,) = struct.unpack_from("<H", sb, 0x38)
        if magic != EXT_MAGIC:
            raise VerifyError(
                f"{self.path} holds no ext2/ext3/ext4 filesystem at byte {self.offset} "
                f"(superblock magic 0x{magic:04x}, expected 0x{EXT_MAGIC:04x})",
                hint="pass the disk image (its partition table is read) or the bare "
                "filesystem image; choose the partition if the disk has several",
            )
        words: tuple[int, ...] = struct.unpack_from("<11I", sb, 0)
        self.inodes_count = words[0]
        blocks_lo = words[1]
        self.first_data_block = words[5]
        log_block_size = words[6]
        self.blocks_per_group = words[8]
        self.inodes_per_group = words[10]
        (rev_level,) = struct.unpack_from("<I", sb, 0x4C)
        (inode_size,) = struct.unpack_from("<H", sb, 0x58)
        self.feature_compat, self.feature_incompat, self.feature_ro_compat = struct.unpack_from(
            "<3I", sb, 0x5C
        )
        (desc_size,) = struct.unpack_from("<H", sb, 0xFE)
        (self._first_meta_bg,) = struct.unpack_from("<I", sb, 0x104)
        (blocks_hi,) = struct.unpack_from("<I", sb, 0x150)
        self._backup_bgs = struct.unpack_from("<2I", sb, 0x24C)
        if log_block_size > 6:
            raise self._corrupt(f"block size 2^{10 + log_block_size} is not possible")
        self.block_size = 1024 << log_block_size
        self.inode_size = inode_size if rev_level >= 1 else 128
        if (
            self.inode_size < 128
            or self.inode_size > self.block_size
            or self.inode_size & (self.inode_size - 1)
        ):
            raise self._corrupt(f"inode size {self.inode_size} is not possible")
        if self.blocks_per_group == 0 or self.inodes_per_group == 0:
            raise self._corrupt("blocks or inodes per group is 0")
        self.is_64bit = bool(self.feature_incompat & INCOMPAT_64BIT)
        self.blocks_count = blocks_lo | (blocks_hi << 32 if self.is_64bit else 0)
        self.desc_size = desc_size if self.is_64bit and desc_size >= 64 else 32
        if self.desc_size > self.block_size or self.desc_size & (self.desc_size - 1):
            raise self._corrupt(f"group descriptor size {self.desc_size} is not possible")
        self.group_count = -(-(self.blocks_count - self.first_data_block) // self.blocks_per_group)
        self.uuid = str(uuid.UUID(bytes=sb[0x68:0x78]))
        self.flagged: dict[str, int] = {}  # paths whose inode is immutable or append-only
        self.label = sb[0x78:0x88].split(b"\0", 1)[0].decode("utf-8", "replace")
        self.features = frozenset(
            name
            for value, table in (
                (self.feature_compat, COMPAT_FEATURES),
                (self.feature_incompat, INCOMPAT_FEATURES),
                (self.feature_ro_compat, RO_COMPAT_FEATURES),
            )
            for bit, name in table.items()
            if value & bit
        )
        unsupported = self.feature_incompat & INCOMPAT_UNSUPPORTED
        if unsupported:
            names = ", ".join(n for b, n in INCOMPAT_FEATURES.items() if unsupported & b)
            raise VerifyError(
                f"{self.path}: filesystem uses features this reader does not support: {names}"
            )
        if self.feature_incompat & INCOMPAT_RECOVER:
            raise VerifyError(
                f"{self.path}: the filesystem at byte {self.offset} has a journal that needs "
                "recovery, so its contents on disk are not final",
                hint="it was not unmounted cleanly; run e2fsck on a copy of the image",
            )
        log.debug(
            "%s@%d: %s, %d-byte blocks, %d groups, features %s",
            self.path,
            self.offset,
            self.fs_type,
            self.block_size,
            self.group_count,
            " ".join(sorted(self.features)),
        )

    @property
    def fs_type(self) -> str:
        """ "ext4" when any ext4-only feature is on, else "ext3" with a journal, else "ext2"."""
        if self.feature_incompat & ~INCOMPAT_EXT23 or self.feature_ro_compat & ~RO_COMPAT_EXT23:
            return "ext4"
        return "ext3" if self.feature_compat & COMPAT_HAS_JOURNAL else "ext2"

    @property
    def size(self) -> int:
        """Size of the filesystem in bytes."""
        return self.blocks_count * self.block_size

    # -- low-level reads -------------------------------------------------------------

    def _corrupt(self, detail: str) -> VerifyError:
        return VerifyError(
            f"{self.path}: the ext filesystem at byte {self.offset} is corrupt: {detail}",
            hint="check it with: e2fsck -fn 'IMAGE?offset=N'",
        )

    def _pread(self, position: int, length: int, *, what: str = "data") -> bytes:
        if self._closed:
            raise VerifyError(f"{self.path}: the filesystem reader is closed")
        data = os.pread(self._fd, length, self.offset + position)
        if len(data) != length:
            raise self._truncated(self.offset + position, length, what)
        return data

    def _truncated(self, absolute: int, length: int, what: str) -> VerifyError:
        return VerifyError(
            f"{self.path} ends before {what} of the filesystem at byte {self.offset} "
            f"(needs bytes up to {absolute + length})",
            hint="the image is truncated, or the offset is not where the filesystem starts",
        )

    def _read_block(self, block: int) -> bytes:
        if block >= self.blocks_count:
            raise self._corrupt(f"block {block} is beyond the end ({self.blocks_count} blocks)")
        return self._pread(block * self.block_size, self.block_size, what=f"block {block}")

    # -- group descriptors and inodes -----------------------------------------------

    def _group_has_super(self, group: int) -> bool:
        if group == 0:
            return True
        if self.feature_compat & COMPAT_SPARSE_SUPER2:
            return group in self._backup_bgs
        if group == 1 or not self.feature_ro_compat & RO_COMPAT_SPARSE_SUPER:
            return True
        if group % 2 == 0:
            return False
        for base in (3, 5, 7):
            power = base
            while power < group:
                power *= base
            if power == group:
                return True
        return False

    def _inode_table(self, group: int) -> int:
        cached = self._desc_cache.get(group)
        if cached is not None:
            return cached
        per_block = self.block_size // self.desc_size
        index, slot = divmod(group, per_block)
        if self.feature_incompat & INCOMPAT_META_BG and index >= self._first_meta_bg:
            first = index * per_block
            block = self.first_data_block + first * self.blocks_per_group
            block += 1 if self._group_has_super(first) else 0
        else:
            block = self.first_data_block + 1 + index
        desc = self._pread(
            block * self.block_size + slot * self.desc_size,
            self.desc_size,
            what=f"group descriptor {group}",
        )
        table: int = struct.unpack_from("<I", desc, 0x8)[0]
        if self.desc_size >= 64:
            (table_hi,) = struct.unpack_from("<I", desc, 0x28)
            table |= table_hi << 32
        if table == 0 or table >= self.blocks_count:
            raise self._corrupt(f"group {group} has its inode table at block {table}")
        self._desc_cache[group] = table
        return table

    def _inode(self, number: int) -> _Inode:
        if not 1 <= number <= self.inodes_count:
            raise self._corrupt(f"inode number {number} is out of range")
        group, index = divmod(number - 1, self.inodes_per_group)
        if group >= self.group_count:
            raise self._corrupt(f"inode {number} lies in group {group} past the last group")
        table = self._inode_table(group)
        raw = self._pread(
            table * self.block_size + index * self.inode_size,
            self.inode_size,
            what=f"inode {number}",
        )
        mode, uid_lo, size_lo = struct.unpack_from("<HHI", raw, 0)
        (mtime,) = struct.unpack_from("<i", raw, 0x10)
        gid_lo, nlink, blocks_lo, flags = struct.unpack_from("<HHII", raw, 0x18)
        (file_acl_lo,) = struct.unpack_from("<I", raw, 0x68)
        (size_hi,) = struct.unpack_from("<I", raw, 0x6C)
        blocks_hi, file_acl_hi, uid_hi, gid_hi = struct.unpack_from("<4H", raw, 0x74)
        extra_isize = 0
        mtime_ns = mtime * 1_000_000_000
        if self.inode_size > 128:
            (extra_isize,) = struct.unpack_from("<H", raw, 0x80)
            if 128 + extra_isize > self.inode_size or extra_isize % 4:
                raise self._corrupt(f"inode {number} has extra size {extra_isize}")
            if extra_isize >= 0x88 + 4 - 128:  # i_mtime_extra fits
                (extra,) = struct.unpack_from("<I", raw, 0x88)
                seconds = mtime + ((extra & 3) << 32)
                mtime_ns = seconds * 1_000_000_000 + (extra >> 2)
        blocks = blocks_lo
        if self.feature_ro_compat & RO_COMPAT_HUGE_FILE:
            blocks |= blocks_hi << 32
            if flags & FL_HUGE_FILE:
                blocks *= self.block_size // 512
        return _Inode(
            number=number,
            raw=raw,
            mode=mode,
            uid=uid_lo | uid_hi << 16,
            gid=gid_lo | gid_hi << 16,
            size=size_lo | size_hi << 32,
            mtime_ns=mtime_ns,
            nlink=nlink,
            flags=flags,
            blocks_512=blocks,
            file_acl=file_acl_lo | (file_acl_hi << 32 if self.is_64bit else 0),
            extra_isize=extra_isize,
        )

    # -- block mapping ---------------------------------------------------------------

    def _runs(self, inode: _Inode) -> list[_Run]:
        """Where each allocated logical block of ``inode`` lives, sorted, merged."""
        runs: list[_Run] = []
        if inode.flags & FL_EXTENTS:
            self._extent_runs(inode.i_block, MAX_EXTENT_DEPTH, runs, inode.number)
            runs.sort(key=lambda run: run.logical)
        else:
            self._blockmap_runs(inode, runs)
        merged: list[_Run] = []
        for run in runs:
            if run.count == 0:
                continue
            if merged:
                last = merged[-1]
                if run.logical < last.logical + last.count:
                    raise self._corrupt(
                        f"inode {inode.number} maps logical block {run.logical} twice"
                    )
                contiguous = run.logical == last.logical + last.count and (
                    (run.physical == 0 and last.physical == 0)
                    or (last.physical and run.physical == last.physical + last.count)
                )
                if contiguous:
                    merged[-1] = _Run(last.logical, last.count + run.count, last.physical)
                    continue
            merged.append(run)
        return merged

    def _extent_runs(self, node: bytes, max_depth: int, out: list[_Run], number: int) -> None:
        magic, entries, _max, depth, _generation = struct.unpack_from("<HHHHI", node, 0)
        if magic != EXTENT_MAGIC:
            raise self._corrupt(f"inode {number} has a bad extent header (0x{magic:04x})")
        if depth > max_depth or entries > (len(node) - 12) // 12:
            raise self._corrupt(f"inode {number} has an impossible extent node")
        for i in range(entries):
            position = 12 + 12 * i
            if depth == 0:
                logical, length, start_hi, start_lo = struct.unpack_from("<IHHI", node, position)
                if length > EXTENT_INIT_MAX_LEN:
                    out.append(_Run(logical, length - EXTENT_INIT_MAX_LEN, 0))
                else:
                    physical = start_lo | start_hi << 32
                    if physical + length > self.blocks_count:
                        raise self._corrupt(f"inode {number} has an extent past the end")
                    out.append(_Run(logical, length, physical))
            else:
                _logical, leaf_lo, leaf_hi = struct.unpack_from("<IIH", node, position)
                child = self._read_block(leaf_lo | leaf_hi << 32)
                (child_depth,) = struct.unpack_from("<H", child, 6)
                if child_depth != depth - 1:
                    raise self._corrupt(f"inode {number} has an extent index at the wrong depth")
                self._extent_runs(child, depth - 1, out, number)

    def _blockmap_runs(self, inode: _Inode, out: list[_Run]) -> None:
        # ext2/ext3: 12 direct pointers, then single, double and triple indirect blocks.
        pointers = struct.unpack("<15I", inode.i_block)
        per_block = self.block_size // 4
        for logical, physical in enumerate(pointers[:12]):
            if physical:
                out.append(_Run(logical, 1, physical))
        base = 12
        for level, pointer in enumerate(pointers[12:], start=1):
            self._indirect_runs(pointer, level, base, out, inode.number)
            base += per_block**level

    def _indirect_runs(
        self, block: int, level: int, base: int, out: list[_Run], number: int
    ) -> None:
        if block == 0:
            return
        per_block = self.block_size // 4
        pointers = struct.unpack(f"<{per_block}I", self._read_block(block))
        span = per_block ** (level - 1)
        for i, pointer in enumerate(pointers):
            if pointer == 0:
                continue
            if level == 1:
                if pointer >= self.blocks_count:
                    raise self._corrupt(f"inode {number} points past the end (block {pointer})")
                out.append(_Run(base + i, 1, pointer))
            else:
                self._indirect_runs(pointer, level - 1, base + i * span, out, number)

    # -- xattrs and inline data ------------------------------------------------------

    def _raw_xattrs(self, inode: _Inode) -> list[tuple[str, bytes]]:
        found: list[tuple[str, bytes]] = []
        start = 128 + inode.extra_isize
        if inode.extra_isize and start + 4 <= len(inode.raw):
            (magic,) = struct.unpack_from("<I", inode.raw, start)
            if magic == XATTR_MAGIC:
                # Value offsets count from the first entry, right after the magic.
                found += self._parse_xattrs(inode.raw[start + 4 :], 0, inode.number)
        if inode.file_acl:
            cached = self._xattr_block_cache.get(inode.file_acl)
            if cached is None:
                block = self._read_block(inode.file_acl)
                magic, _refcount, nblocks = struct.unpack_from("<3I", block, 0)
                if magic != XATTR_MAGIC or nblocks != 1:
                    raise self._corrupt(
                        f"inode {inode.number} has a bad xattr block {inode.file_acl}"
                    )
                cached = self._parse_xattrs(block, 32, inode.number)
                self._xattr_block_cache[inode.file_acl] = cached
            found += cached
        return found

    def _parse_xattrs(self, region: bytes, first: int, number: int) -> list[tuple[str, bytes]]:
        found: list[tuple[str, bytes]] = []
        position = first
        while position + 4 <= len(region):
            if region[position : position + 4] == b"\0\0\0\0":
                break
            if position + 16 > len(region):
                raise self._corrupt(f"inode {number} has a truncated xattr entry")
            name_len, index, value_offset, value_inode, value_size, _hash = struct.unpack_from(
                "<BBHIII", region, position
            )
            name_end = position + 16 + name_len
            if name_end > len(region) or index not in XATTR_PREFIXES:
                raise self._corrupt(f"inode {number} has a bad xattr entry")
            name = XATTR_PREFIXES[index] + region[position + 16 : name_end].decode(
                "utf-8", "surrogateescape"
            )
            if value_inode:
                value = self._ea_inode_value(value_inode, value_size)
            else:
                if value_offset + value_size > len(region):
                    raise self._corrupt(f"inode {number}: xattr {name} points outside")
                value = region[value_offset : value_offset + value_size]
            if index in ACL_INDEXES:
                value = _acl_to_vfs(value)
            found.append((name, value))
            position = (name_end + 3) & ~3
        return found

    def _ea_inode_value(self, number: int, size: int) -> bytes:
        # ea_inode feature: a large value lives in the data of an inode of its own.
        inode = self._inode(number)
        if not inode.flags & FL_EA_INODE:
            raise self._corrupt(f"xattr value inode {number} is not flagged as one")
        with self._open_inode(inode) as stream:
            value = stream.read(size)
        if len(value) != size:
            raise self._corrupt(f"xattr value inode {number} is shorter than {size} bytes")
        return value

    def _inline_data(self, inode: _Inode) -> bytes:
        extra = b""
        for name, value in self._raw_xattrs(inode):
            if name == INLINE_DATA_XATTR:
                extra = value
        return inode.i_block + extra

    # -- content ---------------------------------------------------------------------

    def _open_inode(self, inode: _Inode) -> BinaryIO:
        if inode.flags & FL_INLINE_DATA:
            return io.BytesIO(self._inline_data(inode)[: inode.size])
        raw = RunReader(
            self._fd,
            self._byte_runs(self._runs(inode), inode.size),
            short_read=lambda offset, length: self._truncated(offset, length, "file data"),
        )
        return io.BufferedReader(raw, buffer_size=1 << 16)

    def _byte_runs(self, runs: list[_Run], size: int) -> list[tuple[int, int | None]]:
        """Block runs as byte runs over the whole file: holes and uninitialized extents
        become zero runs, and the last run is cut at the file's size."""
        bs = self.block_size
        out: list[tuple[int, int | None]] = []
        position = 0
        for run in sorted(runs, key=lambda r: r.logical):
            start = run.logical * bs
            if start >= size:
                break
            if start > position:
                out.append((start - position, None))
            length = min(run.count * bs, size - start)
            out.append((length, self.offset + run.physical * bs if run.physical else None))
            position = start + length
        if position < size:
            out.append((size - position, None))
        return out

    def _symlink_target(self, inode: _Inode) -> bytes:
        ea_blocks = self.block_size // 512 if inode.file_acl else 0
        if inode.flags & FL_INLINE_DATA:
            data = self._inline_data(inode)
        elif inode.size < N_BLOCKS_BYTES and inode.blocks_512 - ea_blocks <= 0:
            data = inode.i_block  # fast symlink: the target is in i_block itself
        else:
            if inode.size > 65536:
                raise self._corrupt(f"symlink inode {inode.number} is {inode.size} bytes long")
            with self._open_inode(inode) as stream:
                data = stream.read(inode.size)
        if len(data) < inode.size:
            raise self._corrupt(f"symlink inode {inode.number} is shorter than its size")
        return data[: inode.size]

    def _dir_entries(self, inode: _Inode) -> Iterator[tuple[bytes, int]]:
        """(name, inode) of each entry, in on-disk order, "." and ".." included."""
        if inode.flags & FL_INLINE_DATA:
            data = self._inline_data(inode)
            (parent,) = struct.unpack_from("<I", data, 0)
            yield b".", inode.number
            yield b"..", parent
            yield from self._dirents(data[4:N_BLOCKS_BYTES], inode.number)
            yield from self._dirents(data[N_BLOCKS_BYTES:], inode.number)
            return
        bs = self.block_size
        for run in self._runs(inode):
            if run.physical == 0:
                continue
            for i in range(run.count):
                if (run.logical + i) * bs >= inode.size:
                    return
                yield from self._dirents(self._read_block(run.physical + i), inode.number)

    def _dirents(self, region: bytes, number: int) -> Iterator[tuple[bytes, int]]:
        # htree (dir_index) interior blocks look like one empty entry spanning the block,
        # so reading every block linearly yields exactly the directory's entries.
        has_type = bool(self.feature_incompat & INCOMPAT_FILETYPE)
        position = 0
        while position + 8 <= len(region):
            child, rec_len, name_len, file_type = struct.unpack_from("<IHBB", region, position)
            if not has_type:
                name_len |= file_type << 8
            if rec_len in (0, 65535) and len(region) == 65536:
                rec_len = 65536
            else:
                rec_len = (rec_len & 65532) | ((rec_len & 3) << 16)
            if rec_len < 8 or position + rec_len > len(region) or 8 + name_len > rec_len:
                raise self._corrupt(f"directory inode {number} has a bad entry at {position}")
            if child and name_len:
                yield region[position + 8 : position + 8 + name_len], child
            position += rec_len

    # -- public API ------------------------------------------------------------------

    def _resolve(self, path: str) -> _Inode:
        number = self._lookup_number(path)
        if number is None:
            raise VerifyError(f"{self.path}: no such path in the filesystem: {path}")
        return self._inode(number)

    def _lookup_number(self, path: str) -> int | None:
        number = ROOT_INODE
        for part in path.split("/"):
            if part in ("", "."):
                continue
            inode = self._inode(number)
            if inode.kind is not Kind.DIR:
                return None
            found = self._directory(inode).get(part.encode(ENCODING, ERRORS))
            if found is None:
                return None
            number = found
        return number

    def _directory(self, inode: _Inode) -> dict[bytes, int]:
        # Lookups of many paths in one large directory would each re-read all of it.
        cached = self._dir_cache.pop(inode.number, None)
        if cached is None:
            cached = dict(self._dir_entries(inode))
        self._dir_cache[inode.number] = cached  # most recently used last
        while len(self._dir_cache) > DIR_CACHE_SIZE:
            del self._dir_cache[next(iter(self._dir_cache))]
        return cached

    def _entry(self, path: str, inode: _Inode) -> Entry:
        kind = inode.kind
        if kind is None:
            raise self._corrupt(f"inode {inode.number} ({path}) has mode 0o{inode.mode:o}")
        linkname = ""
        major = minor = 0
        if kind is Kind.SYMLINK:
            linkname = self._symlink_target(inode).decode(ENCODING, ERRORS)
        elif kind.is_device:
            word0, word1 = struct.unpack_from("<II", inode.i_block, 0)
            if word0:  # old encoding: 8-bit major and minor
                major, minor = (word0 >> 8) & 0xFF, word0 & 0xFF
            else:  # new encoding (new_encode_dev): 12-bit major, 20-bit minor
                major = (word1 & 0xFFF00) >> 8
                minor = (word1 & 0xFF) | ((word1 >> 12) & 0xFFF00)
        xattrs = tuple(sorted((n, v) for n, v in self._raw_xattrs(inode) if n != INLINE_DATA_XATTR))
        return Entry(
            path=path,
            kind=kind,
            mode=inode.mode & 0o7777,
            uid=inode.uid,
            gid=inode.gid,
            size=inode.size,
            mtime_ns=inode.mtime_ns,
            linkname=linkname,
            devmajor=major,
            devminor=minor,
            xattrs=xattrs,
        )

    def _children(self, path: str, inode: _Inode) -> list[tuple[str, int]]:
        children: list[tuple[bytes, int]] = []
        for name, number in self._dir_entries(inode):
            if name in (b".", b".."):
                continue
            if b"/" in name or b"\0" in name:
                raise self._corrupt(f"directory {path} holds the name {name!r}")
            children.append((name, number))
        children.sort()
        prefix = "" if path == "." else path + "/"
        return [(prefix + n.decode(ENCODING, ERRORS), i) for n, i in children]

    def _walk(self) -> Iterator[tuple[Entry, int]]:
        """(entry without link group, inode number) of every path, in canonical order."""
        root = self._inode(ROOT_INODE)
        yield self._entry(".", root), ROOT_INODE
        seen_dirs = {ROOT_INODE}
        stack = [iter(self._children(".", root))]
        while stack:
            item = next(stack[-1], None)
            if item is None:
                stack.pop()
                continue
            path, number = item
            inode = self._inode(number)
            entry = self._entry(path, inode)
            if inode.flags & (FL_IMMUTABLE | FL_APPEND):
                self.flagged[path] = inode.flags & (FL_IMMUTABLE | FL_APPEND)
            yield entry, number
            if entry.kind is Kind.DIR:
                if number in seen_dirs:
                    raise self._corrupt(f"directory inode {number} is reached twice ({path})")
                seen_dirs.add(number)
                stack.append(iter(self._children(path, inode)))

    def entries(self) -> Iterator[Entry]:
        """Every path, depth first, a directory before its contents, names sorted as bytes.

        The root is ``"."``; nothing is skipped (``lost+found`` included). Names of one
        inode share a ``link_group``: the first of them in this order.
        """
        walked = list(self._walk())
        names: dict[int, list[str]] = {}
        for entry, number in walked:
            if entry.kind is not Kind.DIR:
                names.setdefault(number, []).append(entry.path)
        self._groups = {number: paths[0] for number, paths in names.items() if len(paths) > 1}
        for entry, number in walked:
            group = self._groups.get(number, "") if entry.kind is not Kind.DIR else ""
            yield replace(entry, link_group=group) if group else entry

    def lookup(self, path: str) -> Entry | None:
        """The entry at ``path`` ("etc/passwd", "/etc/passwd" or "."), symlinks not followed."""
        number = self._lookup_number(path)
        if number is None:
            return None
        return self._grouped(normalize_path(path), self._inode(number))

    def children(self, path: str) -> list[Entry]:
        """The entries directly in the directory ``path``, names sorted as bytes."""
        inode = self._resolve(path)
        if inode.kind is not Kind.DIR:
            raise VerifyError(f"{self.path}: {path} is a {_kind_name(inode)}, not a directory")
        return [
            self._grouped(child, self._inode(number))
            for child, number in self._children(normalize_path(path), inode)
        ]

    def _grouped(self, path: str, inode: _Inode) -> Entry:
        entry = self._entry(path, inode)
        if inode.nlink > 1 and entry.kind is not Kind.DIR:
            if self._groups is None:  # its other names are known only after a full walk
                for _ in self.entries():
                    pass
            assert self._groups is not None
            group = self._groups.get(inode.number, "")
            if group:
                entry = replace(entry, link_group=group)
        return entry

    def open(self, path: str) -> BinaryIO:
        """A seekable binary stream of a regular file's content (holes read as zeros)."""
        inode = self._resolve(path)
        if inode.kind is not Kind.FILE:
            raise VerifyError(f"{self.path}: {path} is a {_kind_name(inode)}, not a regular file")
        return self._open_inode(inode)

    def read_symlink(self, path: str) -> str:
        """The target of the symlink at ``path``."""
        inode = self._resolve(path)
        if inode.kind is not Kind.SYMLINK:
            raise VerifyError(f"{self.path}: {path} is a {_kind_name(inode)}, not a symlink")
        return self._symlink_target(inode).decode(ENCODING, ERRORS)

    def inode_number(self, path: str) -> int:
        """The inode number of ``path`` (its hard links share it)."""
        return self._resolve(path).number

    def link_count(self, path: str) -> int:
        """The number of names the inode of ``path`` has, as its inode records it."""
        return self._resolve(path).nlink


def _kind_name(inode: _Inode) -> str:
    kind = inode.kind
    return kind.value if kind is not None else f"file of mode 0o{inode.mode:o}"


def _acl_to_vfs(value: bytes) -> bytes:
    """ext4's compact POSIX ACL to the form getfattr and tar archives show (version 2)."""
    if len(value) < 4 or struct.unpack_from("<I", value, 0)[0] != EXT4_ACL_VERSION:
        return value
    out = [struct.pack("<I", VFS_ACL_VERSION)]
    position = 4
    while position + 4 <= len(value):
        tag, perm = struct.unpack_from("<HH", value, position)
        if tag in (ACL_USER, ACL_GROUP):
            if position + 8 > len(value):
                return value
            (ident,) = struct.unpack_from("<I", value, position + 4)
            position += 8
        else:
            ident = ACL_UNDEFINED_ID
            position += 4
        out.append(struct.pack("<HHI", tag, perm, ident))
    return b"".join(out)


def has_ext_magic(image: Path, offset: int) -> bool:
    """Whether an ext2/3/4 superblock starts at byte ``offset`` of ``image``."""
    with Path(image).open("rb") as handle:
        handle.seek(offset + SUPERBLOCK_OFFSET + 0x38)
        magic = handle.read(2)
    return magic == struct.pack("<H", EXT_MAGIC)


def filesystem_offsets(image: Path) -> list[int]:
    """Byte offsets of the ext filesystems of ``image``: the root partition's first
    (:func:`~oci2disk.diskimage.partitions.root_partition`), then the other partitions
    in table order; offset 0 for a bare filesystem; [] when there is none."""
    parts = partitions.read_partitions(Path(image))
    if not parts:
        return [0] if has_ext_magic(image, 0) else []
    root = partitions.root_partition(parts)
    ordered = ([root] if root is not None else []) + [p for p in parts if p is not root]
    return [p.start for p in ordered if has_ext_magic(image, p.start)]


def open_filesystem(image: Path, partition: int | None = None) -> ExtFs:
    """Open the ext filesystem of a disk image or of a bare filesystem image.

    A disk with a partition table: ``partition`` if given; else its only partition, or
    its first GPT root partition, or its first Linux partition, or else the first that
    holds an ext filesystem. An image without a table is read as a bare filesystem at
    offset 0.
    """
    image = Path(image)
    parts = partitions.read_partitions(image)
    numbers = ", ".join(str(p.number) for p in parts)
    if partition is not None:
        for candidate in parts:
            if candidate.number == partition:
                return ExtFs(image, candidate.start)
        if not parts:
            raise VerifyError(
                f"{image} has no partition table, so it has no partition {partition}",
                hint="leave out the partition number to read a bare filesystem image",
            )
        raise VerifyError(f"{image} has no partition {partition} (it has: {numbers})")
    if not parts:
        return ExtFs(image, 0)
    chosen = partitions.root_partition(parts)
    if chosen is None:
        chosen = next((p for p in parts if has_ext_magic(image, p.start)), None)
    if chosen is None:
        raise VerifyError(
            f"{image} has no Linux partition among partitions {numbers}",
            hint="choose the partition that holds the filesystem by its number",
        )
    log.debug("%s: reading partition %d at byte %d", image, chosen.number, chosen.start)
    return ExtFs(image, chosen.start)
