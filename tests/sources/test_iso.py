"""``iso:FILE``: live ISOs made here (Debian-live and Fedora-like layouts) read back."""

from __future__ import annotations

import io
import subprocess
import tarfile
from pathlib import Path

import pytest

from oci2disk.errors import ImageError
from oci2disk.oci.layout import OciImage, Platform
from oci2disk.rootfs.flatten import flatten
from oci2disk.sources.iso import image_from_iso
from sourcekit import MIB, canonical_tar, entries, mkfs, rich_image


def make_iso(tree: Path, iso: Path) -> None:
    subprocess.run(
        ["xorriso", "-as", "mkisofs", "-R", "-J", "-V", "TESTLIVE", "-o", str(iso), str(tree)],
        check=True,
        capture_output=True,
    )


def squashfs_from_tar(tar: Path, out: Path) -> None:
    with tar.open("rb") as stream:
        subprocess.run(["tar2sqfs", "-q", "-f", str(out)], stdin=stream, check=True)


@pytest.fixture(scope="module")
def rich(tmp_path_factory: pytest.TempPathFactory) -> tuple[OciImage, Path]:
    work = tmp_path_factory.mktemp("rich")
    image = rich_image(work / "layout")
    tar = work / "rootfs.tar"
    canonical_tar(image, work / "flat", tar)
    return image, tar


def test_debian_live_iso_equals_its_squashfs(rich: tuple[OciImage, Path], tmp_path: Path) -> None:
    _, tar = rich
    tree = tmp_path / "tree"
    (tree / "live").mkdir(parents=True)
    (tree / "isolinux").mkdir()
    (tree / "isolinux" / "isolinux.cfg").write_text("default live\n")
    squashfs_from_tar(tar, tree / "live" / "filesystem.squashfs")
    iso = tmp_path / "live.iso"
    make_iso(tree, iso)
    image = image_from_iso(iso, tmp_path / "work")
    assert image.config.architecture == "amd64"
    # The squashfs's own content, as sqfs2tar gives it, is the reference.
    ref = tmp_path / "ref.tar"
    with ref.open("wb") as sink:
        subprocess.run(
            ["sqfs2tar", "-r", ".", str(tree / "live" / "filesystem.squashfs")],
            stdout=sink,
            check=True,
        )
    from oci2disk.oci.layout import layout_from_rootfs_tar

    want = entries(layout_from_rootfs_tar(ref, tmp_path / "ref", None), tmp_path / "f1")
    got = entries(image, tmp_path / "f2")
    assert got == want
    assert entries(rich[0], tmp_path / "f3") == got  # and so the image it was made from
    assert not (tmp_path / "work" / "iso").exists()  # the extracted squashfs is gone


def test_fedora_like_iso_reads_the_ext4_inside_the_squashfs(
    rich: tuple[OciImage, Path], tmp_path: Path
) -> None:
    image, tar = rich
    rootfs_img = tmp_path / "rootfs.img"
    with rootfs_img.open("wb") as f:
        f.truncate(32 * MIB)
    mkfs(tar, rootfs_img, offset=0, size=32 * MIB)
    inner = tmp_path / "inner.tar"
    with tarfile.open(inner, "w", format=tarfile.PAX_FORMAT) as out:
        out.add(rootfs_img, "LiveOS/rootfs.img")
    tree = tmp_path / "tree"
    (tree / "LiveOS").mkdir(parents=True)
    squashfs_from_tar(inner, tree / "LiveOS" / "squashfs.img")
    iso = tmp_path / "fedora.iso"
    make_iso(tree, iso)
    back = image_from_iso(iso, tmp_path / "work", platform=Platform("linux", "amd64"))
    got = [e for e in entries(back, tmp_path / "f1") if not e.path.startswith("lost+found")]
    assert got == entries(image, tmp_path / "f2")


def test_an_installer_iso_says_what_to_do(tmp_path: Path) -> None:
    tree = tmp_path / "tree"
    (tree / "images").mkdir(parents=True)
    (tree / "images" / "install.img").write_bytes(b"x" * 4096)
    (tree / ".treeinfo").write_text("[general]\n")
    iso = tmp_path / "installer.iso"
    make_iso(tree, iso)
    with pytest.raises(ImageError) as caught:
        image_from_iso(iso, tmp_path / "work")
    text = str(caught.value)
    assert "an installer ISO" in text and "/images/install.img" in text
    assert "install it once in a VM" in text and "disk:FILE" in text
    assert not (tmp_path / "work").exists()


def test_a_file_that_is_not_an_iso(tmp_path: Path) -> None:
    bogus = tmp_path / "bogus.iso"
    bogus.write_bytes(b"\0" * 100_000)
    with pytest.raises(ImageError, match="not an ISO 9660 image"):
        image_from_iso(bogus, tmp_path / "work")


def test_flatten_of_the_iso_source_is_an_image_like_any_other(
    rich: tuple[OciImage, Path], tmp_path: Path
) -> None:
    _, tar = rich
    tree = tmp_path / "tree"
    (tree / "casper").mkdir(parents=True)
    squashfs_from_tar(tar, tree / "casper" / "filesystem.squashfs")
    iso = tmp_path / "ubuntu.iso"
    make_iso(tree, iso)
    image = image_from_iso(iso, tmp_path / "work")
    with flatten(image, tmp_path / "flat") as rootfs:
        entry = rootfs.lookup("usr/bin/su")
        assert entry is not None and entry.mode == 0o4755


def test_the_architecture_comes_from_the_squashfs_programs(tmp_path: Path) -> None:
    """An arm64 live root read on an amd64 host is an arm64 image (the ELF header)."""
    elf_arm64 = b"\x7fELF\x02\x01\x01" + bytes(9) + b"\x02\x00\xb7\x00" + bytes(44)
    tar = tmp_path / "arm64.tar"
    with tarfile.open(tar, "w", format=tarfile.PAX_FORMAT) as out:
        for name in ("usr", "usr/bin"):
            info = tarfile.TarInfo(name)
            info.type, info.mode = tarfile.DIRTYPE, 0o755
            out.addfile(info)
        info = tarfile.TarInfo("usr/bin/dash")
        info.size, info.mode = len(elf_arm64), 0o755
        out.addfile(info, io.BytesIO(elf_arm64))
        for link, target in (("bin", "usr/bin"), ("usr/bin/sh", "dash")):
            info = tarfile.TarInfo(link)
            info.type, info.linkname = tarfile.SYMTYPE, target
            out.addfile(info)
    tree = tmp_path / "tree"
    (tree / "live").mkdir(parents=True)
    squashfs_from_tar(tar, tree / "live" / "filesystem.squashfs")
    iso = tmp_path / "arm64.iso"
    make_iso(tree, iso)
    image = image_from_iso(iso, tmp_path / "work")
    assert (image.config.architecture, image.config.variant) == ("arm64", "v8")
    with flatten(image, tmp_path / "flat") as rootfs:
        assert rootfs.lookup("usr/bin/dash") is not None
