"""A full output filesystem is named as such, with what it has and what was needed, not
reported as a --size too small or a failed mke2fs. Needs root (it mounts a small tmpfs)."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from clikit import oci2disk
from layerkit import TAG, file, make_image


@pytest.fixture
def small_fs(tmp_path: Path) -> Iterator[Path]:
    mount = tmp_path / "small"
    mount.mkdir()
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(mount)], capture_output=True
    )
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
    yield mount
    subprocess.run(["umount", str(mount)], check=True)


@pytest.mark.skipif(os.geteuid() != 0, reason="mounting a tmpfs needs root")
def test_a_full_output_filesystem_is_named(small_fs: Path, tmp_path: Path) -> None:
    make_image(tmp_path / "layout", [[file("srv/data", os.urandom(20 << 20))]])
    result = oci2disk(
        "-q", "convert", f"oci:{tmp_path / 'layout'}:{TAG}", "-f", "raw",
        "-o", str(small_fs / "disk.raw"),
    )  # fmt: skip
    assert result.code == 1
    assert f"the filesystem that holds {small_fs} is full" in result.stderr, result.stderr
    assert "needs about" in result.stderr and "too small" not in result.stderr
    assert list(small_fs.iterdir()) == []


@pytest.mark.skipif(os.geteuid() != 0, reason="mounting a tmpfs needs root")
def test_a_full_temporary_filesystem_is_not_a_bad_archive(small_fs: Path, tmp_path: Path) -> None:
    make_image(tmp_path / "layout", [[file("srv/data", os.urandom(20 << 20))]])
    archive = tmp_path / "image.tar"
    subprocess.run(["tar", "-C", str(tmp_path / "layout"), "-cf", str(archive), "."], check=True)
    result = oci2disk(
        "-q", "convert", f"oci-archive:{archive}", "-f", "tar", "-o", str(tmp_path / "r.tar"),
        env={"OCI2DISK_TMPDIR": str(small_fs)},
    )  # fmt: skip
    assert result.code == 1
    assert "a filesystem is full" in result.stderr and str(small_fs) in result.stderr
    assert f"the source {archive} is 20 MiB" in result.stderr  # how much was needed
    assert "not a readable" not in result.stderr and "Traceback" not in result.stderr
