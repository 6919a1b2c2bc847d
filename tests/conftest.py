"""Shared fixtures: the real Docker Engine, a bootstrapped Debian base, the CLI."""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from clikit import oci2disk

ROOT = Path(__file__).resolve().parent.parent
BASE_IMAGE = "oci2disk/debian:bookworm"


def docker_image_exists(name: str) -> bool:
    return (
        subprocess.run(
            ["docker", "image", "inspect", name], capture_output=True, check=False
        ).returncode
        == 0
    )


@pytest.fixture(scope="session")
def base_image() -> str:
    """The Debian bookworm minbase image, bootstrapped from the mirror when missing."""
    if not docker_image_exists(BASE_IMAGE):
        result = oci2disk("bootstrap", "bookworm", "--to", f"docker-daemon:{BASE_IMAGE}")
        assert result.code == 0, result.stderr
    return BASE_IMAGE


@pytest.fixture
def outdir() -> Iterator[Path]:
    """An output directory any user can reach and write: tests also convert unprivileged,
    and pytest's own tmp_path lives under a root-only directory."""
    path = Path(tempfile.mkdtemp(prefix="oci2disk-test-"))
    path.chmod(0o777)
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="session")
def debian_qemu_build(base_image: str, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`oci2disk build recipes/debian-qemu` (raw + qcow2), once per test session."""
    out = tmp_path_factory.mktemp("debian-qemu")
    result = oci2disk(
        "build",
        str(ROOT / "recipes" / "debian-qemu"),
        "-o",
        str(out),
        "--build-arg",
        f"BASE={base_image}",
    )
    assert result.code == 0, result.stderr
    return out
