"""The buildah backend: daemonless, rootless builds that give the same disk as Docker's.

The same recipe (build args, a target stage, a multi-stage Dockerfile) is built with the
Docker Engine as root and with buildah as an unprivileged user (chroot isolation, vfs
storage, no daemon); `verify` finds each disk equal to the other builder's image.
"""

from __future__ import annotations

import json
import os
import pwd
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import zstandard

from clikit import ROOT, CliResult, oci2disk
from oci2disk.build.buildah import base_images
from oci2disk.diskimage.extfs import open_filesystem
from oci2disk.rootfs import Kind

pytest_plugins = ("registrykit",)  # the registry fixtures

BUILD_USER = "oci2disk-builder"  # made by ./setup.sh, with ranges in /etc/subuid and /etc/subgid
NO_ENGINE = {"DOCKER_HOST": "unix:///nonexistent.sock"}

DOCKERFILE = """\
ARG BASE
FROM ${BASE} AS base
ARG GREETING=hello
RUN useradd -u 1500 -m builder \\
 && echo "$GREETING from the build" > /etc/motd \\
 && install -d -o 1500 -g 1500 -m 0750 /srv/builder \\
 && echo secret > /srv/builder/key && chown 1500:1500 /srv/builder/key \\
 && chmod 0600 /srv/builder/key \\
 && ln /usr/bin/gpasswd /usr/bin/gpasswd-hardlink \\
 && mkfifo -m 0640 /srv/fifo && ln -s ../etc/motd /srv/motd-link
RUN rm -rf /usr/share/doc && mkdir -p /opt/app && echo v2 > /opt/app/VERSION
COPY hello.txt /opt/app/hello.txt

FROM base AS final
RUN echo final > /opt/app/STAGE

FROM base AS unused
RUN echo unused > /opt/app/STAGE
"""
RECIPE_TOML = """\
[build]
target = "final"
args = { GREETING = "hi" }

[outputs]
formats = ["raw"]
name = "same"
"""


def write_recipe(folder: Path, dockerfile: str = DOCKERFILE, toml: str = RECIPE_TOML) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "Dockerfile").write_text(dockerfile)
    (folder / "recipe.toml").write_text(toml)
    (folder / "hello.txt").write_text("copied from the context\n")
    for path in [folder, *folder.rglob("*")]:
        path.chmod(0o755 if path.is_dir() else 0o644)
    return folder


# ---------------------------------------------------------------- the build user


@dataclass(frozen=True)
class BuildUser:
    """Runs the real command line as an unprivileged user with its own rootless storage."""

    account: pwd.struct_passwd
    python: str
    pythonpath: str

    def oci2disk(self, *args: str) -> CliResult:
        argv = [
            "setpriv", f"--reuid={self.account.pw_uid}", f"--regid={self.account.pw_gid}",
            "--init-groups", self.python, "-m", "oci2disk.cli", *args,
        ]  # fmt: skip
        env = {
            "PATH": "/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin",
            "HOME": self.account.pw_dir,
            "LANG": "C.UTF-8",
            "PYTHONPATH": self.pythonpath,
            "PYTHONDONTWRITEBYTECODE": "1",
        }
        proc = subprocess.run(
            argv, capture_output=True, text=True, env=env, check=False, cwd="/", timeout=1800
        )
        return CliResult(proc.returncode, proc.stdout, proc.stderr)


@pytest.fixture(scope="module")
def build_user() -> Iterator[BuildUser]:
    """The unprivileged build user, and a copy of oci2disk it can read.

    The checkout may sit below a directory only root can enter (/root), so the package
    and its one compiled dependency (zstandard) are copied to a world-readable place
    and run with Debian's python3, which the venv was made from.
    """
    try:
        account = pwd.getpwnam(BUILD_USER)
    except KeyError:
        pytest.fail(f"user {BUILD_USER} is missing: run ./setup.sh, which makes it")
    tree = Path(tempfile.mkdtemp(prefix="oci2disk-pkg-"))
    shutil.copytree(
        ROOT / "src" / "oci2disk", tree / "oci2disk", ignore=shutil.ignore_patterns("__pycache__")
    )
    shutil.copytree(
        Path(zstandard.__file__).parent,
        tree / "zstandard",
        ignore=shutil.ignore_patterns("__pycache__"),
    )
    for path in [tree, *tree.rglob("*")]:
        path.chmod(0o755 if path.is_dir() else 0o644)
    yield BuildUser(account, os.path.realpath(sys.executable), os.fspath(tree))
    shutil.rmtree(tree, ignore_errors=True)


# ---------------------------------------------------------------- Docker vs buildah

