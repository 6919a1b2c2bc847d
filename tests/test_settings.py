"""The settings table: one parser and one check per setting, for recipe.toml and the CLI."""

from __future__ import annotations

from pathlib import Path

import pytest

from clikit import oci2disk
from oci2disk import settings
from oci2disk.convert import Format
from oci2disk.errors import RecipeError, UsageError
from oci2disk.recipe import load


def write_recipe(path: Path, toml: str) -> Path:
    (path / "recipe.toml").write_text(toml)
    (path / "Dockerfile").write_text("FROM scratch\n")
    return path


def test_every_setting_is_a_recipe_key_with_a_working_default() -> None:
    for setting in settings.SETTINGS:
        assert setting.section in settings.SECTIONS and setting.name
        assert setting.help
        assert setting.value(None) == setting.default
    flags = [s.flag for s in settings.SETTINGS if s.flag]
    # one flag per setting, except --level, which names the level of the one output
    assert sorted(set(flags)) == sorted({*flags}) and flags.count("--level") == 2


@pytest.mark.parametrize(
    ("key", "toml", "flag", "value", "expected"),
    [
        ("disk.label", "label = 'a-label-longer-than-16'", "--label", "a-label-longer-than-16",
         "at most 16 bytes"),
        ("disk.uuid", "uuid = 'nope'", "--uuid", "nope", "a UUID like"),
        ("disk.size", "size = 'big'", "--size", "big", 'a size like "4G" or "auto"'),
        ("initramfs.init", "init = 'sbin/init'", "--init", "sbin/init",
         "the absolute path of the image's init"),
        ("kernel.version", "version = 'a/b'", "--kernel-version", "a/b",
         'a kernel version like "6.1.0-18-amd64"'),
    ],
)  # fmt: skip
def test_recipe_and_command_line_refuse_alike(
    tmp_path: Path, key: str, toml: str, flag: str, value: str, expected: str
) -> None:
    section = key.partition(".")[0]
    with pytest.raises(RecipeError) as from_recipe:
        load(write_recipe(tmp_path, f"[{section}]\n{toml}\n"))
    assert f"{key}: expected {expected}" in str(from_recipe.value)
    result = oci2disk("convert", "oci:/nonexistent:x", "-f", "raw", "-o", "x.raw", flag, value)
    assert result.code == 2, result.stderr
    assert f"error: {flag} {value!r}: expected {expected}" in result.stderr


def test_a_label_mke2fs_would_cut_is_refused_on_the_command_line(tmp_path: Path) -> None:
    """mke2fs truncates a label to 16 bytes while fstab would keep LABEL=<all of it>."""
    result = oci2disk(
        "convert", "oci:/nonexistent:x", "-f", "fs", "-o", str(tmp_path / "x.ext4"),
        "--label", "seventeen-bytes-x", "--fstab", "label",
    )  # fmt: skip
    assert result.code == 2
    assert "--label 'seventeen-bytes-x': expected at most 16 bytes" in result.stderr
    assert list(tmp_path.iterdir()) == []


def test_checks_of_two_settings_are_shared(tmp_path: Path) -> None:
    with pytest.raises(RecipeError, match=r"disk\.root_partition: expected a mbr partition"):
        load(write_recipe(tmp_path, "[disk]\nroot_partition = 5\n"))
    result = oci2disk(
        "convert", "oci:/nonexistent:x", "-f", "raw", "-o", "x.raw", "--root-partition", "5"
    )
    assert result.code == 2 and "--root-partition: expected a mbr partition" in result.stderr
    result = oci2disk("convert", "oci:/nonexistent:x", "-f", "tar", "-o", "x", "--level", "30")
    assert result.code == 2 and "--level: expected no level when compression is 'none'" in (
        result.stderr
    )
    result = oci2disk(
        "convert", "oci:/x:y", "-f", "cgz", "-o", "x", "--level", "12", "--init", "/sbin/init"
    )
    assert result.code == 2 and "--level: expected a gzip level from 1 to 9" in result.stderr


def test_source_date_epoch_is_checked_up_front() -> None:
    assert settings.source_date_epoch({"SOURCE_DATE_EPOCH": "1700000000"}) == 1700000000
    assert settings.source_date_epoch({}) is None
    with pytest.raises(UsageError, match="not a whole number of seconds"):
        settings.source_date_epoch({"SOURCE_DATE_EPOCH": "yesterday"})
    result = oci2disk(
        "convert", "oci:/nonexistent:x", "-f", "raw", "-o", "x.raw",
        env={"SOURCE_DATE_EPOCH": "yesterday"},
    )  # fmt: skip
    assert result.code == 2 and "SOURCE_DATE_EPOCH='yesterday'" in result.stderr


def test_formats_parse_with_their_other_names_and_collapse() -> None:
    parse = settings.BY_KEY["outputs.formats"].parse
    assert parse(["raw", "VHD", "qcow2", "raw"]) == (Format.RAW, Format.VPC, Format.QCOW2)
    with pytest.raises(settings.Invalid, match="unknown output format 'floppy'"):
        parse(["floppy"])
