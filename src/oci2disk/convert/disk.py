"""Raw disks and bare filesystem images, written without any privileges.

The partition table is written into the plain file by
:mod:`oci2disk.diskimage.partitions` (sfdisk); the ext2/3/4
filesystem is created by ``mke2fs -d -`` reading the canonical rootfs tar on stdin
and writing at ``-E offset=`` straight into the partition. Ownership, modes, device
nodes and file capabilities come from the tar headers, so nothing is extracted onto the
host and no loop device, mount or namespace is needed. mke2fs keeps only the
``security.capability`` xattr from a tarball; any other xattr is set afterwards with
``debugfs -w`` on the same file.

Host tools: mke2fs and debugfs (e2fsprogs >= 1.47.1), sfdisk (fdisk).
"""

from __future__ import annotations

import logging
import math
import re
import shutil
import uuid as uuidlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO

from oci2disk import bootloader, run
from oci2disk.arch import Arch
from oci2disk.convert import bootable
from oci2disk.convert.options import DiskSpec, FstabMode, FsType, Table
from oci2disk.convert.plugin import OutputFormat, Tool, named
from oci2disk.diskimage import partitions
from oci2disk.errors import CommandError, ConvertError, ToolMissingError
from oci2disk.rootfs import Entry, ExtraFile, Kind, RootfsStats, Tree
from oci2disk.rootfs.flat import FlatRootfs

if TYPE_CHECKING:
    from oci2disk.convert.job import Job

log = logging.getLogger("oci2disk.disk")

MiB = 1 << 20
BLOCK = 4096
SECTOR = 512
PART_START = 1 * MiB  # first partition at 1 MiB, aligned for every disk and bootloader
GPT_TAIL = 1 * MiB  # room for the backup GPT, kept aligned
# Partitions before the root one (when the recipe sets root_partition > 1) are empty
# placeholders of 1 MiB. The first, on GPT, is a BIOS boot partition, as in the
# gem5-resources Ubuntu images (partition 1 for GRUB, root on 2); the others are
# "Linux reserved" (GPT) or "Non-FS data" (MBR), so nothing mounts or formats them.
PLACEHOLDER_BYTES = 1 * MiB
MIN_MKE2FS = (1, 47, 1)
# Features that e2fsprogs 1.47 turns on by default but kernels before 5.15 (and GRUB
# before 2.12) cannot mount; a disk image should boot with the kernels users still run.
COMPAT_FEATURES = "^orphan_file,^metadata_csum_seed"
# Only this xattr survives mke2fs's tarball reader (see module docstring).
MKE2FS_KEPT_XATTRS = frozenset({"security.capability"})
UUID_NAMESPACE = uuidlib.UUID("6f1c1d8e-58a4-4d0e-9a4f-0c12d0a5e7b1")


@dataclass(frozen=True)
class DiskLayout:
    """Where the filesystem sits in the output file."""

    table: Table
    disk_bytes: int
    fs_offset: int
    fs_bytes: int
    partition: int = 1  # the root filesystem's partition number (when there is a table)
    boot: bootloader.BootLayout | None = None  # the partitions of a disk with bootloaders

    @property
    def root_partition(self) -> int | None:
        return None if self.table is Table.NONE else self.partition


@dataclass(frozen=True)
class FsIdentity:
    uuid: str
    label: str
    fs: FsType


@dataclass(frozen=True)
class SizeEstimate:
    minimum: int  # bytes the filesystem cannot be smaller than
    auto: int  # minimum plus headroom: what size "auto" gives


def derive_uuid(*parts: str) -> str:
    """A UUID that depends only on its inputs, so builds are reproducible."""
    return str(uuidlib.uuid5(UUID_NAMESPACE, "\0".join(parts)))


def estimate_fs_bytes(stats: RootfsStats, fs: FsType) -> SizeEstimate:
    """Bytes an ext filesystem needs for this content.

    minimum = data blocks (each file rounded up to a block, estimated as half a block
    of slack per file) + one block per directory + the inode table (256 bytes per inode,
    inodes = entries x 1.25 + 1024) + the journal (ext3/ext4) + 2% for bitmaps, group
    descriptors and extent blocks.
    auto = minimum x 1.2 + 128 MiB, rounded up to a MiB: room to install a few packages
    and for logs without making the image much larger than its content.
    """
    data = stats.data_bytes + stats.files * BLOCK // 2 + stats.dirs * BLOCK
    inodes = inode_count(stats, 0)
    metadata = inodes * 256
    base = (data + metadata) * 102 // 100 + 4 * MiB
    journal = journal_bytes(base) if fs is not FsType.EXT2 else 0
    minimum = round_up(base + journal, MiB)
    auto = round_up(int(minimum * 1.2) + 128 * MiB, MiB)
    auto = round_up(auto + journal_bytes(auto) - journal, MiB) if journal else auto
    return SizeEstimate(minimum, auto)


