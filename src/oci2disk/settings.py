"""One table of settings: each recipe.toml key and its command-line flag, checked alike.

A :class:`Setting` names its recipe key path (``disk.label``), its flag (``--label``),
how a value is parsed and checked, its default and its help. ``recipe.py`` reads
recipe.toml through it and ``cli.py`` builds its flags from it, so a value refused in
one place is refused in the other with the same words. The checks that involve two
settings (a level and its compression, a root partition and its table) are in
:func:`disk_spec` and :func:`compressed`, which both sides call.

Host tools: none.
"""

from __future__ import annotations

import enum
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from oci2disk.compression import Compression
from oci2disk.convert.formats import Format
from oci2disk.convert.options import (
    ARCHIVE_COMPRESSIONS,
    QCOW2_COMPRESSIONS,
    VOLUME_ID_MAX,
    BootSpec,
    DiskSpec,
    Firmware,
    FstabMode,
    FsType,
    InitramfsSpec,
    IsoSpec,
    KernelSpec,
    SquashfsCompressor,
    SquashfsSpec,
    Table,
    TarSpec,
)
from oci2disk.errors import ConvertError, UsageError

T = TypeVar("T")
E = TypeVar("E", bound=enum.Enum)

MiB = 1 << 20
LABEL_MAX = 16  # bytes of an ext2/3/4 volume label
SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(?:i?B)?\s*$", re.IGNORECASE)
UUID_RE = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")
NETWORKS = ("host", "default", "none")
EPOCH_MAX = 0xFFFFFFFF  # seconds: the largest time a newc cpio header holds


class CliKind(enum.Enum):
    """How a flag's text becomes the value recipe.toml would hold."""

    TEXT = "text"  # --label root
    INT = "int"  # --level 9
    BOOL = "bool"  # --vmlinux (given: true)
    LIST = "list"  # --format raw,qcow2
    MAP = "map"  # --build-arg K=V, repeated


class Invalid(Exception):
    """A value a setting refuses; ``expected`` says what it takes."""

    def __init__(self, expected: str) -> None:
        super().__init__(expected)
        self.expected = expected


@dataclass(frozen=True)
class Setting(Generic[T]):
    """One setting, as recipe.toml and the command line both spell it."""

    key: str  # recipe key path: "disk.label"
    flag: str | None  # command-line flag, None when only recipes have it
    parse: Callable[[Any], T]  # a TOML value (a flag's text arrives as TOML would hold it)
    default: T
    help: str
    metavar: str | None = None
    choices: tuple[str, ...] = ()  # the values a flag takes, when it is a choice
    cli_kind: CliKind = CliKind.TEXT

    @property
    def section(self) -> str:
        return self.key.partition(".")[0]

    @property
    def name(self) -> str:
        return self.key.partition(".")[2]

    def value(self, raw: Any) -> T:
        """``raw`` parsed, or the default when it is None (not given)."""
        return self.default if raw is None else self.parse(raw)


# ------------------------------------------------------------------ parsers


def text(value: Any) -> str:
    if not isinstance(value, str):
        raise Invalid("a string")
    if "\0" in value:  # no path, argument or file can hold one
        raise Invalid("a string without NUL bytes")
    return value


def whole_number(value: Any) -> int:
    if not isinstance(value, int) or isinstance(value, bool):
        raise Invalid("a whole number")
    return value


def boolean(value: Any) -> bool:
    if not isinstance(value, bool):
        raise Invalid("true or false")
    return value


def choice(kind: type[E]) -> Callable[[Any], E]:
    def parse(value: Any) -> E:
        try:
            return kind(text(value).lower())
        except (Invalid, ValueError):
            raise Invalid("one of " + " | ".join(repr(e.value) for e in kind)) from None

    return parse


def compression_of(names: Mapping[Compression, str]) -> Callable[[Any], Compression]:
    """A parser of the compressions named ``names`` (in the order messages list them)."""

    def parse(value: Any) -> Compression:
        wanted = value.strip().lower() if isinstance(value, str) else None
        for compression, name in names.items():
            if wanted == name:
                return compression
        raise Invalid("one of " + " | ".join(repr(name) for name in names.values()))

    return parse


