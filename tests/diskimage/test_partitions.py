"""partitions: what write_table writes, sfdisk and read_table read back the same way."""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import pytest

from layerkit import file, make_image
from oci2disk import run
from oci2disk.arch import Arch
from oci2disk.convert import ConvertOptions, Format, convert
from oci2disk.convert.options import DiskSpec
from oci2disk.convert.options import Table as ConvTable
from oci2disk.diskimage.partitions import (
    GPT,
    GPT_BIOS_BOOT,
    GPT_LINUX_DATA,
    MBR,
    MBR_LINUX,
    MBR_NON_FS,
    Partition,
    PartitionTableError,
    Table,
    read_partitions,
    read_table,
    root_partition,
    root_type,
    write_table,
)
from oci2disk.rootfs.flatten import flatten
from oci2disk.workspace import Workspace

MIB = 1 << 20
DISK_GUID = "3f2c7a1e-5b4d-4e8f-9a0b-1c2d3e4f5a6b"
ROOT_GUID = "9e8d7c6b-5a49-4382-9170-6f5e4d3c2b1a"
BIOS_GUID = "0a1b2c3d-4e5f-4071-8293-a4b5c6d7e8f9"


def blank(path: Path, size: int = 16 * MIB) -> Path:
    with path.open("wb") as handle:
        handle.truncate(size)
    return path


def sfdisk_json(disk: Path) -> dict[str, object]:
    table: dict[str, object] = json.loads(run.run(["sfdisk", "--json", os.fspath(disk)]).stdout)[
        "partitiontable"
    ]
    return table


def gpt_table(arch: Arch | None) -> Table:
    return Table(
        GPT,
        DISK_GUID,
        (
            Partition(1, MIB, MIB, GPT_BIOS_BOOT, GPT, name="bios", uuid=BIOS_GUID),
            Partition(2, 2 * MIB, 12 * MIB, root_type(GPT, arch), GPT, name="root", uuid=ROOT_GUID),
        ),
    )


def mbr_table() -> Table:
    return Table(
        MBR,
        "1a2b3c4d",
        (
            Partition(1, MIB, MIB, MBR_NON_FS, MBR),
            Partition(2, 2 * MIB, 14 * MIB, MBR_LINUX, MBR, bootable=True),
        ),
    )


def test_mbr_round_trip(tmp_path: Path) -> None:
    disk = blank(tmp_path / "disk.raw")
    write_table(disk, mbr_table())
    assert read_table(disk) == mbr_table()
    seen = sfdisk_json(disk)
    assert seen["label"] == "dos" and seen["id"] == "0x1a2b3c4d"
    partitions = seen["partitions"]
    assert isinstance(partitions, list)
    assert [(p["start"], p["size"], p["type"], p.get("bootable", False)) for p in partitions] == [
        (2048, 2048, "da", False),
        (4096, 28672, "83", True),
    ]
    assert mbr_table().partuuid(2) == "1a2b3c4d-02"


@pytest.mark.parametrize("arch", [Arch.X86_64, Arch.AARCH64, Arch.RISCV64])
def test_gpt_round_trip_with_the_root_type_of_the_arch(tmp_path: Path, arch: Arch) -> None:
    disk = blank(tmp_path / "disk.raw")
    write_table(disk, gpt_table(arch))
    table = read_table(disk)
    assert table is not None and table == gpt_table(arch)
    assert table.partitions[1].type == arch.gpt_root
    seen = sfdisk_json(disk)
    assert seen["label"] == "gpt" and str(seen["id"]).lower() == DISK_GUID
    partitions = seen["partitions"]
    assert isinstance(partitions, list)
    assert [(p["type"].lower(), p["uuid"].lower(), p["name"]) for p in partitions] == [
        (GPT_BIOS_BOOT, BIOS_GUID, "bios"),
        (arch.gpt_root, ROOT_GUID, "root"),
    ]
    assert table.partuuid(2) == ROOT_GUID
    # The root type is what makes it the root, before a generic Linux partition.
    assert table.partitions[1].is_root and table.partitions[1].is_linux
    assert root_partition(table.partitions) == table.partitions[1]


def test_root_type_without_a_known_arch() -> None:
    assert root_type(GPT, None) == GPT_LINUX_DATA
    assert root_type(MBR, Arch.AARCH64) == MBR_LINUX
    generic = Partition(2, MIB, MIB, GPT_LINUX_DATA, GPT)
    bios = Partition(1, 0, MIB, GPT_BIOS_BOOT, GPT)
    assert root_partition([bios, generic]) == generic
    assert root_partition([bios, Partition(3, 0, MIB, "0x0c", MBR)]) is None


