"""MBR and GPT partition tables in a disk file: read them, and write them.

Reading is pure Python: MBR primary and logical partitions (numbered from 5, as Linux
does), and GPT from its primary header (its backup when the primary is damaged), with
both CRCs checked. Writing hands a :class:`Table` to ``sfdisk`` on the plain file: no
device, no privileges. On GPT the root partition carries the Discoverable Partitions
root type of its architecture, so systemd and other tools find it without ``root=``.

Host tools: sfdisk (fdisk), for :func:`write_table` only.
"""

from __future__ import annotations

import logging
import os
import struct
import uuid
import zlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

from oci2disk import run
from oci2disk.arch import Arch
from oci2disk.errors import Oci2DiskError

log = logging.getLogger("oci2disk.partitions")

SECTOR = 512
MBR = "mbr"
GPT = "gpt"
MBR_SIGNATURE = b"\x55\xaa"
MBR_ENTRIES = 446
MBR_DISK_ID = 440
MBR_EXTENDED_TYPES = frozenset({0x05, 0x0F, 0x85})
MBR_LINUX = "0x83"
MBR_NON_FS = "0xda"
MBR_GPT_PROTECTIVE = 0xEE
GPT_SIGNATURE = b"EFI PART"
GPT_LINUX_DATA = "0fc63daf-8483-4772-8e79-3d69d8477de4"
GPT_BIOS_BOOT = "21686148-6449-6e6f-744e-656564454649"
GPT_RESERVED = "8da63339-0007-60c0-c436-083ac8230908"
# Discoverable Partitions Specification root types, the ones of Arch and a few more
# a disk made elsewhere may carry: preferred over generic Linux data.
GPT_ROOT_TYPES = frozenset(
    {a.gpt_root for a in Arch}
    | {
        "60d5a7fe-8e7d-435c-b714-3dd8162144e1",  # riscv32
        "77055800-792c-4f94-b39a-98c91b762bb6",  # loongarch64
        "1de3f1ef-fa98-47b5-8dcd-4a860a654d78",  # ppc64le, as older tools wrote it
        "d13c5d3b-b5d1-422a-b29f-9454fdc89d76",  # s390x, as older tools wrote it
    }
)
GPT_LINUX_TYPES = GPT_ROOT_TYPES | {
    GPT_LINUX_DATA,
    "8484680c-9521-48c6-9c11-b0720656f69e",  # /usr x86-64
    "b0e01050-ee5f-4390-949a-9101b17104e9",  # /usr arm64
    "933ac7e1-2eb4-4f13-b844-0e14e2aef915",  # /home
    "3b8f8425-20e0-4f3b-907f-1a25a76f98e8",  # /srv
    "4d21b016-b534-45c2-a9fb-5c16e091fd2d",  # /var
}
MAX_LOGICAL = 256
MAX_GPT_ENTRIES = 4096


class PartitionTableError(Oci2DiskError):
    """A partition table that cannot be read or written."""


@dataclass(frozen=True)
class Partition:
    """One partition, in bytes from the start of the disk file.

    ``type`` is "0x83" on MBR and the type GUID (lower case) on GPT. ``uuid`` is the
    GPT partition GUID ("" on MBR); ``bootable`` the MBR active flag.
    """

    number: int
    start: int
    size: int
    type: str
    table: str  # MBR or GPT
    name: str = ""
    uuid: str = ""
    bootable: bool = False

    @property
    def is_linux(self) -> bool:
        if self.table == MBR:
            return self.type == MBR_LINUX
        return self.type in GPT_LINUX_TYPES

    @property
    def is_root(self) -> bool:
        return self.table == GPT and self.type in GPT_ROOT_TYPES

    @property
    def end(self) -> int:
        return self.start + self.size


@dataclass(frozen=True)
class Table:
    """A whole partition table: its kind (MBR or GPT), its disk id and its partitions.

    ``disk_id`` is 8 hex digits on MBR ("1a2b3c4d") and a GUID on GPT.
    """

    label: str
    disk_id: str
    partitions: tuple[Partition, ...] = field(default_factory=tuple)

    def partuuid(self, number: int) -> str:
        """What a kernel takes as ``root=PARTUUID=``: GPT: the partition's GUID;
        MBR: the disk id and the partition number (``1a2b3c4d-02``)."""
        if self.label == MBR:
            return f"{self.disk_id}-{number:02x}"
        for part in self.partitions:
            if part.number == number:
                return part.uuid
        raise PartitionTableError(f"the table has no partition {number}")


def root_type(label: str, arch: Arch | None) -> str:
    """The partition type of a root filesystem: Linux (0x83) on MBR; on GPT the root
    type of ``arch``, or generic Linux data when the architecture is unknown."""
    if label == MBR:
        return MBR_LINUX
    return arch.gpt_root if arch is not None else GPT_LINUX_DATA