QCOW2_NAMES = {Compression.GZIP: "zlib"}  # qemu-img's name for deflate


def qcow2_name(compression: Compression) -> str:
    return QCOW2_NAMES.get(compression, compression.label)


def parse_size(text_: str) -> int | None:
    """``"auto"`` -> None; ``"4G"``, ``"512M"``, ``"1.5G"`` -> bytes (binary units)."""
    if text_.strip().lower() == "auto":
        return None
    match = SIZE_RE.match(text_)
    if not match:
        raise ValueError(text_)
    number, unit = match.groups()
    scale = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}[unit.upper()]
    return int(float(number) * scale)


def size(value: Any) -> int | None:
    try:
        if not isinstance(value, str):
            raise ValueError(value)
        return parse_size(value)
    except ValueError:
        raise Invalid('a size like "4G" or "auto"') from None


def limit_size(value: Any) -> int | None:
    try:
        if not isinstance(value, str):
            raise ValueError(value)
        result = parse_size(value)
    except ValueError:
        result = None
    if result is None:
        raise Invalid('a size like "128G" (the largest disk the target machine can address)')
    return result


def block_size(value: Any) -> int:
    result = size(value)
    if result is None or not 4096 <= result <= 1 << 20 or result & (result - 1):
        raise Invalid('a power of two from "4K" to "1M", like "128K"')
    return result


def volume_id(value: Any) -> str:
    result = text(value)
    if not 1 <= len(result) <= VOLUME_ID_MAX:
        raise Invalid(f"1 to {VOLUME_ID_MAX} characters")
    return result


def label(value: Any) -> str:
    result = text(value)
    if len(result.encode()) > LABEL_MAX:
        raise Invalid(f"at most {LABEL_MAX} bytes (the ext4 limit)")
    return result


def uuid(value: Any) -> str | None:
    result = text(value).strip().lower()
    if not UUID_RE.match(result):
        raise Invalid("a UUID like 0b5c3f0e-7c1d-4b5e-9a6f-2d8e4f1a3b7c")
    if not result.strip("0-"):  # mke2fs takes the nil UUID as "no UUID at all"
        raise Invalid("a UUID other than the nil UUID (all zeros)")
    return result


def formats(value: Any) -> tuple[Format, ...]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise Invalid("a list of strings")
    if not value:
        raise Invalid("at least one format")
    found: list[Format] = []
    for name in value:
        fmt = Format.find(name)
        if fmt is None:
            raise Invalid(f"one of {Format.names()} (unknown output format {name!r})")
        if fmt not in found:
            found.append(fmt)  # duplicates collapse, order is kept
    return tuple(found)


def firmware(value: Any) -> tuple[Firmware, ...]:
    """``["bios", "uefi"]``, ``"uefi"`` or ``"none"`` (no bootloader): firmwares to boot with."""
    names = [value] if isinstance(value, str) else value
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise Invalid('a list of firmwares like ["bios", "uefi"], or "none"')
    names = [n.strip().lower() for n in names if n.strip()]
    if names == ["none"] or not names:
        return ()
    found: list[Firmware] = []
    for name in names:
        try:
            kind = Firmware(name)
        except ValueError:
            raise Invalid(f"bios, uefi or none, not {name!r}") from None
        if kind not in found:
            found.append(kind)
    return tuple(sorted(found, key=list(Firmware).index))


def file_name(value: Any) -> str:
    result = text(value)
    if not result or "/" in result or result.startswith("."):
        raise Invalid("a plain file name without '/'")
    return result


def platform(value: Any) -> str | None:
    result = text(value)
    parts = result.split("/")
    if len(parts) not in (2, 3) or not all(parts):
        raise Invalid("OS/ARCH[/VARIANT], e.g. linux/arm64")
    return result


def network(value: Any) -> str:
    result = text(value)
    if result not in NETWORKS:
        raise Invalid("one of " + " | ".join(repr(n) for n in NETWORKS))
    return result