# What the two builders themselves write differently. Rootless buildah uses vfs storage,
# whose layer diff compares the directory trees by size and mtime (Docker's overlay2
# records every file a step touched, by copy-up), so:
# - `ln` to a file of a lower layer: the lower file's link count changed, nothing else,
#   so it is not in the layer and the new name is stored as a copy (same content, owner,
#   mode); only the link between the two names differs.
# - useradd rewrites /etc/group- (its backup of /etc/group) with the same size and keeps
#   the old mtime, so the new content is not seen and the base's /etc/group- stays.
# Every other path, content, owner, mode and xattr must match.
BUILDER_DIFFERENCES = {
    ("hardlink", "usr/bin/gpasswd"),
    ("hardlink", "usr/bin/gpasswd-hardlink"),
    ("content", "etc/group-"),
    # The filesystem UUID derives from the image digest, which differs between the
    # builders, and /etc/fstab names it.
    ("fs-uuid", "."),
    ("content", "etc/fstab"),
}


@pytest.mark.slow
@pytest.mark.docker
def test_docker_and_rootless_buildah_give_equal_disks(
    registry_base: str, build_user: BuildUser, outdir: Path
) -> None:
    recipe = write_recipe(outdir / "same")
    args = ["--build-arg", f"BASE={registry_base}", "--build-arg", "GREETING=howdy"]

    by_docker = oci2disk(
        "--json", "build", str(recipe), "--builder", "docker", "-o", str(outdir / "docker"), *args
    )
    assert by_docker.code == 0, by_docker.stderr
    docker_manifest = json.loads(by_docker.stdout)
    assert docker_manifest["source"]["ref"] == "docker-daemon:oci2disk-recipe/same:latest"

    (outdir / "buildah").mkdir(mode=0o777)
    (outdir / "buildah").chmod(0o777)
    by_buildah = build_user.oci2disk(
        "--json", "build", str(recipe), "--builder", "buildah", "-o", str(outdir / "buildah"),
        *args,
    )  # fmt: skip
    assert by_buildah.code == 0, by_buildah.stderr
    buildah_manifest = json.loads(by_buildah.stdout)
    buildah_image = buildah_manifest["source"]["ref"]
    assert buildah_image == "containers-storage:localhost/oci2disk-recipe/same:latest"
    buildah_disk = outdir / "buildah" / "same.raw"
    assert buildah_disk.stat().st_uid == build_user.account.pw_uid  # built without root

    # What both disks must hold: build args, the target stage, owners, links, a FIFO.
    for disk in (outdir / "docker" / "same.raw", buildah_disk):
        with open_filesystem(disk) as fs:
            with fs.open("etc/motd") as f:
                assert f.read() == b"howdy from the build\n"
            with fs.open("opt/app/STAGE") as f:
                assert f.read() == b"final\n"  # target = "final", not the later stage
            with fs.open("opt/app/hello.txt") as f:
                assert f.read() == b"copied from the context\n"
            key = fs.lookup("srv/builder/key")
            assert key is not None and (key.uid, key.gid, key.mode) == (1500, 1500, 0o600)
            fifo = fs.lookup("srv/fifo")
            assert fifo is not None and fifo.kind is Kind.FIFO
            su, su_link = fs.lookup("usr/bin/gpasswd"), fs.lookup("usr/bin/gpasswd-hardlink")
            assert su is not None and su_link is not None
            assert (su.mode, su.size) == (su_link.mode, su_link.size) == (0o4755, su.size)
            assert fs.lookup("usr/share/doc") is None
    with open_filesystem(outdir / "docker" / "same.raw") as fs:
        su, su_link = fs.lookup("usr/bin/gpasswd"), fs.lookup("usr/bin/gpasswd-hardlink")
        assert su is not None and su_link is not None
        assert fs.inode_number("usr/bin/gpasswd") == fs.inode_number("usr/bin/gpasswd-hardlink")

    # the Docker-built disk against buildah's image (read by the user who owns that storage)
    (outdir / "docker" / "same.raw").chmod(0o644)
    cross = build_user.oci2disk(
        "--json", "verify", str(outdir / "docker" / "same.raw"), "--against", buildah_image
    )
    # and the buildah-built disk against the Docker Engine's image
    back = oci2disk(
        "--json", "verify", str(buildah_disk), "--against", docker_manifest["source"]["ref"]
    )
    for check in (cross, back):
        assert check.code in (0, 1), check.stderr
        report = json.loads(check.stdout)
        found = {(d["what"], d["path"]) for d in report["differences"]}
        assert found <= BUILDER_DIFFERENCES, report["differences"]
        assert report["checked"] > 8000  # the whole Debian base, not an empty image


# ---------------------------------------------------------------- no engine at all


