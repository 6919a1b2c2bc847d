"""`oci2disk bootstrap`: a Debian base from the mirror, with no registry anywhere."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from clikit import oci2disk
from oci2disk.diskimage.extfs import open_filesystem
from oci2disk.oci.layout import open_layout


@pytest.mark.slow
def test_bootstrap_into_oci_layout_then_convert(outdir: Path) -> None:
    layout = outdir / "base"
    result = oci2disk(
        "--json", "bootstrap", "bookworm", "--to", f"oci:{layout}:bookworm", "--include", "hello"
    )
    assert result.code == 0, result.stderr
    assert json.loads(result.stdout)["dest"] == f"oci:{layout}:bookworm"
    image = open_layout(layout, "bookworm")
    assert (image.config.os, image.config.architecture) == ("linux", "amd64")
    assert len(image.layers) == 1

    disk = outdir / "base.raw"
    assert (
        oci2disk("-q", "convert", f"oci:{layout}:bookworm", "-f", "raw", "-o", str(disk)).code == 0
    )
    with open_filesystem(disk) as fs:
        with fs.open("usr/lib/os-release") as f:
            assert b"VERSION_CODENAME=bookworm" in f.read()
        assert fs.lookup("usr/bin/hello") is not None  # --include reached mmdebstrap
    check = oci2disk("verify", str(disk), "--against", f"oci:{layout}:bookworm")
    assert check.code == 0, check.stdout + check.stderr


def test_bootstrap_rejects_unknown_suite_and_destination(outdir: Path) -> None:
    bad_suite = oci2disk("bootstrap", "bookwork", "--to", f"oci:{outdir}/x:y")
    assert bad_suite.code == 2 and "unknown suite 'bookwork'" in bad_suite.stderr
    bad_dest = oci2disk("bootstrap", "bookworm", "--to", f"docker-archive:{outdir}/x.tar")
    assert (
        bad_dest.code == 2 and "--to docker-daemon:NAME:TAG or --to oci:DIR:TAG" in bad_dest.stderr
    )