def str_map(value: Any) -> dict[str, str]:
    if not isinstance(value, Mapping) or not all(
        isinstance(v, str | int | float | bool) for v in value.values()
    ):
        raise Invalid('a table of KEY = "value"')
    return {str(k): str(v) for k, v in value.items()}


def init_path(value: Any) -> str | None:
    result = text(value)
    if not result.startswith("/") or result.rstrip("/") in ("", "/init"):
        raise Invalid('the absolute path of the image\'s init, like "/sbin/init"')
    return result


def kernel_version(value: Any) -> str | None:
    result = text(value)
    if not result or "/" in result:
        raise Invalid('a kernel version like "6.1.0-18-amd64"')
    return result


# ------------------------------------------------------------------ the table

_ARCHIVE = {c: c.label for c in ARCHIVE_COMPRESSIONS}
_QCOW2 = {c: qcow2_name(c) for c in QCOW2_COMPRESSIONS}


def _names(kind: type[enum.Enum]) -> tuple[str, ...]:
    return tuple(str(e.value) for e in kind)


SETTINGS: tuple[Setting[Any], ...] = (
    Setting("build.image", None, text, None, "build nothing: convert this image"),
    Setting("build.dockerfile", None, text, None, "the Dockerfile (default: Dockerfile)"),
    Setting("build.context", None, text, None, "the build context (default: .)"),
    Setting("build.target", None, text, None, "the Dockerfile stage to build"),
    Setting(
        "build.platform",
        "--platform",
        platform,
        None,
        "OS/ARCH to build or pick, e.g. linux/arm64 (qemu-user)",
        metavar="OS/ARCH",
    ),
    Setting("build.network", None, network, "host", "the RUN steps' network"),
    Setting(
        "build.args",
        "--build-arg",
        str_map,
        {},
        "a build argument (repeatable)",
        metavar="K=V",
        cli_kind=CliKind.MAP,
    ),
    Setting(
        "disk.size",
        "--size",
        size,
        None,
        "disk size: 4G, 512M or auto (default: the content's need plus room)",
    ),
    Setting(
        "disk.max_size",
        "--max-size",
        limit_size,
        None,
        "the largest disk the target machine can address (gem5's IdeDisk: 128G)",
    ),
    Setting(
        "disk.table",
        "--table",
        choice(Table),
        Table.MBR,
        "partition table",
        choices=_names(Table),
    ),
    Setting("disk.fs", "--fs", choice(FsType), FsType.EXT4, "filesystem", choices=_names(FsType)),
    Setting("disk.label", "--label", label, "rootfs", "filesystem label (at most 16 bytes)"),
    Setting("disk.uuid", "--uuid", uuid, None, "filesystem UUID (default: from the image)"),
    Setting(
        "disk.fstab",
        "--fstab",
        choice(FstabMode),
        FstabMode.UUID,
        "/etc/fstab naming the root filesystem by uuid (default) or label, or none; "
        "written into disks, and into the tar output only when given",
        choices=_names(FstabMode),
    ),
    Setting(
        "disk.root_partition",
        "--root-partition",
        whole_number,
        None,
        "the root filesystem's partition number (default: 1)",
        cli_kind=CliKind.INT,
    ),
    Setting(
        "outputs.formats",
        "--format",
        formats,
        (Format.RAW,),
        "outputs, e.g. raw,qcow2 (" + ", ".join(f.label for f in Format) + ")",
        metavar="FORMAT[,FORMAT...]",
        cli_kind=CliKind.LIST,
    ),
    Setting("outputs.name", None, file_name, "disk", "base name of the output files"),
    Setting(
        "outputs.keep_identity",
        "--keep-identity",
        boolean,
        False,
        "keep the image's machine-id, SSH host keys and random seed in disks, initramfs, "
        "squashfs, iso and dir outputs (default: take them out, so each machine is its own)",
        cli_kind=CliKind.BOOL,
    ),
    Setting(
        "outputs.compression",
        "--compression",
        compression_of(_QCOW2),
        Compression.NONE,
        "qcow2 compression",
        choices=tuple(_QCOW2.values()),
    ),
    Setting(
        "initramfs.init",
        "--init",
        init_path,
        None,
        "cgz: make /init a symlink to this init, e.g. /sbin/init",
    ),
    Setting(
        "initramfs.compression",
        "--cpio-compression",
        compression_of(_ARCHIVE),
        Compression.GZIP,
        "cgz compression",
        choices=tuple(_ARCHIVE.values()),
    ),
    Setting(
        "initramfs.level",
        "--level",
        whole_number,
        None,
        "compression level of the cgz or tar output",
        cli_kind=CliKind.INT,
    ),
    Setting(
        "tar.compression",
        "--tar-compression",
        compression_of(_ARCHIVE),
        Compression.NONE,
        "tar compression",
        choices=tuple(_ARCHIVE.values()),
    ),
    Setting("tar.level", "--level", whole_number, None, "compression level of the tar output"),
    Setting(
        "kernel.version",
        "--kernel-version",
        kernel_version,
        None,
        "kernel: this version instead of the newest",
    ),
    Setting(
        "squashfs.compressor",
        "--squashfs-compressor",
        choice(SquashfsCompressor),
        SquashfsCompressor.ZSTD,
        "squashfs compressor (the kernel must read it; zstd: Linux >= 4.14)",
        choices=_names(SquashfsCompressor),
    ),
    Setting(
        "squashfs.block_size",
        "--squashfs-block-size",
        block_size,
        1 << 17,
        "squashfs block size: a power of two from 4K to 1M (default 128K)",
    ),
    Setting("squashfs.xattrs", None, boolean, True, "keep xattrs in the squashfs image"),
    Setting(
        "boot.firmware",
        "--firmware",
        firmware,
        None,
        "the firmwares the disk boots with: bios,uefi, bios, uefi or none (default: "
        "bios,uefi on x86-64 and uefi on arm64 when the image has a kernel in /boot)",
        metavar="FIRMWARE[,FIRMWARE]",
        cli_kind=CliKind.LIST,
    ),
    Setting(
        "boot.cmdline",
        "--cmdline",
        text,
        "",
        "kernel command line added to the default one (root=UUID=..., consoles, ro)",
    ),
    Setting("iso.append", "--iso-append", text, "", "iso: extra kernel command line"),
    Setting("iso.volume_id", "--iso-volume-id", volume_id, "OCI2DISK", "iso: volume id"),
    Setting(
        "kernel.vmlinux",
        "--vmlinux",
        boolean,
        False,
        "kernel: also write an ELF vmlinux",
        cli_kind=CliKind.BOOL,
    ),
)

