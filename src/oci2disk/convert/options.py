"""What the converters are asked to make: the option values of every output format.

``settings.py`` turns recipe keys and command-line flags into these; the converters
only read them. Host tools: none.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Protocol

from oci2disk.compression import Compression


class Table(enum.Enum):
    MBR = "mbr"
    GPT = "gpt"
    NONE = "none"

    @property
    def max_root_partition(self) -> int:
        """The highest root partition number the table can hold (MBR: primary only)."""
        return {"mbr": 4, "gpt": 128, "none": 1}[self.value]


class FsType(enum.Enum):
    EXT4 = "ext4"
    EXT3 = "ext3"
    EXT2 = "ext2"


class FstabMode(enum.Enum):
    UUID = "uuid"
    LABEL = "label"
    NONE = "none"


# The qcow2 clusters' compressions, and those of the cgz and tar outputs.
QCOW2_COMPRESSIONS = (Compression.NONE, Compression.GZIP, Compression.ZSTD)
ARCHIVE_COMPRESSIONS = (Compression.GZIP, Compression.ZSTD, Compression.XZ, Compression.NONE)


@dataclass(frozen=True)
class DiskSpec:
    table: Table = Table.MBR
    fs: FsType = FsType.EXT4
    size: int | None = None  # bytes; None means auto
    label: str = "rootfs"
    uuid: str | None = None  # None: derived from the image digest and options
    fstab: FstabMode = FstabMode.UUID
    # The partition number of the root filesystem (gem5's root_partition); the partitions
    # before it are 1 MiB placeholders (the first one a BIOS boot partition on GPT).
    root_partition: int = 1
    # The largest disk the machine it is for can address (gem5's IdeDisk: 128 GiB).
    max_size: int | None = None
    # Also write /etc/fstab into the outputs that are not disks (tar, cgz, dir): only
    # when asked, since no ext filesystem exists there for it to name.
    fstab_all_outputs: bool = False


@dataclass(frozen=True)
class InitramfsSpec:
    """The cgz output: ``init`` is where /init points when the image has no /init."""

    init: str | None = None  # an absolute path in the image, e.g. "/sbin/init"
    compression: Compression = Compression.GZIP
    level: int | None = None  # None: the fastest good setting of the compressor found


@dataclass(frozen=True)
class TarSpec:
    compression: Compression = Compression.NONE
    level: int | None = None


@dataclass(frozen=True)
class KernelSpec:
    version: str | None = None  # None: the newest kernel in the image's /boot
    vmlinux: bool = False  # also write the uncompressed ELF kernel (gem5 wants it)


@dataclass(frozen=True)
class ConvertOptions:
    disk: DiskSpec = field(default_factory=DiskSpec)
    compression: Compression = Compression.NONE  # qcow2
    source_date_epoch: int | None = None
    initramfs: InitramfsSpec = field(default_factory=InitramfsSpec)
    tar: TarSpec = field(default_factory=TarSpec)
    kernel: KernelSpec = field(default_factory=KernelSpec)
    jobs: int | None = None  # converters running at once; None: one per core, at least 2

    @classmethod
    def from_recipe(
        cls, rcp: RecipeOptions, source_date_epoch: int | None = None
    ) -> ConvertOptions:
        return cls(
            disk=rcp.disk,
            compression=rcp.outputs.compression,
            source_date_epoch=source_date_epoch,
            initramfs=rcp.initramfs,
            tar=rcp.tar,
            kernel=rcp.kernel,
        )


class _Outputs(Protocol):
    @property
    def compression(self) -> Compression: ...


class RecipeOptions(Protocol):
    """The parts of a recipe (``oci2disk.recipe.Recipe``) that are conversion options."""

    @property
    def disk(self) -> DiskSpec: ...
    @property
    def outputs(self) -> _Outputs: ...
    @property
    def initramfs(self) -> InitramfsSpec: ...
    @property
    def tar(self) -> TarSpec: ...
    @property
    def kernel(self) -> KernelSpec: ...
