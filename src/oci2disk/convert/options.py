"""What the converters are asked to make: the option values of every output format.

``settings.py`` turns recipe keys and command-line flags into these; the converters
only read them. Host tools: none.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Protocol

from oci2disk.compression import Compression
from oci2disk.errors import ConvertError


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
    # Whether the table was chosen (recipe or flag): when not, a disk with UEFI boot is
    # GPT, since UEFI firmware looks for the ESP in a GPT.
    table_given: bool = False


class Firmware(enum.Enum):
    """A firmware a disk gets a bootloader for."""

    BIOS = "bios"
    UEFI = "uefi"


@dataclass(frozen=True)
class BootSpec:
    """``[boot]`` / ``--firmware`` and ``--cmdline``: the bootloaders written into disks."""

    firmware: tuple[Firmware, ...] | None = None  # None: what the image's arch and /boot allow
    cmdline: str = ""  # appended to the default command line (root, consoles, ro)


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


MIN_BLOCK = 4096
MAX_BLOCK = 1 << 20
DEFAULT_BLOCK = 1 << 17


class SquashfsCompressor(enum.Enum):
    """tar2sqfs's compressors (the kernel needs the matching CONFIG_SQUASHFS_*)."""

    GZIP = "gzip"
    XZ = "xz"
    ZSTD = "zstd"
    LZ4 = "lz4"
    LZO = "lzo"
    LZMA = "lzma"  # legacy, and not mountable by mainline kernels

    @classmethod
    def parse(cls, text: str) -> SquashfsCompressor:
        try:
            return cls(text.lower())
        except ValueError:
            names = ", ".join(c.value for c in cls)
            raise ConvertError(
                f"unknown squashfs compressor {text!r}", hint=f"use one of: {names}"
            ) from None


@dataclass(frozen=True)
class SquashfsSpec:
    """``--squashfs-compressor``, ``--squashfs-block-size``, ``--squashfs-xattrs``."""

    # zstd: on the 830 MB Debian image, xz took 2.8 times as long for an image 9% smaller.
    # Kernels read zstd squashfs since 4.14 (Debian, Ubuntu, Fedora, openEuler build it in).
    compressor: SquashfsCompressor = SquashfsCompressor.ZSTD
    block_size: int = DEFAULT_BLOCK
    xattrs: bool = True

    def __post_init__(self) -> None:
        size = self.block_size
        if not MIN_BLOCK <= size <= MAX_BLOCK or size & (size - 1):
            raise ConvertError(
                f"squashfs block size {size} is not possible",
                hint="use a power of two from 4096 (4K) to 1048576 (1M); the default is 128K",
            )


VOLUME_ID_MAX = 32  # characters of an ISO 9660 volume id


@dataclass(frozen=True)
class IsoSpec:
    """``--iso-append`` (kernel arguments after the console) and the volume label."""

    append: str = ""
    volume_id: str = "OCI2DISK"
    console: str = "ttyS0,115200"
    timeout: int = 1  # seconds GRUB shows its menu

    def __post_init__(self) -> None:
        if not self.volume_id or len(self.volume_id) > VOLUME_ID_MAX:
            raise ConvertError(
                f"ISO volume id {self.volume_id!r} must have 1 to {VOLUME_ID_MAX} characters"
            )


@dataclass(frozen=True)
class ConvertOptions:
    disk: DiskSpec = field(default_factory=DiskSpec)
    compression: Compression = Compression.NONE  # qcow2
    source_date_epoch: int | None = None
    initramfs: InitramfsSpec = field(default_factory=InitramfsSpec)
    tar: TarSpec = field(default_factory=TarSpec)
    kernel: KernelSpec = field(default_factory=KernelSpec)
    jobs: int | None = None  # converters running at once; None: one per core, at least 2
    squashfs: SquashfsSpec = field(default_factory=SquashfsSpec)
    iso: IsoSpec = field(default_factory=IsoSpec)
    # Keep the image's machine-id, SSH host keys and random seed (--keep-identity); by
    # default every output but the tar takes them out (oci2disk.rootfs.identity).
    keep_identity: bool = False
    # Replace a directory output that is not empty (--force; the caller has checked
    # that oci2disk made it, since everything else in it is deleted).
    replace: bool = False
    boot: BootSpec = field(default_factory=BootSpec)

    @classmethod
    def from_recipe(
        cls, rcp: RecipeOptions, source_date_epoch: int | None = None
    ) -> ConvertOptions:
        return cls(
            disk=rcp.disk,
            compression=rcp.outputs.compression,
            keep_identity=rcp.outputs.keep_identity,
            source_date_epoch=source_date_epoch,
            initramfs=rcp.initramfs,
            tar=rcp.tar,
            kernel=rcp.kernel,
            squashfs=rcp.squashfs,
            iso=rcp.iso,
            boot=rcp.boot,
        )


class _Outputs(Protocol):
    @property
    def compression(self) -> Compression: ...
    @property
    def keep_identity(self) -> bool: ...


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
    @property
    def squashfs(self) -> SquashfsSpec: ...
    @property
    def iso(self) -> IsoSpec: ...
    @property
    def boot(self) -> BootSpec: ...