def journal_bytes(fs_bytes: int) -> int:
    """The journal mke2fs picks for a filesystem of this size (ext2fs_default_journal_size)."""
    blocks = fs_bytes // BLOCK
    for limit, size in (
        (32768, 1024),
        (256 * 1024, 4096),
        (512 * 1024, 8192),
        (4096 * 1024, 16384),
        (8192 * 1024, 32768),
        (16384 * 1024, 65536),
        (32768 * 1024, 131072),
    ):
        if blocks < limit:
            return size * BLOCK
    return 262144 * BLOCK


def inode_count(stats: RootfsStats, fs_bytes: int) -> int:
    """Enough inodes for the content with room to grow, never fewer than mke2fs's default."""
    return max(int(stats.entries * 1.25) + 1024, fs_bytes // 16384)


def round_up(value: int, unit: int) -> int:
    return -(-value // unit) * unit


def plan_layout(
    stats: RootfsStats, spec: DiskSpec, boot: bootable.BootPlan | None = None
) -> DiskLayout:
    """Pick the disk size and where the filesystem goes; refuse a fixed size that is too small.

    With ``boot``, the partitions are those of :func:`bootable.layout` (BIOS boot, ESP,
    root) and the root filesystem is a whole number of MiB.
    """
    estimate = estimate_fs_bytes(stats, spec.fs)
    partition = 1
    if boot is not None and spec.table is not Table.NONE:
        table = bootable.table_for(boot, spec)
        extra = bootable.overhead(boot, table)
        if spec.size is None:
            fs_bytes = estimate.auto
        else:
            fs_bytes = (round_up(spec.size, MiB) - extra) // MiB * MiB
            if fs_bytes < estimate.minimum:
                raise too_small(spec.size, estimate, extra)
        arch = boot.arch
        boot_layout = bootable.layout(boot, fs_bytes, table, arch)
        check_max_size(boot_layout.disk_bytes, spec)
        root = boot_layout.root
        return DiskLayout(table, boot_layout.disk_bytes, root.start, root.size, 1, boot_layout)
    if spec.table is Table.NONE:
        head, tail = 0, 0
    else:
        partition = spec.root_partition
        head = PART_START + (partition - 1) * PLACEHOLDER_BYTES
        tail = GPT_TAIL if spec.table is Table.GPT else 0
    if spec.size is None:
        fs_bytes = estimate.auto
        disk_bytes = head + fs_bytes + tail
    else:
        disk_bytes = round_up(spec.size, MiB) if spec.table is not Table.NONE else spec.size
        fs_bytes = (disk_bytes - head - tail) // BLOCK * BLOCK
        if fs_bytes < estimate.minimum:
            raise too_small(spec.size, estimate, head + tail)
    check_max_size(disk_bytes, spec)
    return DiskLayout(spec.table, disk_bytes, head, fs_bytes, partition)


def check_max_size(disk_bytes: int, spec: DiskSpec) -> None:
    if spec.max_size is not None and disk_bytes > spec.max_size:
        raise ConvertError(
            f"the disk would be {human(disk_bytes)}, more than the recipe's disk.max_size "
            f"{human(spec.max_size)} (the largest disk its target machine can address)",
            hint="make the image smaller or set a smaller disk.size",
        )


def too_small(size: int, estimate: SizeEstimate, overhead: int) -> ConvertError:
    need = estimate.minimum + overhead
    return ConvertError(
        f"the requested size {human(size)} is too small for this image: its content needs "
        f"at least {human(need)} ({need} bytes)",
        hint=f"use --size auto (gives {human(estimate.auto + overhead)}) or a size of at "
        f"least {math.ceil(need / MiB)}M",
    )


def human(n: int) -> str:
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} B"


def fstab_text(identity: FsIdentity, mode: FstabMode, more: str = "") -> str:
    source = f"UUID={identity.uuid}" if mode is FstabMode.UUID else f"LABEL={identity.label}"
    options = "errors=remount-ro" if identity.fs is not FsType.EXT2 else "defaults"
    passno = 1
    return (
        "# /etc/fstab: written by oci2disk for the root filesystem it created\n"
        f"{source}\t/\t{identity.fs.value}\t{options}\t0\t{passno}\n"
    ) + more


def generated_files(
    root: Tree, identity: FsIdentity, mode: FstabMode, more_fstab: str = ""
) -> list[ExtraFile]:
    """Files oci2disk writes into the image (they are listed in the build manifest).

    ``more_fstab``: lines after the root's (the ESP's, on a disk with UEFI boot)."""
    if mode is FstabMode.NONE:
        return []
    etc = root.lookup("etc")
    if etc is None or etc.kind is not Kind.DIR:
        log.warning("the image has no /etc directory; not writing /etc/fstab")
        return []
    return [ExtraFile("etc/fstab", fstab_text(identity, mode, more_fstab).encode())]


@cache
def mke2fs_version() -> tuple[int, int, int]:
    proc = run.run(["mke2fs", "-V"], check=False, parsed=True)
    text = (proc.stderr + proc.stdout).decode(errors="replace")
    match = re.search(r"mke2fs (\d+)\.(\d+)(?:\.(\d+))?", text)
    if not match:
        raise ToolMissingError(f"cannot tell the version of mke2fs from {text.strip()!r}")
    major, minor, patch = match.groups()
    return int(major), int(minor), int(patch or 0)


def require_mke2fs() -> None:
    version = mke2fs_version()
    if version < MIN_MKE2FS:
        have = ".".join(map(str, version))
        raise ToolMissingError(
            f"mke2fs {have} cannot read a tarball; oci2disk needs e2fsprogs >= 1.47.1 "
            "(mke2fs -d TARBALL keeps ownership without root)",
            hint="on Debian bookworm: add bookworm-backports to the apt sources and run "
            "`apt-get install -t bookworm-backports e2fsprogs libarchive13` (./setup.sh does it)",
        )


def partition_table(
    layout: DiskLayout, identity: FsIdentity, arch: Arch | None
) -> partitions.Table:
    """The table of a disk oci2disk writes: empty placeholders before the root partition
    (none when it is 1), then the root partition, with ids derived from the fs UUID."""
    label = partitions.GPT if layout.table is Table.GPT else partitions.MBR
    disk_id = uuidlib.UUID(derive_uuid("disk", identity.uuid))
    if layout.boot is not None:
        return boot_partition_table(layout.boot, identity, label, disk_id)
    parts: list[partitions.Partition] = []
    for number in range(1, layout.partition):
        start = PART_START + (number - 1) * PLACEHOLDER_BYTES
        if label == partitions.MBR:
            placeholder = partitions.Partition(
                number, start, PLACEHOLDER_BYTES, partitions.MBR_NON_FS, label
            )
        else:
            bios = number == 1
            placeholder = partitions.Partition(
                number,
                start,
                PLACEHOLDER_BYTES,
                partitions.GPT_BIOS_BOOT if bios else partitions.GPT_RESERVED,
                label,
                name="bios" if bios else "reserved",
                uuid=derive_uuid("partition", identity.uuid, str(number)),
            )
        parts.append(placeholder)
    root = partitions.Partition(
        layout.partition,
        layout.fs_offset,
        layout.fs_bytes,
        partitions.root_type(label, arch),
        label,
        name="" if label == partitions.MBR else identity.label or "root",
        uuid="" if label == partitions.MBR else derive_uuid("partition", identity.uuid),
        bootable=label == partitions.MBR,
    )
    if label == partitions.MBR:
        return partitions.Table(label, f"{disk_id.int & 0xFFFFFFFF:08x}", (*parts, root))
    return partitions.Table(label, str(disk_id), (*parts, root))


def boot_partition_table(
    boot: bootloader.BootLayout, identity: FsIdentity, label: str, disk_id: uuidlib.UUID
) -> partitions.Table:
    """The table of a disk with bootloaders: its partitions as :mod:`bootloader` laid them
    out, with ids derived from the fs UUID (the root's as on any other disk)."""
    parts = []
    for part in boot.partitions:
        is_root = part.role is bootloader.Role.ROOT
        parts.append(
            partitions.Partition(
                part.number,
                part.start,
                part.size,
                f"0x{part.type}" if label == partitions.MBR else part.type.lower(),
                label,
                name=""
                if label == partitions.MBR
                else (identity.label or "root")
                if is_root
                else part.name,
                uuid=""
                if label == partitions.MBR
                else derive_uuid("partition", identity.uuid)
                if is_root
                else derive_uuid("partition", identity.uuid, part.role.value),
                bootable=part.bootable,
            )
        )
    if label == partitions.MBR:
        return partitions.Table(label, f"{disk_id.int & 0xFFFFFFFF:08x}", tuple(parts))
    return partitions.Table(label, str(disk_id), tuple(parts))


def write_partition_table(
    path: Path, layout: DiskLayout, identity: FsIdentity, arch: Arch | None
) -> None:
    """Write the MBR or GPT of :func:`partition_table` into the file (no device involved).

    ``arch`` (the image's) gives a GPT root partition its Discoverable Partitions type.
    """
    partitions.write_table(path, partition_table(layout, identity, arch))


def root_partuuid(layout: DiskLayout, identity: FsIdentity) -> str | None:
    """The root partition's PARTUUID, which a kernel takes as ``root=PARTUUID=...``
    without an initramfs (GPT: the partition's UUID; MBR: DISKID-NN)."""
    if layout.table is Table.NONE:
        return None
    return partition_table(layout, identity, None).partuuid(layout.partition)


def install_bootloaders(
    boot: bootable.BootPlan,
    root: Tree,
    path: Path,
    layout: DiskLayout,
    identity: FsIdentity,
    *,
    seed: str,
    epoch: int,
    workdir: Path,
) -> bootable.Installed:
    """GRUB into the disk file whose table and root filesystem are written."""
    assert layout.boot is not None
    return bootable.install(
        boot,
        root,
        path,
        layout.boot,
        root_uuid=identity.uuid,
        seed=seed,
        epoch=epoch,
        workdir=workdir,
    )


def write_filesystem(
    root: FlatRootfs,
    path: Path,
    layout: DiskLayout,
    identity: FsIdentity,
    *,
    extra: Sequence[ExtraFile],
    timestamp: int,
    wrap: Callable[[BinaryIO], BinaryIO] | None = None,
) -> None:
    """Create the filesystem in ``path`` at ``layout.fs_offset`` from the rootfs stream."""
    require_mke2fs()
    blocks = layout.fs_bytes // BLOCK
    # Lazy: the inode tables and the journal of a new, zero-filled file are zeros
    # already; writing them took minutes and gigabytes for --size 1T.
    options = [
        "root_owner=0:0",
        f"hash_seed={derive_uuid('hash', identity.uuid)}",
        "lazy_itable_init=1",
        "lazy_journal_init=1",
    ]
    if layout.fs_offset:
        options.insert(0, f"offset={layout.fs_offset}")
    argv = [
        "mke2fs",
        "-q",
        "-F",
        "-t",
        identity.fs.value,
        "-b",
        str(BLOCK),
        "-N",
        str(inode_count(root.stats, layout.fs_bytes)),
        "-L",
        identity.label,
        "-U",
        identity.uuid,
        "-E",
        ",".join(options),
        "-d",
        "-",
    ]
    if identity.fs is FsType.EXT4:
        argv += ["-O", COMPAT_FEATURES]
    argv += [str(path), str(blocks)]
    env = {"E2FSPROGS_FAKE_TIME": str(timestamp), "MKE2FS_DEVICE_SECTSIZE": "512"}
    try:
        with run.feeding(argv, env=env, parsed=True, what="mke2fs failed") as stdin:
            root.write_tar(wrap(stdin) if wrap else stdin, extra=extra)
    except CommandError as exc:
        need = estimate_fs_bytes(root.stats, identity.fs).minimum
        if "No space left on device" in exc.stderr_tail and _host_full(path, need):
            free = shutil.disk_usage(path.parent).free
            raise ConvertError(
                f"the filesystem that holds {path.parent} is full ({human(free)} free): the "
                f"disk image needs about {human(need)} there (not a --size problem)",
                hint="free space there, or write the output (-o) to a filesystem with room",
            ) from None
        if out_of_space(exc):
            raise too_small(
                layout.fs_bytes + layout.fs_offset,
                estimate_fs_bytes(root.stats, identity.fs),
                layout.fs_offset,
            ) from None
        if "libarchive" in exc.stderr_tail:
            exc.hint = "install libarchive13 (mke2fs loads it to read tarballs)"
        raise


# libext2fs's own error codes for a full filesystem (lib/ext2fs/ext2_err.et): mke2fs
# reports them by name, and its final errno ("Operation not permitted" here) says nothing.
# run.feeding(parsed=True) runs mke2fs in the C locale, so they are never translated.
OUT_OF_SPACE = (
    "Could not allocate block in ext2 filesystem",  # EXT2_ET_BLOCK_ALLOC_FAIL
    "Could not allocate inode in ext2 filesystem",  # EXT2_ET_INODE_ALLOC_FAIL
    "No free space in the directory",  # EXT2_ET_DIR_NO_SPACE
)


def _host_full(path: Path, need: int) -> bool:
    """Whether the filesystem holding ``path`` (not the image's) ran out of room."""
    try:
        free = shutil.disk_usage(path.parent).free
    except OSError:
        return False
    return free < min(need, HOST_SLACK)


HOST_SLACK = 16 << 20  # less free than this, or than the image needs: the host is full


def out_of_space(error: CommandError) -> bool:
    """Whether mke2fs failed because the filesystem could not hold the content."""
    return error.returncode != 0 and any(code in error.stderr_tail for code in OUT_OF_SPACE)


def apply_extra_xattrs(root: Tree, path: Path, layout: DiskLayout, workdir: Path) -> int:
    """Set the xattrs that mke2fs's tarball reader dropped; return how many were set."""
    commands: list[str] = []
    count = 0
    values = workdir / "xattr-values"
    for entry in root.entries():
        if entry.hardlink_to:
            continue  # xattrs live on the inode, set once through its first name
        for name, value in entry.xattrs:
            if name in MKE2FS_KEPT_XATTRS:
                continue
            values.mkdir(exist_ok=True)
            value_file = values / str(count)
            value_file.write_bytes(value)
            commands.append(
                f"ea_set -f {quote(str(value_file))} {quote('/' + _fs_path(entry))} {quote(name)}"
            )
            count += 1
    if not commands:
        return 0
    script = workdir / "xattrs.debugfs"
    script.write_text("\n".join(commands) + "\n", errors="surrogateescape")
    device = f"{path}?offset={layout.fs_offset}" if layout.fs_offset else str(path)
    proc = run.run(
        ["debugfs", "-w", "-f", str(script), device],
        parsed=True,
        what="setting xattrs with debugfs failed",
    )
    # debugfs reports command errors on stderr but still exits 0.
    errors = [
        line
        for line in proc.stderr.decode(errors="replace").splitlines()
        if line.strip() and not line.startswith("debugfs ")
    ]
    if errors:
        raise ConvertError("debugfs could not set every xattr:\n" + "\n".join(errors[-10:]))
    return count


def _fs_path(entry: Entry) -> str:
    return "" if entry.path == "." else entry.path


def quote(text: str) -> str:
    """Quote one argument for debugfs's command parser (libss)."""
    if any(c in text for c in '"\n\r\0'):
        raise ConvertError(
            f"cannot set an xattr on {text!r}: the name holds a quote or newline, "
            "which debugfs cannot take"
        )
    return f'"{text}"'


# ------------------------------------------------------------------ the raw and fs formats

MKE2FS = Tool("mke2fs", "e2fsprogs (>= 1.47.1, from bookworm-backports)")
DEBUGFS = Tool("debugfs", "e2fsprogs")
SFDISK = Tool("sfdisk", "fdisk")
DISK_TOOLS = (MKE2FS, DEBUGFS, SFDISK)


def write_raw(job: Job, out: Path) -> None:
    built = job.raw_disk()
    if built != out:  # the run gives the raw output's temp path to the job first
        raise ConvertError(f"the raw disk was built at {built}, not at its output {out}")


def write_fs(job: Job, out: Path) -> None:
    layout = job.build_fs(out, replace(job.options.disk, table=Table.NONE))
    if job.layout is None:
        job.layout = layout


RAW = OutputFormat(
    name="raw",
    summary="a raw disk: partition table (mbr or gpt) and an ext filesystem",
    write=write_raw,
    output_name=named("raw"),
    tools=DISK_TOOLS,
    disk=True,
    raw=True,
    preflight=require_mke2fs,
)
FS = OutputFormat(
    name="fs",
    summary="a bare ext filesystem image, no partition table",
    write=write_fs,
    output_name=named("ext4"),
    tools=(MKE2FS, DEBUGFS),
    disk=True,
    preflight=require_mke2fs,
)
