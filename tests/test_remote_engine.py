"""Builds and docker-daemon: sources on a Docker Engine that DOCKER_HOST names: a second
engine listening on loopback TCP, an engine reached over ssh://, and clear errors when
none answers there."""

from __future__ import annotations

import json
import subprocess
import tarfile
from pathlib import Path

import pytest

from clikit import oci2disk
from enginekit import Engine, start_engine
from oci2disk.diskimage.extfs import open_filesystem
from sshkit import start_sshd

NAME = "oci2disk-recipe/remote:latest"


@pytest.fixture(scope="module")
def engine(base_image: str) -> Engine:
    """The second engine, holding the Debian base (loaded from the first engine)."""
    second = start_engine()
    saved = subprocess.run(["docker", "save", base_image], capture_output=True, check=True)
    second.docker("load", input=saved.stdout)
    return second


@pytest.mark.slow
@pytest.mark.docker
def test_recipe_builds_on_an_engine_over_tcp(engine: Engine, base_image: str, outdir: Path) -> None:
    recipe = outdir / "remote"
    recipe.mkdir()
    (recipe / "Dockerfile").write_text(
        f"FROM {base_image}\nRUN echo second-engine > /etc/built-on\n"
    )
    (recipe / "recipe.toml").write_text('[outputs]\nname = "remote"\nformats = ["fs"]\n')
    env = {"DOCKER_HOST": engine.host}
    result = oci2disk("--json", "build", str(recipe), "-o", str(outdir / "out"), env=env)
    assert result.code == 0, result.stderr
    manifest = json.loads(result.stdout)
    assert manifest["source"]["ref"] == f"docker-daemon:{NAME}"

    # the image was built by the second engine, and only there
    engine.docker("image", "inspect", NAME)
    local = subprocess.run(["docker", "image", "inspect", NAME], capture_output=True)
    assert local.returncode != 0

    disk = outdir / "out" / "remote.ext4"
    with open_filesystem(disk) as fs, fs.open("etc/built-on") as f:
        assert f.read() == b"second-engine\n"
    check = oci2disk("verify", str(disk), "--against", f"docker-daemon:{NAME}", env=env)
    assert check.code == 0, check.stdout + check.stderr


@pytest.mark.slow
@pytest.mark.docker
def test_recipe_builds_on_an_engine_over_ssh(base_image: str, outdir: Path) -> None:
    """ssh://USER@127.0.0.1:PORT: docker-py logs in with paramiko and runs
    `docker system dial-stdio` there (this machine's engine, reached through ssh)."""
    server = start_sshd()
    recipe = outdir / "over-ssh"
    recipe.mkdir()
    (recipe / "Dockerfile").write_text(f"FROM {base_image}\nRUN echo over-ssh > /etc/built-on\n")
    (recipe / "recipe.toml").write_text('[outputs]\nname = "ssh"\nformats = ["tar"]\n')
    env = {"DOCKER_HOST": server.url, "HOME": str(server.home)}
    result = oci2disk("--json", "build", str(recipe), "-o", str(outdir / "out"), env=env)
    assert result.code == 0, result.stderr
    source = json.loads(result.stdout)["source"]["ref"]
    assert source == "docker-daemon:oci2disk-recipe/over-ssh:latest"
    with tarfile.open(outdir / "out" / "ssh.tar") as tar:
        member = next(m for m in tar if m.name.removeprefix("./") == "etc/built-on")
        data = tar.extractfile(member)
        assert data is not None and data.read() == b"over-ssh\n"
    check = oci2disk("verify", str(outdir / "out" / "ssh.tar"), "--against", source, env=env)
    assert check.code == 0, check.stdout + check.stderr


@pytest.mark.parametrize(
    ("host", "named"),
    [
        ("tcp://127.0.0.1:1", "tcp://127.0.0.1:1 (DOCKER_HOST)"),
        ("ssh://nobody@127.0.0.1:1", "ssh -p 1 nobody@127.0.0.1 docker version"),
    ],
)
def test_an_engine_that_does_not_answer_is_named(host: str, named: str, outdir: Path) -> None:
    recipe = outdir / "r"
    recipe.mkdir()
    (recipe / "Dockerfile").write_text("FROM scratch\n")
    (recipe / "recipe.toml").write_text("")
    result = oci2disk("build", str(recipe), "--builder", "docker", env={"DOCKER_HOST": host})
    assert result.code == 1
    assert "no Docker Engine answers at" in result.stderr
    assert named in result.stderr
    converted = oci2disk(
        "convert", "docker-daemon:x", "-f", "tar", "-o", str(outdir / "x.tar"),
        env={"DOCKER_HOST": host},
    )  # fmt: skip
    assert converted.code == 1 and host in converted.stderr