OLD_SCRIPTS = {
    GPT: (
        f"label: gpt\nlabel-id: {DISK_GUID}\n"
        f'start=2048, size=2048, type={GPT_BIOS_BOOT.upper()}, uuid={BIOS_GUID}, name="bios"\n'
        f"start=4096, size=24576, type=0FC63DAF-8483-4772-8E79-3D69D8477DE4, "
        f'uuid={ROOT_GUID}, name="root"\n'
    ),
    MBR: (
        "label: dos\nlabel-id: 0x1a2b3c4d\n"
        "start=2048, size=2048, type=da\n"
        "start=4096, size=28672, type=83, bootable\n"
    ),
}


@pytest.mark.parametrize("label", [GPT, MBR])
def test_tables_are_the_bytes_sfdisk_writes_from_a_script(tmp_path: Path, label: str) -> None:
    """The same disks as before the table had its own module (a generic root type)."""
    ours = blank(tmp_path / "ours.raw")
    write_table(ours, gpt_table(None) if label == GPT else mbr_table())
    theirs = blank(tmp_path / "theirs.raw")
    run.run(
        ["sfdisk", "--quiet", "--no-reread", "--no-tell-kernel", "--wipe=always", str(theirs)],
        input=OLD_SCRIPTS[label].encode(),
    )
    assert ours.read_bytes() == theirs.read_bytes()


def test_no_table(tmp_path: Path) -> None:
    disk = blank(tmp_path / "zeros.raw", MIB)
    assert read_table(disk) is None
    assert read_partitions(disk) == []
    fat = bytearray(512)
    fat[0] = 0xEB  # a FAT boot sector also ends in 55 aa, with no partition entries
    fat[446] = 0x12
    fat[510:512] = b"\x55\xaa"
    (tmp_path / "fat.img").write_bytes(bytes(fat))
    assert read_table(tmp_path / "fat.img") is None


def corrupt(disk: Path, position: int) -> None:
    with disk.open("r+b") as handle:
        handle.seek(position)
        byte = handle.read(1)
        handle.seek(position)
        handle.write(bytes([byte[0] ^ 0xFF]))


def test_damaged_primary_gpt_falls_back_to_the_backup(tmp_path: Path) -> None:
    disk = blank(tmp_path / "disk.raw")
    write_table(disk, gpt_table(Arch.X86_64))
    corrupt(disk, 512 + 40)  # the first usable LBA, covered by the header CRC
    assert read_table(disk) == gpt_table(Arch.X86_64)
    corrupt(disk, disk.stat().st_size - 512 + 40)
    with pytest.raises(PartitionTableError, match="GPT header checksum is wrong"):
        read_table(disk)


def test_gpt_entries_must_match_their_crc(tmp_path: Path) -> None:
    disk = blank(tmp_path / "disk.raw")
    write_table(disk, gpt_table(Arch.X86_64))
    size = disk.stat().st_size
    # Change the root's name in both copies of the entries; the headers stay valid.
    (backup_entries_lba,) = struct.unpack_from("<Q", disk.read_bytes()[size - 512 :], 0x48)
    for entries_at in (2 * 512, backup_entries_lba * 512):
        corrupt(disk, entries_at + 128 + 56)
    with pytest.raises(PartitionTableError, match="fail their CRC") as info:
        read_table(disk)
    assert info.value.hint is not None


def test_write_refuses_what_a_table_cannot_hold(tmp_path: Path) -> None:
    disk = blank(tmp_path / "disk.raw")
    odd = Table(MBR, "00000001", (Partition(1, MIB + 1, MIB, MBR_LINUX, MBR),))
    with pytest.raises(PartitionTableError, match="sectors"):
        write_table(disk, odd)
    quoted = Table(GPT, DISK_GUID, (Partition(1, MIB, MIB, GPT_LINUX_DATA, GPT, name='a"b'),))
    with pytest.raises(PartitionTableError, match="double quote"):
        write_table(disk, quoted)


@pytest.mark.parametrize("table", [ConvTable.MBR, ConvTable.GPT])
def test_a_converted_disk_carries_the_root_type_of_the_image_arch(
    tmp_path: Path, table: ConvTable
) -> None:
    """The raw output's table: placeholders, then the root partition with the type of
    the image config's architecture (amd64), read back as verify and boot read it."""
    image = make_image(tmp_path / "layout", [[file("etc/hostname", b"box\n")]])
    out = tmp_path / "disk.raw"
    options = ConvertOptions(disk=DiskSpec(table=table, root_partition=2))
    with Workspace() as ws, flatten(image, ws.subdir("flat")) as rootfs:
        convert(image, rootfs, {Format.RAW: out}, options, ws)
    written = read_table(out)
    assert written is not None
    bios, root = written.partitions
    assert (bios.number, bios.start, bios.size) == (1, MIB, MIB)
    assert root.number == 2 and root.start == 2 * MIB
    if table is ConvTable.GPT:
        assert (bios.type, bios.name) == (GPT_BIOS_BOOT, "bios")
        assert root.type == Arch.X86_64.gpt_root and root.is_root
    else:
        assert (bios.type, root.type, root.bootable) == (MBR_NON_FS, MBR_LINUX, True)
    assert root_partition(written.partitions) == root
