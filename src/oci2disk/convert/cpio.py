"""Initramfs archives: the rootfs as a newc cpio, compressed (``.cgz`` when gzip).

The archive is written straight from the flattened rootfs (metadata from its entries,
file data read from the layers), so owners, modes, device nodes, symlinks and hard
links are exact without extracting anything. A hard-link set shares one inode number
and stores its data once, on its last name; the earlier names have size 0. This is
the newc rule that both the kernel (init/initramfs.c) and GNU cpio follow.

The kernel runs ``/init`` from an initramfs. An image without one gets a symlink to
the init the recipe names (``[initramfs] init = "/sbin/init"``), else the conversion
stops and says so. ``/dev/console`` is added (char 5:1) when the image lacks it:
without it the kernel cannot give /init a console, so the boot is silent.

newc has no room for xattrs; any the image has are dropped, and the log counts them.

Host tools: igzip (isal), pigz, xz (xz-utils), all optional (see compress.py).
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO

from oci2disk.bytestreams import CHUNK, BatchingWriter
from oci2disk.convert import compress
from oci2disk.convert.options import ConvertOptions, InitramfsSpec
from oci2disk.convert.plugin import OutputFormat
from oci2disk.errors import ConvertError
from oci2disk.rootfs import Entry, Kind, Tree, follow
from oci2disk.rootfs.model import NS

if TYPE_CHECKING:
    from oci2disk.convert.job import Job

log = logging.getLogger("oci2disk.cpio")

NEWC = b"070701"
NEWC_CRC = b"070702"
HEADER = 110
TRAILER = "TRAILER!!!"
FIELD_MAX = 0xFFFFFFFF
CONSOLE = (5, 1)
# Where an image's init usually is; offered in the error when /init is missing.
INIT_CANDIDATES = ("/sbin/init", "/lib/systemd/systemd", "/usr/lib/systemd/systemd", "/bin/sh")


@dataclass(frozen=True)
class CpioStats:
    entries: int
    data_bytes: int  # file data stored (each hard-link set once)
    dropped_xattrs: int  # entries whose xattrs newc could not hold
    added: tuple[str, ...]  # paths oci2disk added (init, dev/console)


def initramfs_additions(rootfs: Tree, spec: InitramfsSpec, mtime: int) -> list[Entry]:
    """The entries to add so that the kernel can run /init with a console."""
    added: list[Entry] = []
    existing = rootfs.lookup("init")
    if spec.init is not None:
        if existing is not None:
            raise ConvertError(
                f"the image has its own /init ({existing.kind.value}), and the recipe asks "
                f"for /init to point to {spec.init}",
                hint="remove init from [initramfs] in recipe.toml (the image's /init is used), "
                "or remove /init from the image",
            )
        target = follow(rootfs, spec.init)
        if target is None or target.kind is not Kind.FILE:
            raise ConvertError(
                f"[initramfs] init is {spec.init}, which is not a file in the image",
                hint=_init_hint(rootfs),
            )
        if not target.mode & 0o111:
            raise ConvertError(f"[initramfs] init {spec.init} ({target.path}) is not executable")
        added.append(_symlink("init", spec.init, mtime))
    elif existing is None:
        raise ConvertError(
            "the image has no /init, which the kernel runs from an initramfs",
            hint=_init_hint(rootfs),
        )
    console = rootfs.lookup("dev/console")
    if console is not None and (console.kind, console.devmajor, console.devminor) == (
        Kind.CHAR,
        *CONSOLE,
    ):
        return added
    if console is None:
        dev = rootfs.lookup("dev")
        if dev is None:
            added.append(Entry("dev", Kind.DIR, 0o755, mtime_ns=mtime * NS))
        elif dev.kind is not Kind.DIR:
            raise ConvertError("the image's /dev is not a directory, so it has no /dev/console")
        log.warning("the image has no /dev/console; added it to the cpio (char 5:1)")
    elif console.kind is Kind.DIR:
        raise ConvertError("the image's /dev/console is a directory, not the console device")
    else:
        # e.g. the empty placeholder file `docker export` leaves there
        log.warning(
            "the image's /dev/console is a %s, not the console device; replaced it in the "
            "cpio with char 5:1",
            console.kind.value,
        )
    major, minor = CONSOLE
    added.append(
        Entry("dev/console", Kind.CHAR, 0o600, mtime_ns=mtime * NS, devmajor=major, devminor=minor)
    )
    return added


def _init_hint(rootfs: Tree) -> str:
    found = [path for path in INIT_CANDIDATES if _is_program(rootfs, path)]
    example = found[0] if found else "/sbin/init"
    where = f" (the image has {', '.join(found)})" if found else ""
    return (
        f'set init = "{example}" in the [initramfs] table of recipe.toml (or --init {example}) '
        f"to make /init a symlink to the image's init{where}"
    )


def _is_program(rootfs: Tree, path: str) -> bool:
    entry = follow(rootfs, path)
    return entry is not None and entry.kind is Kind.FILE and bool(entry.mode & 1)


def _symlink(path: str, target: str, mtime: int) -> Entry:
    size = len(target.encode())
    return Entry(path, Kind.SYMLINK, 0o777, size=size, mtime_ns=mtime * NS, linkname=target)


def write_cgz(
    rootfs: Tree,
    path: Path,
    spec: InitramfsSpec,
    *,
    mtime: int,
    wrap: Callable[[BinaryIO], BinaryIO] | None = None,
) -> CpioStats:
    """Write the compressed initramfs archive of ``rootfs`` to ``path``."""
    extra = initramfs_additions(rootfs, spec, mtime)
    with compress.compressed(path, spec.compression, spec.level) as sink:
        stats = write_cpio(rootfs, wrap(sink) if wrap else sink, extra=extra)
    if stats.dropped_xattrs:
        log.warning(
            "newc cpio cannot hold xattrs: dropped those of %d path(s)", stats.dropped_xattrs
        )
    return stats


def write_cpio(rootfs: Tree, out: BinaryIO, *, extra: Sequence[Entry] = ()) -> CpioStats:
    """Write the uncompressed newc archive: every entry in canonical order, then ``extra``.

    An entry of ``extra`` replaces the image's entry of the same path.
    """
    replaced = {e.path for e in extra}
    links: dict[str, list[str]] = defaultdict(list)  # leader -> its other names, in order
    for entry in rootfs.entries():
        if entry.hardlink_to:
            if entry.path in replaced or entry.hardlink_to in replaced:
                raise ConvertError(f"cannot replace /{entry.path}: it is a hard link")
            links[entry.hardlink_to].append(entry.path)
    carrier = {names[-1]: leader for leader, names in links.items()}  # the name holding data
    writer = BatchingWriter(out, 4)
    inodes: dict[str, int] = {}
    count = data_bytes = dropped = 0
    for entry in [*(e for e in rootfs.entries() if e.path not in replaced), *extra]:
        count += 1
        dropped += bool(entry.xattrs)
        leader = entry.hardlink_to or entry.path
        ino = inodes.setdefault(leader, len(inodes) + 1)
        nlink, size, data, source = 1, 0, b"", ""
        if entry.kind is Kind.FILE:
            names = links.get(leader)
            if names is None:
                size, source = entry.size, entry.path
            else:
                nlink = len(names) + 1
                if carrier.get(entry.path) == leader:
                    size, source = entry.size, entry.path
        elif entry.kind is Kind.SYMLINK:
            data = entry.linkname.encode("utf-8", "surrogateescape")
            size = len(data)
        elif entry.kind is Kind.DIR:
            nlink = 2
        if size > FIELD_MAX:
            raise ConvertError(
                f"/{entry.path} is {size} bytes; a newc cpio cannot hold files of 4 GiB or more",
                hint="remove the file from the image or choose another output format",
            )
        mode = entry.st_mode
        mtime = min(max(entry.mtime_ns // NS, 0), FIELD_MAX)
        fields = (
            ino,
            mode,
            entry.uid,
            entry.gid,
            nlink,
            mtime,
            size,
            entry.devmajor,
            entry.devminor,
        )
        _header(writer, entry.path, *fields)
        if data:
            writer.write(data)
        elif source and size:
            _copy(rootfs, source, size, writer)
        data_bytes += size
        writer.pad(size)
    _header(writer, TRAILER, 0, 0, 0, 0, 1, 0, 0, 0, 0)
    writer.flush()
    out.flush()
    return CpioStats(count, data_bytes, dropped, tuple(e.path for e in extra))


def _header(
    writer: BatchingWriter,
    path: str,
    ino: int,
    mode: int,
    uid: int,
    gid: int,
    nlink: int,
    mtime: int,
    size: int,
    rdevmajor: int,
    rdevminor: int,
) -> None:
    name = path.encode("utf-8", "surrogateescape")
    # dev (the fields after size) is 0:0 for every entry; check is 0 in newc.
    fields = (ino, mode, uid, gid, nlink, mtime, size, 0, 0, rdevmajor, rdevminor, len(name) + 1, 0)
    writer.write(NEWC + "".join(f"{value:08X}" for value in fields).encode("ascii") + name + b"\0")
    writer.pad(HEADER + len(name) + 1)


def _copy(rootfs: Tree, path: str, size: int, writer: BatchingWriter) -> None:
    copied = 0
    with rootfs.open(path) as f:
        while chunk := f.read(min(CHUNK, size - copied)):
            writer.write(chunk)
            copied += len(chunk)
            if copied == size:
                break
    if copied != size:
        raise ConvertError(f"/{path}: read {copied} of its {size} bytes from the image layers")


# ------------------------------------------------------------------ the cgz format


def write(job: Job, out: Path) -> None:
    spec = job.options.initramfs
    how = compress.describe(spec.compression, spec.level)
    with job.progress.step(f"writing the initramfs cpio (compression: {how})"):
        stats = write_cgz(
            job.rootfs,
            out,
            spec,
            mtime=job.timestamp,
            wrap=lambda s: job.stream(s, "initramfs cpio"),
        )
    job.note_added(stats.added)


def cgz_name(base: str, options: ConvertOptions) -> str:
    compression = options.initramfs.compression
    if compression.label == "gzip":
        return f"{base}.cgz"
    return f"{base}.cpio{compression.suffix}"


CGZ = OutputFormat(
    name="cgz",
    summary="an initramfs: newc cpio, gzip by default (--init, --cpio-compression)",
    write=write,
    output_name=cgz_name,
)
