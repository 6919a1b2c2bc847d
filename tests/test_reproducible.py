"""Two from-scratch builds of recipes/debian-qemu with the same SOURCE_DATE_EPOCH give
byte-identical disks (docs/reproducible.md)."""

from __future__ import annotations

import json
import os
import subprocess
import uuid
from pathlib import Path

import pytest

from clikit import oci2disk

ROOT = Path(__file__).resolve().parent.parent
SOURCE_DATE_EPOCH = "1700000000"


def _build_from_scratch(base_image: str, tag: str) -> None:
    """`docker build --no-cache`: every step runs again, with the clock of now."""
    subprocess.run(
        [
            "docker",
            "build",
            "--no-cache",
            "--pull=false",
            "-q",
            "--build-arg",
            f"BASE={base_image}",
            "--build-arg",
            f"SOURCE_DATE_EPOCH={SOURCE_DATE_EPOCH}",
            "-t",
            tag,
            os.fspath(ROOT / "recipes" / "debian-qemu"),
        ],
        check=True,
        capture_output=True,
    )


@pytest.mark.slow
def test_two_builds_from_scratch_give_the_same_disk(base_image: str, outdir: Path) -> None:
    tags = [f"oci2disk-test/reproducible:{uuid.uuid4().hex[:12]}" for _ in range(2)]
    disks = [outdir / "first.raw", outdir / "second.raw"]
    try:
        for tag, disk in zip(tags, disks, strict=True):
            _build_from_scratch(base_image, tag)
            result = oci2disk(
                "convert",
                f"docker-daemon:{tag}",
                "-f",
                "raw",
                "-o",
                os.fspath(disk),
                "--no-cache",
                env={"SOURCE_DATE_EPOCH": SOURCE_DATE_EPOCH},
            )
            assert result.code == 0, result.stderr
        ids = [
            subprocess.run(
                ["docker", "image", "inspect", "-f", "{{.Id}}", tag],
                check=True,
                capture_output=True,
                text=True,
            ).stdout.strip()
            for tag in tags
        ]
        assert ids[0] != ids[1], "the second build ran from scratch, not from the layer cache"
        made = [json.loads(d.with_name(d.name + ".manifest.json").read_text()) for d in disks]
        if made[0]["artifacts"][0]["sha256"] != made[1]["artifacts"][0]["sha256"]:
            report = oci2disk("verify", os.fspath(disks[1]), "--against", f"disk:{disks[0]}")
            pytest.fail(
                f"the two disks differ: filesystems {made[0].get('filesystem')} and "
                f"{made[1].get('filesystem')}; their files:\n{report.stdout}{report.stderr}"
            )
    finally:
        subprocess.run(["docker", "rmi", "-f", *tags], capture_output=True, check=False)