BY_KEY: dict[str, Setting[Any]] = {s.key: s for s in SETTINGS}
SECTIONS: tuple[str, ...] = tuple(dict.fromkeys(s.section for s in SETTINGS))


def section_keys(section: str) -> list[str]:
    return [s.name for s in SETTINGS if s.section == section]


# ------------------------------------------------------------------ values of several settings


class Problem(Exception):
    """A value refused, with the key it belongs to (raised by the combining functions)."""

    def __init__(self, key: str, expected: str) -> None:
        super().__init__(f"{key}: expected {expected}")
        self.key = key
        self.expected = expected


Values = Mapping[str, Any]  # key path -> parsed value; missing keys take the default


def get(values: Values, key: str) -> Any:
    return values.get(key, BY_KEY[key].default)


def disk_spec(values: Values) -> DiskSpec:
    table: Table = get(values, "disk.table")
    number: int | None = get(values, "disk.root_partition")
    if number is not None:
        if table is Table.NONE:
            raise Problem(
                "disk.root_partition", 'no root_partition with table = "none" (no partitions)'
            )
        highest = table.max_root_partition
        if not 1 <= number <= highest:
            more = ' (table = "gpt" allows up to 128)' if table is Table.MBR else ""
            raise Problem(
                "disk.root_partition", f"a {table.value} partition from 1 to {highest}{more}"
            )
    size_: int | None = get(values, "disk.size")
    max_size: int | None = get(values, "disk.max_size")
    if size_ is not None and max_size is not None and size_ > max_size:
        shown = f"{max_size >> 30}G" if max_size % (1 << 30) == 0 else f"{max_size} bytes"
        raise Problem(
            "disk.size", f"at most disk.max_size ({shown}, what the target machine can address)"
        )
    return DiskSpec(
        table=table,
        fs=get(values, "disk.fs"),
        size=size_,
        max_size=max_size,
        label=get(values, "disk.label"),
        uuid=get(values, "disk.uuid"),
        fstab=get(values, "disk.fstab"),
        root_partition=number or 1,
        fstab_all_outputs="disk.fstab" in values,
        table_given="disk.table" in values,
    )


