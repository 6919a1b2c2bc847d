"""A real registry on loopback (Debian's docker-registry): recipes build FROM it with each
backend, `convert` pulls from it, and `bootstrap` pushes straight into it."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from clikit import oci2disk
from oci2disk.diskimage.extfs import open_filesystem

if TYPE_CHECKING:
    from registrykit import Registry

pytest_plugins = ("registrykit",)  # the registry fixtures

pytestmark = [pytest.mark.slow, pytest.mark.docker]

SOURCES = {
    "docker": "docker-daemon:oci2disk-recipe/from-registry:latest",
    "buildah": "containers-storage:localhost/oci2disk-recipe/from-registry:latest",
}


@pytest.mark.parametrize("builder", ["docker", "buildah"])
def test_recipe_builds_from_the_registry(builder: str, registry_base: str, outdir: Path) -> None:
    recipe = outdir / "from-registry"
    recipe.mkdir()
    (recipe / "Dockerfile").write_text(
        f"FROM {registry_base}\n"
        "ARG BUILDER\n"
        'RUN echo "$BUILDER" > /etc/built-by && dpkg --print-architecture > /etc/built-arch\n'
    )
    (recipe / "recipe.toml").write_text('[outputs]\nname = "reg"\n')
    result = oci2disk(
        "--json", "build", str(recipe), "--builder", builder, "--platform", "linux/amd64",
        "--build-arg", f"BUILDER={builder}", "-o", str(outdir / "out"),
    )  # fmt: skip
    assert result.code == 0, result.stderr
    manifest = json.loads(result.stdout)
    assert manifest["source"]["ref"] == SOURCES[builder]
    disk = outdir / "out" / "reg.raw"
    with open_filesystem(disk) as fs:
        with fs.open("etc/built-by") as f:
            assert f.read() == f"{builder}\n".encode()
        with fs.open("etc/built-arch") as f:
            assert f.read() == b"amd64\n"
        with fs.open("usr/lib/os-release") as f:
            assert b"VERSION_CODENAME=bookworm" in f.read()  # the base from the registry
    check = oci2disk("verify", str(disk), "--against", SOURCES[builder])
    assert check.code == 0, check.stdout + check.stderr


def test_bootstrap_pushes_straight_to_a_registry(registry: Registry, outdir: Path) -> None:
    dest = f"docker://{registry.name('bootstrapped/debian:bookworm')}"
    result = oci2disk("--json", "bootstrap", "bookworm", "--to", dest, "--include", "hello")
    assert result.code == 0, result.stderr
    assert json.loads(result.stdout)["dest"] == dest
    assert registry.has("bootstrapped/debian", "bookworm")

    disk = outdir / "pushed.raw"
    converted = oci2disk("-q", "convert", dest, "-f", "raw", "-o", str(disk))
    assert converted.code == 0, converted.stderr
    with open_filesystem(disk) as fs:
        assert fs.lookup("usr/bin/hello") is not None  # --include reached the pushed image
    check = oci2disk("verify", str(disk), "--against", dest)
    assert check.code == 0, check.stdout + check.stderr


def test_recipe_names_a_registry_image_instead_of_a_dockerfile(
    registry_base: str, outdir: Path
) -> None:
    recipe = outdir / "image-recipe"
    recipe.mkdir()
    (recipe / "recipe.toml").write_text(
        f'[build]\nimage = "docker://{registry_base}"\nplatform = "linux/amd64"\n\n'
        '[outputs]\nname = "img"\nformats = ["fs"]\n'
    )
    result = oci2disk("--json", "build", str(recipe), "-o", str(outdir / "out"))
    assert result.code == 0, result.stderr
    assert json.loads(result.stdout)["source"]["ref"] == f"docker://{registry_base}"
    check = oci2disk(
        "verify", str(outdir / "out" / "img.ext4"), "--against", f"docker://{registry_base}"
    )
    assert check.code == 0, check.stdout + check.stderr