# ---------------------------------------------------------------- reading


def read_table(disk: Path) -> Table | None:
    """The MBR or GPT table of ``disk``; None when it has none (a bare filesystem)."""
    try:
        with Path(disk).open("rb") as handle:
            mbr = _read_at(handle, 0, SECTOR)
            if len(mbr) < SECTOR or mbr[510:512] != MBR_SIGNATURE:
                return None
            entries = [struct.unpack_from("<B3xB3xII", mbr, MBR_ENTRIES + 16 * i) for i in range(4)]
            if any(status not in (0, 0x80) for status, *_ in entries):
                return None  # a boot sector of some other kind (a FAT filesystem, say)
            if any(kind == MBR_GPT_PROTECTIVE for _status, kind, _s, _n in entries):
                return _gpt_table(Path(disk), handle)
            (disk_id,) = struct.unpack_from("<I", mbr, MBR_DISK_ID)
            return Table(MBR, f"{disk_id:08x}", _mbr_partitions(Path(disk), handle, entries))
    except OSError as exc:
        raise PartitionTableError(f"cannot read {disk}: {exc.strerror}") from exc


def read_partitions(disk: Path) -> list[Partition]:
    """The partitions of ``disk`` by number; [] without a partition table."""
    table = read_table(disk)
    return [] if table is None else list(table.partitions)


def root_partition(partitions: Sequence[Partition]) -> Partition | None:
    """The partition that most likely holds the root filesystem: the only one, else the
    first with a GPT root type, else the first Linux one; None when no rule decides."""
    if len(partitions) == 1:
        return partitions[0]
    roots = [p for p in partitions if p.is_root]
    linux = [p for p in partitions if p.is_linux]
    candidates = roots or linux
    return candidates[0] if candidates else None


def _read_at(handle: BinaryIO, position: int, length: int) -> bytes:
    handle.seek(position)
    return handle.read(length)


def _mbr_partitions(
    disk: Path, handle: BinaryIO, entries: list[tuple[int, ...]]
) -> tuple[Partition, ...]:
    partitions: list[Partition] = []
    extended: int | None = None
    for number, (status, kind, start, count) in enumerate(entries, start=1):
        if kind == 0 or count == 0:
            continue
        partitions.append(
            Partition(
                number,
                start * SECTOR,
                count * SECTOR,
                f"0x{kind:02x}",
                MBR,
                bootable=status == 0x80,
            )
        )
        if kind in MBR_EXTENDED_TYPES and extended is None:
            extended = start
    if extended is not None:
        partitions += _logical_partitions(disk, handle, extended)
    return tuple(partitions)


def _logical_partitions(disk: Path, handle: BinaryIO, extended_start: int) -> list[Partition]:
    # Each EBR holds one logical partition (relative to itself) and a link to the next
    # EBR (relative to the extended partition).
    found: list[Partition] = []
    ebr_lba = extended_start
    seen: set[int] = set()
    while ebr_lba not in seen and len(found) < MAX_LOGICAL:
        seen.add(ebr_lba)
        ebr = _read_at(handle, ebr_lba * SECTOR, SECTOR)
        if len(ebr) < SECTOR or ebr[510:512] != MBR_SIGNATURE:
            raise PartitionTableError(
                f"{disk}: the extended partition table at sector {ebr_lba} is bad",
                hint="the partition table is damaged; recreate it (sfdisk) and rebuild the disk",
            )
        status, kind, start, count = struct.unpack_from("<B3xB3xII", ebr, MBR_ENTRIES)
        _s2, next_kind, next_start, _n = struct.unpack_from("<B3xB3xII", ebr, MBR_ENTRIES + 16)
        if kind and count:
            found.append(
                Partition(
                    5 + len(found),
                    (ebr_lba + start) * SECTOR,
                    count * SECTOR,
                    f"0x{kind:02x}",
                    MBR,
                    bootable=status == 0x80,
                )
            )
        if next_kind == 0 or next_start == 0:
            break
        ebr_lba = extended_start + next_start
    return found


def _gpt_table(disk: Path, handle: BinaryIO) -> Table:
    size = os.fstat(handle.fileno()).st_size
    problems: list[str] = []
    for sector in (512, 4096):
        header = _read_at(handle, sector, sector)
        if header[:8] != GPT_SIGNATURE:
            continue
        try:
            return _gpt_from_header(disk, handle, header, sector)
        except PartitionTableError as exc:
            problems.append(str(exc))
        # The primary is damaged: the backup header sits in the disk's last sector.
        backup = _read_at(handle, size - sector, sector) if size >= 2 * sector else b""
        if backup[:8] == GPT_SIGNATURE:
            try:
                table = _gpt_from_header(disk, handle, backup, sector)
            except PartitionTableError as exc:
                problems.append(str(exc))
            else:
                log.warning(
                    "%s: the primary GPT is damaged (%s); read the backup", disk, problems[0]
                )
                return table
        break
    if problems:
        raise PartitionTableError(
            problems[0], hint="the partition table is damaged; recreate it and rebuild the disk"
        )
    raise PartitionTableError(
        f"{disk}: the MBR announces a GPT (type 0xee) but there is no GPT header",
        hint="the partition table is damaged; recreate it (sfdisk) and rebuild the disk",
    )


