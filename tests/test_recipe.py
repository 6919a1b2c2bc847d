"""recipe.toml parsing: typed values out, every mistake named with file, key and expectation."""

from __future__ import annotations

from pathlib import Path

import pytest

from oci2disk.convert.options import Firmware
from oci2disk.errors import RecipeError
from oci2disk.recipe import Compression, Format, FstabMode, FsType, Table, load, parse_size

ROOT = Path(__file__).resolve().parent.parent


def write_recipe(tmp_path: Path, toml: str, dockerfile: bool = True) -> Path:
    (tmp_path / "recipe.toml").write_text(toml)
    if dockerfile:
        (tmp_path / "Dockerfile").write_text("FROM scratch\n")
    return tmp_path


def test_shipped_debian_qemu_recipe_parses() -> None:
    rcp = load(ROOT / "recipes" / "debian-qemu")
    assert rcp.name == "debian-qemu"
    assert rcp.build.dockerfile == ROOT / "recipes" / "debian-qemu" / "Dockerfile"
    # GPT: one disk for BIOS and UEFI, as Debian's cloud images
    assert rcp.disk.table is Table.GPT and rcp.disk.fs is FsType.EXT4
    assert rcp.boot.firmware == (Firmware.BIOS, Firmware.UEFI)
    assert rcp.disk.size is None  # auto
    assert rcp.outputs.formats == (Format.RAW, Format.QCOW2)


def test_full_recipe_gives_typed_values(tmp_path: Path) -> None:
    rcp = load(
        write_recipe(
            tmp_path,
            """
[build]
dockerfile = "Dockerfile"
target = "final"
network = "none"
args = { GEM5_REF = "v24.0", JOBS = 4 }

[disk]
table = "gpt"
fs = "ext3"
size = "1.5G"
label = "gem5root"
uuid = "0B5C3F0E-7C1D-4B5E-9A6F-2D8E4F1A3B7C"
fstab = "label"

[outputs]
formats = ["raw", "vhd", "qcow2", "raw"]
name = "gem5"
compression = "zstd"
""",
        )
    )
    assert rcp.build.target == "final" and rcp.build.network == "none"
    assert rcp.build.args == {"GEM5_REF": "v24.0", "JOBS": "4"}
    assert rcp.disk.table is Table.GPT and rcp.disk.fs is FsType.EXT3
    assert rcp.disk.size == int(1.5 * (1 << 30))
    assert rcp.disk.uuid == "0b5c3f0e-7c1d-4b5e-9a6f-2d8e4f1a3b7c"
    assert rcp.disk.fstab is FstabMode.LABEL
    # vhd is another name for vpc; duplicates collapse, order is kept
    assert rcp.outputs.formats == (Format.RAW, Format.VPC, Format.QCOW2)
    assert rcp.outputs.compression is Compression.ZSTD


@pytest.mark.parametrize(
    ("toml", "message"),
    [
        ("[disk]\nsise = '4G'\n", "unknown key disk.sise"),
        ("[bulid]\n", "unknown key bulid"),
        ("[disk]\nsize = 12\n", 'disk.size: expected a size like "4G" or "auto", got 12'),
        ("[disk]\nsize = 'big'\n", "disk.size: expected a size"),
        ("[disk]\ntable = 'apm'\n", "disk.table: expected one of 'mbr' | 'gpt' | 'none'"),
        ("[disk]\nlabel = 'a-label-longer-than-16'\n", "disk.label: expected at most 16 bytes"),
        ("[disk]\nuuid = 'nope'\n", "disk.uuid: expected a UUID"),
        ("[outputs]\nformats = 'raw'\n", "outputs.formats: expected a list of strings"),
        ("[outputs]\nformats = ['floppy']\n", "unknown output format 'floppy'"),
        ("[build]\nargs = ['A=1']\n", "build.args: expected a table"),
        ("disk = 3\n", "disk: expected a table"),
        ("[build\n", "not valid TOML"),
    ],
)
def test_mistakes_name_file_key_and_expectation(tmp_path: Path, toml: str, message: str) -> None:
    write_recipe(tmp_path, toml)
    with pytest.raises(RecipeError) as info:
        load(tmp_path)
    assert message in str(info.value)
    assert str(tmp_path / "recipe.toml") in str(info.value)


def test_missing_dockerfile_is_named(tmp_path: Path) -> None:
    write_recipe(tmp_path, "[build]\ndockerfile = 'Containerfile'\n", dockerfile=False)
    with pytest.raises(RecipeError) as info:
        load(tmp_path)
    assert "build.dockerfile" in str(info.value)
    assert "Containerfile does not exist" in str(info.value)


def test_missing_recipe_file(tmp_path: Path) -> None:
    with pytest.raises(RecipeError, match=r"recipe\.toml: missing"):
        load(tmp_path)


def test_image_recipe_needs_no_dockerfile(tmp_path: Path) -> None:
    rcp = load(write_recipe(tmp_path, "[build]\nimage = 'oci:/x:y'\n", dockerfile=False))
    assert rcp.build.image == "oci:/x:y" and rcp.build.dockerfile is None


@pytest.mark.parametrize(
    ("text", "value"),
    [("auto", None), ("4G", 4 << 30), ("512M", 512 << 20), ("512MiB", 512 << 20), ("100", 100)],
)
def test_parse_size(text: str, value: int | None) -> None:
    assert parse_size(text) == value