@pytest.mark.slow
@pytest.mark.docker
def test_whole_build_with_no_docker_engine(registry_base: str, outdir: Path) -> None:
    """The whole build, conversion and verification with no Docker Engine to talk to.

    The machine's shared dockerd keeps running for other tests, so "no engine" is made
    real for oci2disk's process alone: DOCKER_HOST points at a socket where nothing
    listens, and `--builder auto` (the default) must find no engine and use buildah.
    The base comes from the loopback registry, which buildah reaches over plain HTTP.
    """
    recipe = write_recipe(outdir / "noengine", toml='[outputs]\nname = "noengine"\n')
    result = oci2disk(
        "--json", "build", str(recipe), "-o", str(outdir / "out"),
        "--build-arg", f"BASE={registry_base}",
        env=NO_ENGINE,
    )  # fmt: skip
    assert result.code == 0, result.stderr
    assert "buildah build noengine" in result.stderr
    manifest = json.loads(result.stdout)
    assert (
        manifest["source"]["ref"] == "containers-storage:localhost/oci2disk-recipe/noengine:latest"
    )
    disk = outdir / "out" / "noengine.raw"
    with open_filesystem(disk) as fs, fs.open("opt/app/STAGE") as f:
        assert f.read() == b"unused\n"  # no target: the last stage
    check = oci2disk("verify", str(disk), "--against", manifest["source"]["ref"], env=NO_ENGINE)
    assert check.code == 0, check.stdout + check.stderr


def test_no_engine_and_no_buildah_names_both_fixes(outdir: Path) -> None:
    recipe = write_recipe(outdir / "nobuilder", dockerfile="FROM scratch\n")
    result = oci2disk(
        "build", str(recipe), "-o", str(outdir / "out"), env={**NO_ENGINE, "PATH": "/nonexistent"}
    )
    assert result.code == 1
    assert "no Docker Engine answers and buildah is not installed" in result.stderr
    assert "start the Docker Engine" in result.stderr and "install buildah" in result.stderr
    assert not (outdir / "out" / "disk.raw").exists()


# ---------------------------------------------------------------- failures


@pytest.mark.docker
def test_buildah_failure_shows_failing_step_and_log_tail(registry_base: str, outdir: Path) -> None:
    dockerfile = f"FROM {registry_base}\nRUN echo step-one\nRUN echo doomed-output && false\n"
    recipe = write_recipe(outdir / "fails", dockerfile=dockerfile, toml="")
    result = oci2disk("build", str(recipe), "--builder", "buildah", "-o", str(outdir / "out"))
    assert result.code == 1
    assert "buildah build failed at STEP 3/3: RUN echo doomed-output && false" in result.stderr
    assert "doomed-output" in result.stderr.split("failed at", 1)[1]  # the log tail
    assert "hint: fix the failing Dockerfile step" in result.stderr
    assert not (outdir / "out" / "disk.raw").exists()


def test_buildah_missing_base_image_says_where_to_put_it(outdir: Path) -> None:
    dockerfile = "FROM oci2disk-test/not-anywhere:1\nRUN true\n"
    recipe = write_recipe(outdir / "nobase", dockerfile=dockerfile, toml="")
    result = oci2disk("build", str(recipe), "--builder", "buildah", "-o", str(outdir / "out"))
    assert result.code == 1
    assert "failed at STEP 1/2: FROM oci2disk-test/not-anywhere:1" in result.stderr
    assert "--to containers-storage:NAME:TAG" in result.stderr


def test_buildah_refuses_network_none(outdir: Path) -> None:
    recipe = write_recipe(outdir / "nonet", toml='[build]\nnetwork = "none"\n')
    result = oci2disk("build", str(recipe), "--builder", "buildah", "-o", str(outdir / "out"))
    assert result.code == 1
    assert "network = 'none'" in result.stderr and "--builder docker" in result.stderr


def test_unknown_builder_is_a_usage_error(outdir: Path) -> None:
    recipe = write_recipe(outdir / "x")
    result = oci2disk("build", str(recipe), "--builder", "kaniko")
    assert result.code == 2
    assert "invalid choice: 'kaniko'" in result.stderr


# ---------------------------------------------------------------- FROM lines


def test_base_images_follow_args_stages_and_continuations() -> None:
    dockerfile = """\
# syntax comment
ARG REGISTRY=127.0.0.1:5000
ARG TAG
FROM --platform=linux/arm64 ${REGISTRY}/debian:${TAG} AS build
RUN make
FROM build AS test
FROM \\
  $REGISTRY/tools:1
FROM scratch
COPY --from=build /x /x
FROM registry.example/other:2
FROM ${UNKNOWN}/x:1
"""
    assert base_images(dockerfile, {"TAG": "bookworm"}) == [
        "127.0.0.1:5000/debian:bookworm",
        "127.0.0.1:5000/tools:1",
        "registry.example/other:2",
    ]
    assert base_images(dockerfile, {"TAG": "trixie", "REGISTRY": "localhost:1"})[0] == (
        "localhost:1/debian:trixie"
    )