def _gpt_from_header(disk: Path, handle: BinaryIO, header: bytes, sector: int) -> Table:
    (header_size, header_crc) = struct.unpack_from("<II", header, 12)
    if not 92 <= header_size <= sector:
        raise PartitionTableError(f"{disk}: the GPT header size {header_size} is not possible")
    check = bytearray(header[:header_size])
    check[16:20] = bytes(4)
    if zlib.crc32(check) != header_crc:
        raise PartitionTableError(
            f"{disk}: the GPT header checksum is wrong (firmware would reject it)"
        )
    disk_guid = str(uuid.UUID(bytes_le=header[56:72]))
    entries_lba, entry_count, entry_size, entries_crc = struct.unpack_from("<QIII", header, 0x48)
    if entry_size < 128 or entry_size % 8 or entry_count > MAX_GPT_ENTRIES:
        raise PartitionTableError(
            f"{disk}: the GPT header describes {entry_count} entries of {entry_size} bytes"
        )
    raw = _read_at(handle, entries_lba * sector, entry_count * entry_size)
    if len(raw) != entry_count * entry_size or zlib.crc32(raw) != entries_crc:
        raise PartitionTableError(
            f"{disk}: the GPT partition entries are truncated or fail their CRC"
        )
    partitions: list[Partition] = []
    for index in range(entry_count):
        entry = raw[index * entry_size : (index + 1) * entry_size]
        if entry[:16] == bytes(16):
            continue
        first, last = struct.unpack_from("<QQ", entry, 32)
        if last < first:
            raise PartitionTableError(
                f"{disk}: GPT partition {index + 1} ends (LBA {last}) before it starts ({first})"
            )
        partitions.append(
            Partition(
                number=index + 1,
                start=first * sector,
                size=(last - first + 1) * sector,
                type=str(uuid.UUID(bytes_le=entry[:16])),
                table=GPT,
                name=entry[56:128].decode("utf-16-le", "replace").split("\0", 1)[0],
                uuid=str(uuid.UUID(bytes_le=entry[16:32])),
            )
        )
    return Table(GPT, disk_guid, tuple(partitions))


# ---------------------------------------------------------------- writing


def write_table(disk: Path, table: Table) -> None:
    """Write ``table`` into the file ``disk`` (which already has its final size).

    Partitions start and end on 512-byte sectors; GPT names are written as given (a
    double quote is not allowed in one). Everything else on the disk is left alone
    except the sectors the table itself takes.
    """
    if table.label not in (MBR, GPT):
        raise PartitionTableError(f"unknown partition table kind {table.label!r}")
    lines = [f"label: {'dos' if table.label == MBR else 'gpt'}"]
    lines.append(f"label-id: {'0x' if table.label == MBR else ''}{table.disk_id}")
    for part in sorted(table.partitions, key=lambda p: p.number):
        lines.append(_sfdisk_line(table.label, part))
    argv = ["sfdisk", "--quiet", "--no-reread", "--no-tell-kernel", "--wipe=always"]
    run.run(
        [*argv, os.fspath(disk)],
        input=("\n".join(lines) + "\n").encode(),
        what="writing the partition table failed",
    )


def _sfdisk_line(label: str, part: Partition) -> str:
    if part.start % SECTOR or part.size % SECTOR:
        raise PartitionTableError(
            f"partition {part.number} is not a whole number of {SECTOR}-byte sectors"
        )
    fields = [f"start={part.start // SECTOR}", f"size={part.size // SECTOR}"]
    # sfdisk numbers partitions by the digits that end this name, so that a disk with
    # bootloaders can keep its root as 1 and put the BIOS boot and ESP at 14 and 15.
    named = f"/dev/p{part.number} : "
    if label == MBR:
        fields.append(f"type={part.type.removeprefix('0x')}")
        if part.bootable:
            fields.append("bootable")
        return named + ", ".join(fields)
    if '"' in part.name:
        raise PartitionTableError(f"GPT partition name {part.name!r} holds a double quote")
    fields.append(f"type={part.type}")
    if part.uuid:
        fields.append(f"uuid={part.uuid}")
    if part.name:
        fields.append(f'name="{part.name}"')
    return named + ", ".join(fields)
