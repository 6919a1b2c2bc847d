"""`oci2disk verify` on every kind of artifact: cgz, tar, directory and disk formats."""

from __future__ import annotations

import gzip
import subprocess
from pathlib import Path

import pytest

from clikit import oci2disk

pytestmark = pytest.mark.docker


@pytest.mark.parametrize(
    ("fmt", "name", "extra"),
    [
        ("cgz", "root.cgz", ["--init", "/bin/bash"]),
        ("cgz", "root.cpio.zst", ["--init", "/bin/bash", "--cpio-compression", "zstd"]),
        ("tar", "root.tar.gz", ["--tar-compression", "gzip", "--level", "1"]),
        ("dir", "root.d", []),
        ("vmdk", "root.vmdk", []),
        ("vpc", "root.vhd", ["--size", "1G"]),
    ],
)
def test_verify_each_output_kind(
    base_image: str, outdir: Path, fmt: str, name: str, extra: list[str]
) -> None:
    target = outdir / name
    made = oci2disk(
        "-q", "convert", f"docker-daemon:{base_image}", "-f", fmt, "-o", str(target), *extra
    )
    assert made.code == 0, made.stderr
    same = extra[:2] if fmt == "cgz" else []  # verify expects what --init made
    result = oci2disk("verify", str(target), "--against", f"docker-daemon:{base_image}", *same)
    assert result.code == 0, result.stdout + result.stderr
    assert ": equal (" in result.stdout


def test_verify_finds_a_changed_file_in_a_cgz(base_image: str, outdir: Path) -> None:
    target = outdir / "root.cgz"
    assert (
        oci2disk(
            "-q",
            "convert",
            f"docker-daemon:{base_image}",
            "-f",
            "cgz",
            "-o",
            str(target),
            "--init",
            "/bin/bash",
        ).code
        == 0
    )
    # unpack, change one file, pack again with the real cpio: verify must notice
    work = outdir / "unpacked"
    work.mkdir()
    subprocess.run(
        ["cpio", "-idm", "--quiet", "--no-absolute-filenames"],
        input=gzip.decompress(target.read_bytes()),
        cwd=work,
        check=True,
    )
    changed = work / "etc" / "debian_version"
    changed.write_bytes(b"9" * (changed.stat().st_size - 1) + b"\n")  # same size, new bytes
    names = subprocess.run(
        ["find", ".", "-mindepth", "1"], cwd=work, capture_output=True, check=True
    ).stdout
    packed = subprocess.run(
        ["cpio", "-o", "-H", "newc", "--quiet"],
        input=names,
        cwd=work,
        capture_output=True,
        check=True,
    ).stdout
    target.write_bytes(gzip.compress(packed))
    result = oci2disk(
        "verify", str(target), "--against", f"docker-daemon:{base_image}", "--init", "/bin/bash"
    )
    assert result.code == 1
    assert "/etc/debian_version" in result.stdout and "content" in result.stdout
