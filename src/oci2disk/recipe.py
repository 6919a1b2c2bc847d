"""recipe.toml -> frozen dataclasses, parsed once at the edge.

Every key is a setting of :mod:`oci2disk.settings` (the table the command line uses
too). Every error names the file, the key path and what was expected. Unknown keys are
errors, so a typo never silently falls back to a default.
"""

from __future__ import annotations

import os
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from oci2disk import settings
from oci2disk.build.spec import BuildSpec
from oci2disk.compression import Compression
from oci2disk.convert.formats import Format
from oci2disk.convert.options import (
    BootSpec,
    DiskSpec,
    FstabMode,
    FsType,
    InitramfsSpec,
    IsoSpec,
    KernelSpec,
    SquashfsSpec,
    Table,
    TarSpec,
)
from oci2disk.errors import RecipeError
from oci2disk.settings import parse_size

__all__ = [
    "RECIPE_FILE",
    "ArchiveCompression",
    "BuildSpec",
    "Compression",
    "DiskSpec",
    "Format",
    "FsType",
    "FstabMode",
    "InitramfsSpec",
    "KernelSpec",
    "OutputSpec",
    "Recipe",
    "Table",
    "TarSpec",
    "load",
    "parse_size",
]

RECIPE_FILE = "recipe.toml"
ArchiveCompression = Compression  # the cgz and tar outputs' compressions are Compression's


@dataclass(frozen=True)
class OutputSpec:
    formats: tuple[Format, ...] = (Format.RAW,)
    name: str = "disk"
    compression: Compression = Compression.NONE  # qcow2 only
    keep_identity: bool = False  # the image's machine-id, SSH host keys and random seed


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
    squashfs: SquashfsSpec = field(default_factory=SquashfsSpec)
    iso: IsoSpec = field(default_factory=IsoSpec)
    boot: BootSpec = field(default_factory=BootSpec)


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
    values = read_values(file, data)
    try:
        return Recipe(
            path=recipe_dir,
            name=recipe_dir.name,
            build=_build(file, recipe_dir, values),
            disk=settings.disk_spec(values),
            outputs=OutputSpec(
                formats=settings.get(values, "outputs.formats"),
                name=settings.get(values, "outputs.name"),
                compression=settings.get(values, "outputs.compression"),
                keep_identity=settings.get(values, "outputs.keep_identity"),
            ),
            initramfs=settings.initramfs_spec(values),
            tar=settings.tar_spec(values),
            kernel=settings.kernel_spec(values),
            squashfs=settings.squashfs_spec(values),
            iso=settings.iso_spec(values),
            boot=settings.boot_spec(values),
        )
    except settings.Problem as exc:
        value = values.get(exc.key)
        raise RecipeError(f"{file}: {exc.key}: expected {exc.expected}, got {value!r}") from None


def read_values(file: Path, data: Mapping[str, Any]) -> dict[str, Any]:
    """Every key of the recipe parsed by its setting: {"disk.label": "root", ...}."""
    values: dict[str, Any] = {}
    for section in data:
        if section not in settings.SECTIONS:
            raise RecipeError(
                f"{file}: unknown key {section}",
                hint=f"tables allowed in recipe.toml: {', '.join(settings.SECTIONS)}",
            )
    for section in settings.SECTIONS:
        table = data.get(section, {})
        if not isinstance(table, Mapping):
            raise RecipeError(f"{file}: {section}: expected a table, got {table!r}")
        for name, raw in table.items():
            key = f"{section}.{name}"
            setting = settings.BY_KEY.get(key)
            if setting is None:
                known = ", ".join(settings.section_keys(section))
                raise RecipeError(
                    f"{file}: unknown key {key}", hint=f"keys allowed in [{section}]: {known}"
                )
            try:
                values[key] = setting.parse(raw)
            except settings.Invalid as exc:
                raise RecipeError(f"{file}: {key}: expected {exc.expected}, got {raw!r}") from None
    return values


def _build(file: Path, recipe_dir: Path, values: Mapping[str, Any]) -> BuildSpec:
    image: str | None = settings.get(values, "build.image")
    dockerfile_name: str | None = settings.get(values, "build.dockerfile")
    if image and dockerfile_name:
        raise RecipeError(f"{file}: build.image and build.dockerfile exclude each other")
    context = (recipe_dir / (settings.get(values, "build.context") or ".")).resolve()
    dockerfile = None
    if not image:
        dockerfile = (recipe_dir / (dockerfile_name or "Dockerfile")).resolve()
        inside = (recipe_dir.resolve(), context)
        if not any(dockerfile.is_relative_to(folder) for folder in inside):
            # The engine would read (and echo in its errors) any file of this machine.
            raise RecipeError(
                f"{file}: build.dockerfile: {dockerfile_name!r} leads out of the recipe's "
                "directory and its build context",
                hint="keep the Dockerfile in the recipe's directory or its build context",
            )
        if not dockerfile.is_file():
            if not dockerfile.exists():
                happened = "does not exist"
            elif dockerfile.is_dir():
                happened = "is a directory, not a file"
            else:
                happened = "is not a regular file"
            raise RecipeError(
                f"{file}: build.dockerfile: {dockerfile} {happened}",
                hint="add a Dockerfile beside recipe.toml or name one with build.dockerfile",
            )
        if not os.access(dockerfile, os.R_OK):
            raise RecipeError(
                f"{file}: build.dockerfile: {dockerfile} cannot be read (permission denied)"
            )
        if not context.is_dir():
            raise RecipeError(f"{file}: build.context: {context} is not a directory")
    return BuildSpec(
        dockerfile=dockerfile,
        context=context,
        image=image,
        target=settings.get(values, "build.target"),
        platform=settings.get(values, "build.platform"),
        network=settings.get(values, "build.network"),
        args=settings.get(values, "build.args"),
    )
