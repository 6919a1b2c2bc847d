"""recipe.toml -> frozen dataclasses, parsed once at the edge.

Every error names the file, the key path and what was expected. Unknown keys are
errors, so a typo never silently falls back to a default.
"""

from __future__ import annotations

import enum
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from oci2disk.errors import RecipeError

E = TypeVar("E", bound=enum.Enum)

RECIPE_FILE = "recipe.toml"
MiB = 1 << 20


class Format(enum.Enum):
    RAW = "raw"
    QCOW2 = "qcow2"
    VMDK = "vmdk"
    VHDX = "vhdx"
    VPC = "vpc"
    VDI = "vdi"
    FS = "fs"
    TAR = "tar"
    CGZ = "cgz"
    DIR = "dir"
    KERNEL = "kernel"
    SQUASHFS = "squashfs"
    ISO = "iso"

    @property
    def suffix(self) -> str:
        """File name suffix of the default output (the kernel output is named vmlinuz)."""
        return {"fs": "ext4", "vpc": "vhd", "dir": "rootfs"}.get(self.value, self.value)

    @classmethod
    def parse(cls, text: str) -> Format:
        name = {"vhd": "vpc"}.get(text.lower(), text.lower())
        try:
            return cls(name)
        except ValueError:
            raise RecipeError(
                f"unknown output format {text!r}",
                hint="formats: "
                + ", ".join(f.value for f in cls)
                + " (vhd is another name for vpc)",
            ) from None


DISK_FORMATS = {Format.RAW, Format.QCOW2, Format.VMDK, Format.VHDX, Format.VPC, Format.VDI}


class Table(enum.Enum):
    MBR = "mbr"
    GPT = "gpt"
    NONE = "none"


class FsType(enum.Enum):
    EXT4 = "ext4"
    EXT3 = "ext3"
    EXT2 = "ext2"


class FstabMode(enum.Enum):
    UUID = "uuid"
    LABEL = "label"
    NONE = "none"


class Compression(enum.Enum):
    NONE = "none"
    ZLIB = "zlib"
    ZSTD = "zstd"


class ArchiveCompression(enum.Enum):
    """How the cgz (cpio) and tar outputs are compressed."""

    GZIP = "gzip"
    ZSTD = "zstd"
    XZ = "xz"
    NONE = "none"


# The levels each compressor accepts (inclusive).
ARCHIVE_LEVELS = {
    ArchiveCompression.GZIP: (1, 9),
    ArchiveCompression.ZSTD: (1, 19),
    ArchiveCompression.XZ: (0, 9),
}


@dataclass(frozen=True)
class BuildSpec:
    dockerfile: Path | None  # absolute; None when the recipe names an image instead
    context: Path
    image: str | None = None
    target: str | None = None
    platform: str | None = None
    network: str = "host"
    args: Mapping[str, str] = field(default_factory=dict)


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


# The highest root partition number each table can hold (MBR: primary partitions only).
MAX_ROOT_PARTITION = {Table.MBR: 4, Table.GPT: 128}


@dataclass(frozen=True)
class OutputSpec:
    formats: tuple[Format, ...] = (Format.RAW,)
    name: str = "disk"
    compression: Compression = Compression.NONE  # qcow2 only


@dataclass(frozen=True)
class InitramfsSpec:
    """The cgz output: ``init`` is where /init points when the image has no /init."""

    init: str | None = None  # an absolute path in the image, e.g. "/sbin/init"
    compression: ArchiveCompression = ArchiveCompression.GZIP
    level: int | None = None  # None: the fastest good setting of the compressor found


@dataclass(frozen=True)
class TarSpec:
    compression: ArchiveCompression = ArchiveCompression.NONE
    level: int | None = None


@dataclass(frozen=True)
class KernelSpec:
    version: str | None = None  # None: the newest kernel in the image's /boot
    vmlinux: bool = False  # also write the uncompressed ELF kernel (gem5 wants it)


@dataclass(frozen=True)
class Recipe:
    path: Path  # the recipe directory
    name: str
    build: BuildSpec
    disk: DiskSpec
    outputs: OutputSpec
    initramfs: InitramfsSpec = field(default_factory=InitramfsSpec)
    tar: TarSpec = field(default_factory=TarSpec)
    kernel: KernelSpec = field(default_factory=KernelSpec)


SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(?:i?B)?\s*$", re.IGNORECASE)
UUID_RE = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")


