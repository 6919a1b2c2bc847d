"""/etc/fstab names the ext filesystem oci2disk made: disks carry it, archives only when asked."""

from __future__ import annotations

import tarfile
from dataclasses import replace
from pathlib import Path

from clikit import oci2disk
from layerkit import directory, file, make_image
from oci2disk.convert import ConvertOptions, ConvertResult, Format, convert
from oci2disk.convert.options import FstabMode
from oci2disk.oci.layout import OciImage
from oci2disk.recipe import load
from oci2disk.rootfs.flatten import flatten
from oci2disk.workspace import Workspace


def image(tmp_path: Path) -> OciImage:
    return make_image(tmp_path / "layout", [[directory("etc"), file("etc/hostname", b"box\n")]])


def to_tar(img: OciImage, out: Path, options: ConvertOptions) -> ConvertResult:
    with Workspace() as ws, flatten(img, ws.subdir("flat")) as rootfs:
        return convert(img, rootfs, {Format.TAR: out}, options, ws)


def names(tar: Path) -> list[str]:
    with tarfile.open(tar) as t:
        return [m.name.removeprefix("./") for m in t]


def test_a_tar_carries_no_fstab_unless_asked(tmp_path: Path) -> None:
    img = image(tmp_path)
    plain = to_tar(img, tmp_path / "plain.tar", ConvertOptions())
    assert "etc/fstab" not in names(tmp_path / "plain.tar")
    assert "etc/fstab" not in plain.generated
    asked = ConvertOptions()
    asked = replace(asked, disk=replace(asked.disk, fstab_all_outputs=True))
    result = to_tar(img, tmp_path / "asked.tar", asked)
    assert "etc/fstab" in names(tmp_path / "asked.tar") and "etc/fstab" in result.generated


def test_giving_fstab_is_asking(tmp_path: Path) -> None:
    image(tmp_path)
    source = f"oci:{tmp_path / 'layout'}:test"
    result = oci2disk("convert", source, "-f", "tar", "-o", str(tmp_path / "a.tar"))
    assert result.code == 0, result.stderr
    assert "etc/fstab" not in names(tmp_path / "a.tar")
    result = oci2disk(
        "convert", source, "-f", "tar", "-o", str(tmp_path / "b.tar"), "--fstab", "label"
    )
    assert result.code == 0, result.stderr
    assert "etc/fstab" in names(tmp_path / "b.tar")
    recipe = tmp_path / "recipe"
    recipe.mkdir()
    (recipe / "Dockerfile").write_text("FROM scratch\n")
    (recipe / "recipe.toml").write_text("[disk]\nfstab = 'label'\n")
    assert load(recipe).disk.fstab_all_outputs and load(recipe).disk.fstab is FstabMode.LABEL
    (recipe / "recipe.toml").write_text("")
    assert not load(recipe).disk.fstab_all_outputs
