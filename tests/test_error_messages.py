"""What the system refuses is said plainly (which filesystem is full, which name is too
long, which file may not be read), never as a traceback, and never echoes a file."""

from __future__ import annotations

import errno
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from clikit import CliResult, oci2disk
from layerkit import TAG, file, make_image
from oci2disk import cli

NOBODY = 65534


@pytest.fixture
def shared() -> Iterator[Path]:
    """A folder every user may enter (pytest's tmp_path is root's alone)."""
    folder = Path(tempfile.mkdtemp(prefix="o2d-errors-"))
    folder.chmod(0o755)
    yield folder
    shutil.rmtree(folder)


@pytest.fixture
def source(shared: Path) -> str:
    make_image(shared / "layout", [[file("etc/hostname", b"vm\n")]])
    for path in [shared / "layout", *(shared / "layout").rglob("*")]:
        path.chmod(0o755 if path.is_dir() else 0o644)
    return f"oci:{shared / 'layout'}:{TAG}"


def refused(result: CliResult, *says: str) -> None:
    code, stderr = result.code, result.stderr
    assert code == 1, stderr
    assert "Traceback" not in stderr
    for text in says:
        assert text in stderr, stderr


def test_a_full_filesystem_is_named_with_its_free_space(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    def full(*args: object, **kwargs: object) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr("oci2disk.pipeline.convert_ref", full)
    monkeypatch.setenv("OCI2DISK_TMPDIR", str(tmp_path))
    code = cli.main(["convert", "oci:x:y", "-f", "raw", "-o", str(tmp_path / "d.raw")])
    err = capsys.readouterr().err
    assert code == 1
    assert "a filesystem is full" in err and f"output directory {tmp_path}:" in err
    assert "GiB free" in err and "OCI2DISK_TMPDIR" in err


def test_a_size_beyond_the_filesystem_and_a_long_name(source: str, tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    huge = oci2disk("-q", "convert", source, "-f", "raw", "--size", "20T", "-o", str(out / "d.raw"))
    refused(huge, "--size")
    long = oci2disk("-q", "convert", source, "-f", "tar", "-o", str(out / ("n" * 300)))
    refused(long, "255 bytes")
    assert list(out.iterdir()) == []


def test_an_output_directory_the_user_may_not_write(source: str, shared: Path) -> None:
    locked = shared / "locked"
    locked.mkdir(mode=0o755)
    result = oci2disk(
        "-q", "convert", source, "-f", "tar", "-o", str(locked / "r.tar"), user=NOBODY
    )
    refused(result, "cannot write into the output directory", "permission denied")


def test_a_recipe_value_with_a_nul_byte(tmp_path: Path) -> None:
    (tmp_path / "recipe.toml").write_text('[build]\nimage = "oci:x\\u0000y"\n')
    result = oci2disk("build", str(tmp_path))
    assert result.code in (1, 2) and "NUL" in result.stderr and "Traceback" not in result.stderr


def test_a_dockerfile_outside_the_recipe_is_refused_and_never_shown(tmp_path: Path) -> None:
    (tmp_path / "recipe.toml").write_text('[build]\ndockerfile = "../../../../etc/passwd"\n')
    result = oci2disk("build", str(tmp_path))
    refused(result, "leads out of the recipe's directory")
    assert "root:" not in result.stdout + result.stderr


def test_a_directory_named_as_the_dockerfile_is_not_said_to_be_missing(tmp_path: Path) -> None:
    (tmp_path / "Dockerfile").mkdir()
    (tmp_path / "recipe.toml").write_text("[build]\n")
    refused(oci2disk("build", str(tmp_path)), "is a directory, not a file")


@pytest.mark.skipif(not Path("/var/run/docker.sock").exists(), reason="no local engine socket")
def test_an_engine_socket_without_permission_is_not_a_stopped_engine(shared: Path) -> None:
    socket = Path("/var/run/docker.sock")
    if os.stat(socket).st_mode & 0o006:
        pytest.skip("the socket is open to every user here")
    (shared / "open").mkdir(mode=0o777)
    (shared / "open").chmod(0o777)
    result = oci2disk(
        "-q", "convert", "docker-daemon:busybox:latest", "-f", "tar", "-o", str(shared / "open/r"),
        env={"DOCKER_HOST": f"unix://{socket}"}, user=NOBODY,
    )  # fmt: skip
    refused(result, "permission denied", "usermod")
    assert "start the engine" not in result.stderr


def test_uuid_and_source_date_epoch_are_checked_before_any_work(tmp_path: Path) -> None:
    absent = f"oci:{tmp_path / 'no-such-layout'}:x"  # never opened: refused before
    nil = oci2disk(
        "convert",
        absent,
        "-f",
        "raw",
        "-o",
        str(tmp_path / "d.raw"),
        "--uuid",
        "0" * 8 + "-0000-0000-0000-" + "0" * 12,
    )
    assert nil.code == 2 and "--uuid" in nil.stderr and "nil UUID" in nil.stderr
    late = oci2disk(
        "convert", absent, "-f", "raw", "-o", str(tmp_path / "d.raw"),
        env={"SOURCE_DATE_EPOCH": "99999999999"},
    )  # fmt: skip
    assert late.code == 2 and "SOURCE_DATE_EPOCH" in late.stderr and "2106" in late.stderr
    assert "no-such-layout" not in nil.stderr + late.stderr


def test_huge_xattrs_are_refused_or_reported_not_a_traceback(tmp_path: Path) -> None:
    too_big = make_image(
        tmp_path / "big", [[file("etc/x", b"x", xattrs={"user.k": b"v" * (1 << 20)})]]
    )
    del too_big
    result = oci2disk(
        "-q", "convert", f"oci:{tmp_path / 'big'}:{TAG}", "-f", "dir", "-o", str(tmp_path / "a")
    )
    refused(result, "XATTR_SIZE_MAX", "user.k")
    make_image(tmp_path / "large", [[file("etc/x", b"x", xattrs={"user.k": b"v" * 60000})]])
    kept = oci2disk(
        "-q", "convert", f"oci:{tmp_path / 'large'}:{TAG}", "-f", "dir", "-o", str(tmp_path / "b")
    )
    assert kept.code == 0, kept.stderr
    if "user.k" in kept.stderr:  # an ext4 without ea_inode: one block per inode's xattrs
        assert "/etc/x (user.k: too large for the target filesystem's xattr space)" in kept.stderr
        assert "run oci2disk as root" not in kept.stderr
    else:  # a filesystem that holds it (tmpfs, xfs)
        assert os.getxattr(tmp_path / "b/etc/x", "user.k") == b"v" * 60000