def boot_spec(values: Values) -> BootSpec:
    """The bootloaders asked for, refused where the disk layout cannot hold them."""
    chosen: tuple[Firmware, ...] | None = get(values, "boot.firmware")
    if chosen:
        table: Table = get(values, "disk.table")
        names = ",".join(f.value for f in chosen)
        if table is Table.NONE:
            raise Problem(
                "boot.firmware",
                f'none with table = "none": a bare filesystem has no partition table for '
                f"a bootloader to live in, so {names} cannot boot it (use table gpt, or mbr "
                "for bios alone)",
            )
        if Firmware.UEFI in chosen and table is Table.MBR and "disk.table" in values:
            raise Problem(
                "boot.firmware",
                'bios with table = "mbr": UEFI boot needs an EFI system partition in a GPT '
                "(use table gpt for uefi)",
            )
        number: int | None = get(values, "disk.root_partition")
        if number not in (None, 1):
            raise Problem(
                "boot.firmware",
                "firmware none with root_partition: a disk with bootloaders keeps the "
                "root filesystem in partition 1 (as Debian's cloud images do)",
            )
    return BootSpec(chosen, get(values, "boot.cmdline"))


def compressed(values: Values, section: str) -> tuple[Compression, int | None]:
    """The compression and level of the ``initramfs`` or ``tar`` section, checked together."""
    compression: Compression = get(values, f"{section}.compression")
    chosen: int | None = get(values, f"{section}.level")
    problem = compression.check_level(chosen)
    if problem:
        raise Problem(f"{section}.level", problem)
    return compression, chosen


def initramfs_spec(values: Values) -> InitramfsSpec:
    compression, chosen = compressed(values, "initramfs")
    return InitramfsSpec(get(values, "initramfs.init"), compression, chosen)


def tar_spec(values: Values) -> TarSpec:
    compression, chosen = compressed(values, "tar")
    return TarSpec(compression, chosen)


def kernel_spec(values: Values) -> KernelSpec:
    return KernelSpec(get(values, "kernel.version"), get(values, "kernel.vmlinux"))


def squashfs_spec(values: Values) -> SquashfsSpec:
    try:
        return SquashfsSpec(
            get(values, "squashfs.compressor"),
            get(values, "squashfs.block_size"),
            get(values, "squashfs.xattrs"),
        )
    except ConvertError as exc:
        raise Problem("squashfs.block_size", exc.hint or exc.message) from None


def iso_spec(values: Values) -> IsoSpec:
    return IsoSpec(append=get(values, "iso.append"), volume_id=get(values, "iso.volume_id"))


# ------------------------------------------------------------------ the environment


def source_date_epoch(environ: Mapping[str, str] | None = None) -> int | None:
    """SOURCE_DATE_EPOCH, read once at the start of a run; refused when not seconds."""
    value = (os.environ if environ is None else environ).get("SOURCE_DATE_EPOCH", "")
    if not value:
        return None
    if not value.strip().isdigit():
        raise UsageError(
            f"SOURCE_DATE_EPOCH={value!r} is not a whole number of seconds",
            hint="set it to a Unix time like $(git log -1 --format=%ct), or unset it",
        )
    if int(value) > EPOCH_MAX:
        # newc cpio headers and ext2/3 inodes hold 32-bit times: refused here, not after
        # a build, with a wrong date in the outputs
        raise UsageError(
            f"SOURCE_DATE_EPOCH={value} is after 2106-02-07, the last time every output holds",
            hint="set it to a Unix time like $(git log -1 --format=%ct), or unset it",
        )
    return int(value)
