"""`oci2disk verify` does not say "equal" over a tampered artifact, and tells
"different" (exit 1) from "could not verify" (exit 3)."""

from __future__ import annotations

import gzip
import json
import os
import subprocess
from pathlib import Path

import pytest

from clikit import oci2disk
from layerkit import TAG, directory, file, make_image, symlink

MEMBERS = [
    directory("etc"),
    file("etc/hostname", b"vm\n"),
    file("sbin/init", b"#!/bin/sh\n", mode=0o755),
    symlink("bin", "sbin"),
]


@pytest.fixture
def source(tmp_path: Path) -> str:
    make_image(tmp_path / "layout", [MEMBERS])
    return f"oci:{tmp_path / 'layout'}:{TAG}"


def made(source: str, out: Path, *args: str) -> Path:
    result = oci2disk("-q", "convert", source, "-o", str(out), *args)
    assert result.code == 0, result.stderr
    return out


def verify(artifact: Path, source: str, *args: str) -> tuple[int, str]:
    result = oci2disk("verify", str(artifact), "--against", source, *args)
    return result.code, result.stdout + result.stderr


def debugfs(image: Path, *requests: str) -> None:
    for request in requests:
        subprocess.run(
            ["debugfs", "-w", "-R", request, str(image)], check=True, capture_output=True
        )


@pytest.fixture
def fs(source: str, tmp_path: Path) -> Path:
    image = made(source, tmp_path / "root.img", "-f", "fs")
    code, text = verify(image, source)
    assert code == 0 and ": equal (" in text, text
    return image


def test_a_file_hidden_in_lost_found_is_found(fs: Path, source: str, tmp_path: Path) -> None:
    (tmp_path / "payload").write_bytes(b"hidden\n")
    debugfs(fs, f"write {tmp_path / 'payload'} lost+found/payload")
    code, text = verify(fs, source)
    assert code == 1 and "/lost+found/payload" in text and "extra" in text


def test_a_rewritten_fstab_is_compared_not_skipped(fs: Path, source: str, tmp_path: Path) -> None:
    (tmp_path / "fstab").write_bytes(b"/dev/sdb1 / ext4 defaults 0 1\n")
    debugfs(fs, "rm etc/fstab", f"write {tmp_path / 'fstab'} etc/fstab")
    code, text = verify(fs, source)
    assert code == 1 and "/etc/fstab" in text


def test_immutable_and_append_only_inodes_are_found(fs: Path, source: str) -> None:
    debugfs(fs, "set_inode_field etc/hostname flags 0x80010", "set_inode_field sbin flags 0x80020")
    code, text = verify(fs, source)
    assert code == 1 and "immutable" in text and "append-only" in text


def test_a_changed_label_or_uuid_is_found(fs: Path, source: str) -> None:
    subprocess.run(["tune2fs", "-L", "other", str(fs)], check=True, capture_output=True)
    code, text = verify(fs, source)
    assert code == 1 and "fs-label" in text
    subprocess.run(["tune2fs", "-L", "rootfs", str(fs)], check=True, capture_output=True)
    assert verify(fs, source)[0] == 0
    subprocess.run(
        ["tune2fs", "-U", "0f0f0f0f-0000-4000-8000-000000000000", str(fs)],
        check=True,
        capture_output=True,
    )
    code, text = verify(fs, source)
    assert code == 1 and "fs-uuid" in text


def test_editing_the_manifest_hides_nothing(fs: Path, source: str, tmp_path: Path) -> None:
    manifest = tmp_path / "root.img.manifest.json"
    data = json.loads(manifest.read_text())
    data["generated"] = ["etc", "sbin"]
    manifest.write_text(json.dumps(data))
    (tmp_path / "evil").write_bytes(b"#!/bin/sh\nevil\n")
    debugfs(fs, "rm sbin/init", f"write {tmp_path / 'evil'} sbin/init")
    code, text = verify(fs, source)
    assert code == 1 and "/sbin/init" in text


def test_an_archive_appended_to_a_cgz_is_found(source: str, tmp_path: Path) -> None:
    cgz = made(source, tmp_path / "root.cgz", "-f", "cgz", "--init", "/sbin/init")
    assert verify(cgz, source, "--init", "/sbin/init")[0] == 0
    second = (
        subprocess.run(
            ["cpio", "-o", "-H", "newc", "--quiet"],
            input=b"etc/hostname\n",
            cwd=tmp_path / "layout",  # any file will do: the kernel unpacks it over the first
            capture_output=True,
            check=False,
        ).stdout
        or b"070701" + b"0" * 104
    )
    original = cgz.read_bytes()
    for appended in (gzip.compress(second), second):
        cgz.write_bytes(original + appended)
        code, text = verify(cgz, source, "--init", "/sbin/init")
        assert code == 1 and "trailing" in text, text


def test_a_cgz_whose_init_points_elsewhere_is_found(source: str, tmp_path: Path) -> None:
    cgz = made(source, tmp_path / "root.cgz", "-f", "cgz", "--init", "/sbin/init")
    code, text = verify(cgz, source, "--init", "/bin/init")
    assert code == 1 and "linkname  /init" in text, text
    code, text = verify(cgz, source)  # /init made by oci2disk, but from what: not known
    assert code == 3 and "could not verify" in text


def test_could_not_verify_is_not_different(source: str, tmp_path: Path) -> None:
    code, text = verify(tmp_path / "missing.img", source)
    assert code == 3 and "no such file" in text
    (tmp_path / "junk.img").write_bytes(b"\0" * 4096)
    code, _ = verify(tmp_path / "junk.img", source)
    assert code == 3


@pytest.mark.parametrize(("fmt", "size"), [("fs", 1024), ("raw", 440)])
def test_code_in_the_boot_sector_is_found(source: str, tmp_path: Path, fmt: str, size: int) -> None:
    disk = made(source, tmp_path / f"disk.{fmt}", "-f", fmt)
    assert verify(disk, source)[0] == 0
    with disk.open("r+b") as f:
        f.write(b"\xeb\x63\x90" + b"\x90" * (size - 3))  # a jump and a sled: code
    code, text = verify(disk, source)
    assert code == 1 and "boot-sector" in text, text


def test_a_path_longer_than_the_system_takes_is_could_not_verify(
    source: str, tmp_path: Path
) -> None:
    root = made(source, tmp_path / "root", "-f", "dir")
    fd = os.open(root, os.O_RDONLY)
    for _ in range(25):  # 25 x 201 bytes: past PATH_MAX (4096)
        os.mkdir("d" * 200, dir_fd=fd)
        deeper = os.open("d" * 200, os.O_RDONLY, dir_fd=fd)
        os.close(fd)
        fd = deeper
    os.close(fd)
    code, text = verify(root, source)
    assert code == 3 and "could not verify" in text and "Traceback" not in text
    assert "4096" in text and len(text) < 4000
