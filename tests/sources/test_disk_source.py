"""``disk:FILE[:PARTITION]``: disk images read back into the image they were made from."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from oci2disk.errors import ImageError, RefError
from oci2disk.oci.layout import OciImage, Platform
from oci2disk.sources.disk import image_from_disk, parse_disk_ref
from sourcekit import (
    MIB,
    canonical_tar,
    entries,
    make_disk,
    mkfs,
    nobody_python,
    rich_image,
    run_as_nobody,
)

LOST = ("lost+found",)


@pytest.fixture(scope="module")
def rich(tmp_path_factory: pytest.TempPathFactory) -> tuple[OciImage, Path]:
    """The rich image and its canonical tar."""
    work = tmp_path_factory.mktemp("rich")
    image = rich_image(work / "layout")
    tar = work / "rootfs.tar"
    canonical_tar(image, work / "flat", tar)
    return image, tar


@pytest.fixture(scope="module")
def raw_disk(rich: tuple[OciImage, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    disk = tmp_path_factory.mktemp("disk") / "disk.raw"
    make_disk(rich[1], disk)
    return disk


@pytest.mark.parametrize("fmt", ["raw", "qcow2", "vmdk", "vhdx", "vpc", "vdi"])
def test_round_trip_equals_the_image_entry_by_entry(
    fmt: str, rich: tuple[OciImage, Path], raw_disk: Path, tmp_path: Path
) -> None:
    image, _ = rich
    disk = raw_disk
    if fmt != "raw":
        disk = tmp_path / f"disk.{fmt}"
        subprocess.run(["qemu-img", "convert", "-O", fmt, str(raw_disk), str(disk)], check=True)
    back = image_from_disk(disk, tmp_path / "work")
    assert back.config.architecture == "amd64"  # guessed from /bin/sh's ELF header
    got = entries(back, tmp_path / "f1", ignore=LOST)
    want = entries(image, tmp_path / "f2")
    assert [e.path for e in got] == [e.path for e in want]
    for mine, theirs in zip(got, want, strict=True):
        assert mine == theirs
    by_path = {e.path: e for e in got}
    assert by_path["usr/bin/su-third"].link_group == "usr/bin/su"
    assert by_path["usr/bin/su-third"].mode == 0o4755
    assert by_path["dev/big"].devmajor == 259 and by_path["dev/big"].devminor == 70000
    assert dict(by_path["usr/bin/ping"].xattrs)["security.capability"]
    assert not (tmp_path / "work" / "disk" / "disk.raw").exists()  # the raw copy is gone


def test_round_trip_as_an_unprivileged_user(rich: tuple[OciImage, Path], tmp_path: Path) -> None:
    """uid 65534 reads a qcow2 it may only read, and gets every owner, mode and device."""
    base = Path("/tmp") / f"oci2disk-nobody-{tmp_path.name}"
    base.mkdir(mode=0o755)
    try:
        _, tar = rich
        raw = base / "disk.raw"
        make_disk(tar, raw, table="mbr")
        qcow2 = base / "disk.qcow2"
        subprocess.run(["qemu-img", "convert", "-O", "qcow2", str(raw), str(qcow2)], check=True)
        qcow2.chmod(0o444)
        out = base / "out"
        out.mkdir(mode=0o777)
        out.chmod(0o777)
        python, env = nobody_python(base / "py")
        code = (
            "from pathlib import Path\n"
            "from oci2disk.sources.disk import image_from_disk\n"
            "from oci2disk.rootfs.flatten import flatten\n"
            f"out = Path({str(out)!r})\n"
            f"image = image_from_disk(Path({str(qcow2)!r}), out / 'work')\n"
            "with flatten(image, out / 'flat') as rootfs, (out / 'back.tar').open('wb') as f:\n"
            "    rootfs.write_tar(f)\n"
        )
        done = run_as_nobody(python, env, code)
        assert done.returncode == 0, done.stderr
        assert (out / "back.tar").stat().st_uid == 65534
        # The tar made as nobody equals the image's own canonical tar, byte for byte,
        # once lost+found (made by mke2fs) is left out.
        import tarfile

        with tarfile.open(out / "back.tar") as got, tarfile.open(tar) as want:
            mine = [m for m in got if not m.name.startswith("lost+found")]
            theirs = list(want)
            assert [m.get_info() for m in mine] == [m.get_info() for m in theirs]
    finally:
        subprocess.run(["rm", "-rf", str(base)], check=False)


def test_the_partition_with_os_release_is_chosen(
    rich: tuple[OciImage, Path], tmp_path: Path
) -> None:
    _, tar = rich
    other = tmp_path / "other.tar"
    subprocess.run(["tar", "-cf", str(other), "-T", "/dev/null"], check=True)
    disk = tmp_path / "disk.raw"
    make_disk(tar, disk, parts=3, root=2)
    mkfs(other, disk, offset=1 * MIB, size=32 * MIB)  # an ext4 without os-release first
    image = image_from_disk(disk, tmp_path / "work")
    assert any(e.path == "etc/os-release" for e in entries(image, tmp_path / "f"))
    with pytest.raises(ImageError, match="cannot tell the architecture"):
        image_from_disk(disk, tmp_path / "work1", partition=1)  # no ELF program in it
    amd64 = Platform("linux", "amd64")
    chosen = image_from_disk(disk, tmp_path / "work2", partition=1, platform=amd64)
    # an empty partition: its empty lost+found is the filesystem's own, not content
    assert [e.path for e in entries(chosen, tmp_path / "f2")] == ["."]


def test_platform_given_wins(raw_disk: Path, tmp_path: Path) -> None:
    image = image_from_disk(raw_disk, tmp_path / "w", platform=Platform("linux", "arm64", "v8"))
    assert (image.config.architecture, image.config.variant) == ("arm64", "v8")


def test_disk_ref_syntax(tmp_path: Path) -> None:
    assert parse_disk_ref("cloud.qcow2") == (Path("cloud.qcow2"), None)
    assert parse_disk_ref("cloud.qcow2:2") == (Path("cloud.qcow2"), 2)
    odd = tmp_path / "name:3"
    odd.touch()
    assert parse_disk_ref(str(odd)) == (odd, None)
    with pytest.raises(RefError):
        parse_disk_ref("disk.raw:0")


# ------------------------------------------------------------------ bad input


def test_a_disk_with_no_ext_filesystem_names_what_it_found(tmp_path: Path) -> None:
    disk = tmp_path / "lvm.raw"
    with disk.open("wb") as f:
        f.truncate(8 * MIB)
    subprocess.run(
        ["sfdisk", "-q", str(disk)], input="label: gpt\nstart=2048, type=L\n", text=True, check=True
    )
    with disk.open("r+b") as f:  # an LVM2 PV label in sector 1 of partition 1
        f.seek(MIB + 512)
        f.write(b"LABELONE" + bytes(16) + b"LVM2 001")
    with pytest.raises(ImageError) as caught:
        image_from_disk(disk, tmp_path / "work")
    text = str(caught.value)
    assert "1: an LVM2 physical volume" in text and "ext2/3/4 only" in text
    assert "virt-tar-out" in text
    assert not (tmp_path / "work" / "rootfs").exists()


def test_a_partition_that_does_not_exist(raw_disk: Path, tmp_path: Path) -> None:
    with pytest.raises(ImageError, match=r"no partition 7; the disk's GPT has partition\(s\) 1"):
        image_from_disk(raw_disk, tmp_path / "work", partition=7)
    assert not (tmp_path / "work" / "rootfs").exists()


def test_a_truncated_qcow2_is_refused_before_anything_is_written(
    raw_disk: Path, tmp_path: Path
) -> None:
    qcow2 = tmp_path / "disk.qcow2"
    subprocess.run(["qemu-img", "convert", "-O", "qcow2", str(raw_disk), str(qcow2)], check=True)
    info = json.loads(
        subprocess.run(
            ["qemu-img", "info", "--output=json", str(qcow2)], capture_output=True, check=True
        ).stdout
    )
    assert info["format"] == "qcow2"
    cut = tmp_path / "cut.qcow2"
    cut.write_bytes(qcow2.read_bytes()[: qcow2.stat().st_size * 2 // 3])
    with pytest.raises(ImageError, match="damaged or truncated"):
        image_from_disk(cut, tmp_path / "work")
    assert not (tmp_path / "work" / "rootfs").exists()
    assert not (tmp_path / "work" / "disk" / "disk.raw").exists()


def test_a_bare_xfs_like_file_and_an_empty_file(tmp_path: Path) -> None:
    xfs = tmp_path / "xfs.img"
    xfs.write_bytes(b"XFSB" + bytes(1 << 16))
    with pytest.raises(ImageError, match="holds an xfs filesystem"):
        image_from_disk(xfs, tmp_path / "w")
    empty = tmp_path / "empty.img"
    empty.touch()
    with pytest.raises(ImageError, match="empty"):
        image_from_disk(empty, tmp_path / "w2")


def test_a_truncated_raw_disk_is_refused_before_anything_is_written(
    raw_disk: Path, tmp_path: Path
) -> None:
    cut = tmp_path / "cut.raw"
    cut.write_bytes(raw_disk.read_bytes()[: 20 * MIB])
    with pytest.raises(ImageError, match="the file is truncated"):
        image_from_disk(cut, tmp_path / "work")
    assert not (tmp_path / "work" / "rootfs").exists()