def parse_size(text: str) -> int | None:
    """``"auto"`` -> None; ``"4G"``, ``"512M"``, ``"1.5G"`` -> bytes (binary units)."""
    if text.strip().lower() == "auto":
        return None
    match = SIZE_RE.match(text)
    if not match:
        raise ValueError(text)
    number, unit = match.groups()
    scale = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}[unit.upper()]
    return int(float(number) * scale)


class _Section:
    """A TOML table that remembers which keys were read, so leftovers are errors."""

    def __init__(self, file: Path, prefix: str, data: Mapping[str, Any]) -> None:
        self.file = file
        self.prefix = prefix
        self.data = data
        self.used: set[str] = set()

    def error(self, key: str, expected: str) -> RecipeError:
        value = self.data.get(key)
        return RecipeError(f"{self.file}: {self.prefix}{key}: expected {expected}, got {value!r}")

    def text(self, key: str, default: str | None = None) -> str | None:
        self.used.add(key)
        value = self.data.get(key, default)
        if value is not None and not isinstance(value, str):
            raise self.error(key, "a string")
        return value

    def enum(self, key: str, kind: type[E], default: E) -> E:
        text = self.text(key)
        if text is None:
            return default
        try:
            return kind(text.lower())
        except ValueError:
            choices = " | ".join(repr(e.value) for e in kind)
            raise self.error(key, f"one of {choices}") from None

    def str_map(self, key: str) -> dict[str, str]:
        self.used.add(key)
        value = self.data.get(key, {})
        if not isinstance(value, Mapping) or not all(
            isinstance(v, str | int | float | bool) for v in value.values()
        ):
            raise self.error(key, 'a table of KEY = "value"')
        return {str(k): str(v) for k, v in value.items()}

    def integer(self, key: str, default: int | None = None) -> int | None:
        self.used.add(key)
        value = self.data.get(key, default)
        if value is not None and (not isinstance(value, int) or isinstance(value, bool)):
            raise self.error(key, "a whole number")
        return value

    def boolean(self, key: str, default: bool) -> bool:
        self.used.add(key)
        value = self.data.get(key, default)
        if not isinstance(value, bool):
            raise self.error(key, "true or false")
        return value

    def str_list(self, key: str, default: list[str]) -> list[str]:
        self.used.add(key)
        value = self.data.get(key, default)
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise self.error(key, "a list of strings")
        return value

    def finish(self) -> None:
        unknown = sorted(set(self.data) - self.used)
        if unknown:
            known = ", ".join(sorted(self.used))
            raise RecipeError(
                f"{self.file}: unknown key {self.prefix}{unknown[0]}",
                hint=f"keys allowed in [{self.prefix.rstrip('.') or 'top level'}]: {known}",
            )


def load(recipe_dir: Path) -> Recipe:
    """Read and validate ``RECIPE_DIR/recipe.toml``."""
    recipe_dir = Path(recipe_dir).resolve()
    file = recipe_dir / RECIPE_FILE
    if not recipe_dir.is_dir():
        raise RecipeError(f"{recipe_dir}: no such recipe directory")
    if not file.is_file():
        raise RecipeError(
            f"{file}: missing", hint="a recipe is a folder with recipe.toml beside a Dockerfile"
        )
    try:
        data = tomllib.loads(file.read_text())
    except tomllib.TOMLDecodeError as exc:
        raise RecipeError(f"{file}: not valid TOML ({exc})") from None
    top = _Section(file, "", data)
    tables = {}
    for name in ("build", "disk", "outputs", "initramfs", "tar", "kernel"):
        top.used.add(name)
        value = data.get(name, {})
        if not isinstance(value, Mapping):
            raise top.error(name, "a table")
        tables[name] = _Section(file, f"{name}.", value)
    top.finish()
    build = _build(recipe_dir, tables["build"])
    disk = _disk(tables["disk"])
    outputs = _outputs(tables["outputs"])
    initramfs = _initramfs(tables["initramfs"])
    tar = _tar(tables["tar"])
    kernel = _kernel(tables["kernel"])
    for section in tables.values():
        section.finish()
    return Recipe(recipe_dir, recipe_dir.name, build, disk, outputs, initramfs, tar, kernel)


