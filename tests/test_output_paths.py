"""Outputs never destroy what was there: a non-empty directory, a device, a directory
where a file goes; and the leftovers of a killed run are found and removed."""

from __future__ import annotations

import os
import stat
import subprocess
from pathlib import Path

import pytest

from clikit import OCI2DISK, oci2disk
from layerkit import TAG, directory, file, make_image

MEMBERS = [directory("etc"), file("etc/hostname", b"vm\n"), file("bin/sh", b"sh", mode=0o755)]


@pytest.fixture
def source(tmp_path: Path) -> str:
    make_image(tmp_path / "layout", [MEMBERS])
    return f"oci:{tmp_path / 'layout'}:{TAG}"


def test_dir_output_refuses_a_non_empty_directory_it_did_not_make(
    source: str, tmp_path: Path
) -> None:
    work = tmp_path / "checkout"
    (work / ".git").mkdir(parents=True)
    (work / "notes.txt").write_text("mine\n")
    for extra in ([], ["--force"]):
        result = oci2disk("convert", source, "-f", "dir", "-o", str(work), *extra)
        assert result.code == 1, result.stderr
        assert "not empty" in result.stderr or "did not make" in result.stderr
        assert (work / "notes.txt").read_text() == "mine\n"
        assert (work / ".git").is_dir()
    # "-o ." from inside the directory is the same directory.
    here = subprocess.run(
        [*OCI2DISK, "convert", source, "-f", "dir", "-o", "."],
        cwd=work,
        capture_output=True,
        text=True,
        check=False,
    )
    assert here.returncode == 1 and (work / ".git").is_dir(), here.stderr


def test_force_replaces_only_a_directory_oci2disk_made(source: str, tmp_path: Path) -> None:
    target = tmp_path / "nfsroot"
    assert oci2disk("convert", source, "-f", "dir", "-o", str(target)).code == 0
    again = oci2disk("convert", source, "-f", "dir", "-o", str(target))
    assert again.code == 1 and "--force" in again.stderr
    forced = oci2disk("convert", source, "-f", "dir", "-o", str(target), "--force")
    assert forced.code == 0, forced.stderr
    assert (target / "etc/hostname").read_bytes() == b"vm\n"


def test_a_device_or_a_directory_is_never_replaced_by_a_file(source: str, tmp_path: Path) -> None:
    node = tmp_path / "sdb"
    if os.geteuid() == 0:
        os.mknod(node, 0o600 | stat.S_IFBLK, os.makedev(7, 200))  # "-o /dev/sdb" as root
    else:
        os.mkfifo(node)
    kind = node.lstat().st_mode
    result = oci2disk("convert", source, "-f", "tar", "-o", str(node))
    assert result.code == 1 and "not a regular file" in result.stderr, result.stderr
    assert node.lstat().st_mode == kind
    folder = tmp_path / "folder"
    folder.mkdir()
    link = tmp_path / "link"
    link.symlink_to(folder)
    for target, says in ((folder, "is a directory"), (link, "symlink to a directory")):
        result = oci2disk("convert", source, "-f", "tar", "-o", str(target))
        assert result.code == 1 and says in result.stderr, result.stderr
        assert "Traceback" not in result.stderr
    assert folder.is_dir() and link.is_symlink()


def test_leftovers_of_a_killed_run_are_removed_by_the_next(source: str, tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    dead = subprocess.Popen(["true"])
    dead.wait()  # a process id that no longer exists
    part = out / f".disk.tar.{dead.pid}.k1ll3d.part"
    part.write_bytes(b"half a tar")
    old_dir = out / f".rootfs.{dead.pid}.k1ll3d.part"
    (old_dir / "etc").mkdir(parents=True)
    workspaces = tmp_path / "tmp"
    (workspaces / f"oci2disk-{dead.pid}-k1ll3d" / "flatten").mkdir(parents=True)
    live = out / f".disk.tar.{os.getpid()}.running.part"  # a run still going: kept
    live.write_bytes(b"")
    result = oci2disk(
        "convert", source, "-f", "tar", "-o", str(out / "disk.tar"),
        env={"OCI2DISK_TMPDIR": str(workspaces)},
    )  # fmt: skip
    assert result.code == 0, result.stderr
    assert "leftovers" in result.stderr and part.name in result.stderr
    assert not part.exists() and not old_dir.exists() and live.exists()
    assert list(workspaces.iterdir()) == []


def test_an_output_directory_that_cannot_be_says_why(source: str, tmp_path: Path) -> None:
    plain = tmp_path / "plain"
    plain.write_text("a file\n")
    for target, says in (
        (tmp_path / "missing" / "d.tar", "does not exist"),
        (plain / "d.tar", "is a file, not a directory"),
        (plain / "sub" / "d.tar", "a path above it is a file"),
    ):
        result = oci2disk("convert", source, "-f", "tar", "-o", str(target))
        assert result.code == 1 and says in result.stderr, result.stderr
