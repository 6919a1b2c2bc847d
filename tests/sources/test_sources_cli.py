"""The new sources and outputs from the command line: `convert disk:... -f tar,cgz,dir`,
`verify` against a disk, and the squashfs output read back with sqfs2tar."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

from clikit import oci2disk
from sourcekit import rich_image

NOBODY = 65534


def test_convert_a_disk_into_several_outputs_and_verify_them(outdir: Path) -> None:
    layout = outdir / "layout"
    rich_image(layout)
    for path in [layout, *layout.rglob("*")]:
        path.chmod(0o755 if path.is_dir() else 0o644)
    qcow2 = outdir / "cloud.qcow2"
    # no generated /etc/fstab, so that the disk holds exactly the image
    made = oci2disk(
        "-q", "convert", f"oci:{layout}:rich", "-f", "qcow2", "--fstab", "none", "-o", str(qcow2)
    )
    assert made.code == 0, made.stderr
    # as an unprivileged user: the disk is read without root, loop devices or mounts
    out = outdir / "from-disk"
    result = oci2disk(
        "--json",
        "convert",
        f"disk:{qcow2}",
        "-f",
        "tar,cgz,dir",
        "--init",
        "/bin/sh",
        "-o",
        str(out),
        user=NOBODY,
    )
    assert result.code == 0, result.stderr
    data = json.loads(result.stdout)
    assert sorted(a["format"] for a in data["artifacts"]) == ["cgz", "dir", "tar"]
    assert (out / "disk.manifest.json").is_file()
    assert data["source"]["ref"] == f"disk:{qcow2}"
    # the tar read from the disk holds the image: owners, setuid, devices, links, xattrs
    same = oci2disk("verify", str(out / "disk.tar"), "--against", f"oci:{layout}:rich")
    assert same.code == 0, same.stdout + same.stderr
    # and verify accepts a disk as the expected side too
    again = oci2disk("verify", str(out / "disk.tar"), "--against", f"disk:{qcow2}")
    assert again.code == 0, again.stdout + again.stderr


def test_squashfs_output_reads_back_as_the_image(outdir: Path) -> None:
    layout = outdir / "layout"
    rich_image(layout)
    squashfs = outdir / "root.squashfs"
    made = oci2disk(
        "-q", "convert", f"oci:{layout}:rich", "-f", "squashfs", "-o", str(squashfs),
        "--squashfs-compressor", "gzip", "--squashfs-block-size", "64K",
    )  # fmt: skip
    assert made.code == 0, made.stderr
    tar = outdir / "back.tar"
    with tar.open("wb") as out:
        subprocess.run(["sqfs2tar", str(squashfs)], stdout=out, check=True)
    same = oci2disk("verify", str(tar), "--against", f"oci:{layout}:rich")
    assert same.code == 0, same.stdout + same.stderr
    bad = oci2disk(
        "convert", f"oci:{layout}:rich", "-f", "squashfs", "-o", str(outdir / "x.sqfs"),
        "--squashfs-block-size", "3K",
    )  # fmt: skip
    assert bad.code == 2 and "--squashfs-block-size" in bad.stderr
    assert not (outdir / "x.sqfs").exists()