def _build(recipe_dir: Path, s: _Section) -> BuildSpec:
    image = s.text("image")
    dockerfile_name = s.text("dockerfile")
    if image and dockerfile_name:
        raise RecipeError(f"{s.file}: build.image and build.dockerfile exclude each other")
    context = (recipe_dir / (s.text("context") or ".")).resolve()
    network = s.text("network", "host") or "host"
    if network not in ("host", "default", "none"):
        raise s.error("network", "one of 'host' | 'default' | 'none'")
    dockerfile = None
    if not image:
        dockerfile = (recipe_dir / (dockerfile_name or "Dockerfile")).resolve()
        if not dockerfile.is_file():
            raise RecipeError(
                f"{s.file}: build.dockerfile: {dockerfile} does not exist",
                hint="add a Dockerfile beside recipe.toml or name one with build.dockerfile",
            )
        if not context.is_dir():
            raise RecipeError(f"{s.file}: build.context: {context} is not a directory")
    return BuildSpec(
        dockerfile=dockerfile,
        context=context,
        image=image,
        target=s.text("target"),
        platform=s.text("platform"),
        network=network,
        args=s.str_map("args"),
    )


def _disk(s: _Section) -> DiskSpec:
    s.used.add("size")
    size_value = s.data.get("size", "auto")
    try:
        if not isinstance(size_value, str):
            raise ValueError(size_value)
        size = parse_size(size_value)
    except ValueError:
        raise s.error("size", 'a size like "4G" or "auto"') from None
    uuid = s.text("uuid")
    if uuid is not None and not UUID_RE.match(uuid.lower()):
        raise s.error("uuid", "a UUID like 0b5c3f0e-7c1d-4b5e-9a6f-2d8e4f1a3b7c")
    label = s.text("label", "rootfs") or ""
    if len(label.encode()) > 16:
        raise s.error("label", "at most 16 bytes (the ext4 limit)")
    table = s.enum("table", Table, Table.MBR)
    return DiskSpec(
        table=table,
        fs=s.enum("fs", FsType, FsType.EXT4),
        size=size,
        label=label,
        uuid=uuid.lower() if uuid else None,
        fstab=s.enum("fstab", FstabMode, FstabMode.UUID),
        root_partition=_root_partition(s, table),
    )


def _root_partition(s: _Section, table: Table) -> int:
    number = s.integer("root_partition")
    if number is None:
        return 1
    if table is Table.NONE:
        raise s.error("root_partition", 'no root_partition with table = "none" (no partitions)')
    highest = MAX_ROOT_PARTITION[table]
    if not 1 <= number <= highest:
        more = ' (table = "gpt" allows up to 128)' if table is Table.MBR else ""
        raise s.error("root_partition", f"a {table.value} partition from 1 to {highest}{more}")
    return number


def _outputs(s: _Section) -> OutputSpec:
    names = s.str_list("formats", ["raw"])
    if not names:
        raise s.error("formats", "at least one format")
    formats: list[Format] = []
    for text in names:
        try:
            fmt = Format.parse(text)
        except RecipeError as exc:
            raise RecipeError(f"{s.file}: outputs.formats: {exc.message}", hint=exc.hint) from None
        if fmt not in formats:
            formats.append(fmt)
    name = s.text("name", "disk") or "disk"
    if "/" in name or name.startswith("."):
        raise s.error("name", "a plain file name without '/'")
    return OutputSpec(
        formats=tuple(formats),
        name=name,
        compression=s.enum("compression", Compression, Compression.NONE),
    )


def check_level(compression: ArchiveCompression, level: int | None) -> str | None:
    """None if ``level`` suits ``compression``, else what was expected."""
    if level is None:
        return None
    if compression is ArchiveCompression.NONE:
        return "no level when compression is 'none'"
    low, high = ARCHIVE_LEVELS[compression]
    if not low <= level <= high:
        return f"a {compression.value} level from {low} to {high}"
    return None


def _compression_and_level(
    s: _Section, default: ArchiveCompression
) -> tuple[ArchiveCompression, int | None]:
    compression = s.enum("compression", ArchiveCompression, default)
    level = s.integer("level")
    problem = check_level(compression, level)
    if problem:
        raise s.error("level", problem)
    return compression, level


def _initramfs(s: _Section) -> InitramfsSpec:
    init = s.text("init")
    if init is not None and (not init.startswith("/") or init.rstrip("/") in ("", "/init")):
        raise s.error("init", 'the absolute path of the image\'s init, like "/sbin/init"')
    compression, level = _compression_and_level(s, ArchiveCompression.GZIP)
    return InitramfsSpec(init=init, compression=compression, level=level)


def _tar(s: _Section) -> TarSpec:
    compression, level = _compression_and_level(s, ArchiveCompression.NONE)
    return TarSpec(compression=compression, level=level)


def _kernel(s: _Section) -> KernelSpec:
    version = s.text("version")
    if version is not None and (not version or "/" in version):
        raise s.error("version", 'a kernel version like "6.1.0-18-amd64"')
    return KernelSpec(version=version, vmlinux=s.boolean("vmlinux", False))
