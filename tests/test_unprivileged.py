"""The promise that sets oci2disk apart: conversion needs no privileges at all.

An image with files of several owners, a setuid binary, device nodes, a FIFO, a symlink,
a hard link, a file capability and a user xattr is converted by uid 65534 (no root, no
capabilities, no groups), and `verify` then finds the disk equal to the image.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from importlib import metadata
from pathlib import Path

import pytest
from packaging.requirements import Requirement

from clikit import ROOT, oci2disk
from layerkit import Layer, device, directory, fifo, file, hardlink, make_image, symlink, whiteout
from oci2disk.diskimage.extfs import open_filesystem
from oci2disk.rootfs import Kind

NOBODY = 65534
# security.capability v2: cap_net_raw (bit 13) permitted + effective
CAP_NET_RAW = bytes.fromhex("0100000200200000000000000000000000000000")


@pytest.fixture
def image_layout(outdir: Path) -> Path:
    layout = outdir / "layout"
    make_image(
        layout,
        [
            [
                directory("etc"),
                file(
                    "etc/passwd",
                    b"root:x:0:0::/root:/bin/sh\nalice:x:1000:1000::/home/alice:/bin/sh\n",
                ),
                file("etc/shadow", b"root:*:1::::::\n", mode=0o640, gid=42),
                file("etc/hostname", b"oldname\n"),
                directory("home"),
                directory("home/alice", mode=0o750, uid=1000, gid=1000),
                file("home/alice/notes", b"alice's\n", mode=0o600, uid=1000, gid=1000),
                directory("srv", uid=2000, gid=3000, mode=0o2775),
                file("srv/data", b"x" * 100_000, uid=2000, gid=3000),
                directory("tmp", mode=0o1777),
                directory("usr"),
                directory("usr/bin"),
                file("usr/bin/su", b"\x7fELF-su", mode=0o4755),
                file(
                    "usr/bin/ping",
                    b"\x7fELF-ping",
                    mode=0o755,
                    xattrs={"security.capability": CAP_NET_RAW},
                ),
                file("usr/bin/tagged", b"tagged", xattrs={"user.origin": b"oci2disk-test"}),
                hardlink("usr/bin/su-again", "usr/bin/su", mode=0o4755),
                symlink("usr/bin/sh", "/bin/dash"),
                directory("dev"),
                device("dev/null", 1, 3, mode=0o666),
                device("dev/sda", 8, 0, block=True, mode=0o660),
                fifo("dev/initctl", mode=0o600),
            ],
            Layer(
                [whiteout("etc/hostname"), file("etc/motd", b"second layer\n", uid=65534)],
                compression="gzip",
            ),
        ],
        tag="rich",
    )
    for path in [layout, *layout.rglob("*")]:
        path.chmod(0o755 if path.is_dir() else 0o644)
    return layout


@pytest.fixture
def unprivileged_python() -> Iterator[tuple[str, dict[str, str]]]:
    """Debian's python3 with a world-readable copy of oci2disk and its runtime dependencies.

    The checkout and its venv may sit below a directory only root can enter (such as
    /root), so the package and the installed files of every runtime dependency (from
    the package metadata) are copied to a temporary tree that uid 65534 can read.
    """
    tree = Path(tempfile.mkdtemp(prefix="oci2disk-pkg-"))
    shutil.copytree(
        ROOT / "src" / "oci2disk", tree / "oci2disk", ignore=shutil.ignore_patterns("__pycache__")
    )
    for dist in runtime_distributions("oci2disk"):
        for member in dist.files or ():
            source = Path(str(dist.locate_file(member)))
            if source.is_file() and member.parts[0] not in ("..", "bin"):
                target = tree / member
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(source, target)
    for path in [tree, *tree.rglob("*")]:
        path.chmod(0o755 if path.is_dir() else 0o644)
    yield (
        os.path.realpath(sys.executable),
        {"PYTHONPATH": str(tree), "PYTHONDONTWRITEBYTECODE": "1"},
    )
    shutil.rmtree(tree, ignore_errors=True)


def runtime_distributions(name: str) -> list[metadata.Distribution]:
    """The installed distributions ``name`` needs at run time (extras left out)."""
    seen: dict[str, metadata.Distribution] = {}
    todo = [Requirement(r).name for r in metadata.requires(name) or [] if "extra ==" not in r]
    while todo:
        dep = todo.pop()
        key = dep.lower().replace("_", "-")
        if key in seen:
            continue
        try:
            dist = seen[key] = metadata.distribution(dep)
        except metadata.PackageNotFoundError:
            continue
        todo += [Requirement(r).name for r in dist.requires or [] if "extra ==" not in r]
    return list(seen.values())


def run_as_nobody(python: str, env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    argv = [
        "setpriv",
        f"--reuid={NOBODY}",
        f"--regid={NOBODY}",
        "--clear-groups",
        "--inh-caps=-all",
        "--bounding-set=-all",
        python,
        "-m",
        "oci2disk.cli",
        *args,
    ]
    clean_env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": "/nonexistent", **env}
    return subprocess.run(
        argv, capture_output=True, text=True, env=clean_env, check=False, timeout=600
    )


@pytest.mark.parametrize(("fmt", "table"), [("raw", "mbr"), ("qcow2", "gpt"), ("fs", "none")])
def test_unprivileged_conversion_is_exact(
    image_layout: Path,
    outdir: Path,
    unprivileged_python: tuple[str, dict[str, str]],
    fmt: str,
    table: str,
) -> None:
    python, env = unprivileged_python
    work = outdir / "work"
    work.mkdir()
    work.chmod(0o777)
    artifact = work / f"disk.{fmt}"
    who = run_as_nobody(
        python,
        env,
        "-q",
        "convert",
        f"oci:{image_layout}:rich",
        "-f",
        fmt,
        "-o",
        str(artifact),
        "--table",
        table,
    )
    assert who.returncode == 0, who.stderr
    # what the unprivileged run wrote: the artifact and its manifest, owned by nobody
    assert sorted(p.name for p in work.iterdir()) == [
        artifact.name,
        f"{artifact.name}.manifest.json",
    ]
    assert artifact.stat().st_uid == NOBODY

    result = oci2disk("verify", str(artifact), "--against", f"oci:{image_layout}:rich")
    assert result.code == 0, result.stdout + result.stderr
    assert "equal" in result.stdout

    raw = artifact
    if fmt == "qcow2":
        raw = outdir / "check.raw"
        subprocess.run(["qemu-img", "convert", "-O", "raw", str(artifact), str(raw)], check=True)
    with open_filesystem(raw) as fs:

        def get(path: str):  # type: ignore[no-untyped-def]
            entry = fs.lookup(path)
            assert entry is not None, path
            return entry

        assert (get("home/alice").uid, get("home/alice").gid, get("home/alice").mode) == (
            1000,
            1000,
            0o750,
        )
        assert (get("srv").uid, get("srv").gid, get("srv").mode) == (2000, 3000, 0o2775)
        assert get("etc/motd").uid == NOBODY
        assert get("tmp").mode == 0o1777
        assert get("usr/bin/su").mode == 0o4755
        assert fs.inode_number("usr/bin/su") == fs.inode_number("usr/bin/su-again")
        assert fs.link_count("usr/bin/su") == 2
        assert dict(get("usr/bin/ping").xattrs)["security.capability"] == CAP_NET_RAW
        assert dict(get("usr/bin/tagged").xattrs)["user.origin"] == b"oci2disk-test"
        assert (get("dev/null").kind, get("dev/null").devmajor, get("dev/null").devminor) == (
            Kind.CHAR,
            1,
            3,
        )
        assert (get("dev/sda").kind, get("dev/sda").devmajor) == (Kind.BLOCK, 8)
        assert get("dev/initctl").kind is Kind.FIFO
        assert get("usr/bin/sh").linkname == "/bin/dash"
        assert fs.lookup("etc/hostname") is None  # whited out by the second layer
        assert get(".").uid == 0  # the root directory belongs to root, not to the converter
        with fs.open("etc/fstab") as f:
            assert f"UUID={fs.uuid}" in f.read().decode()


def test_verify_catches_a_changed_owner(
    image_layout: Path, outdir: Path, unprivileged_python: tuple[str, dict[str, str]]
) -> None:
    """verify is not a rubber stamp: one changed owner is reported, with exit code 1."""
    artifact = outdir / "disk.raw"
    assert (
        oci2disk("-q", "convert", f"oci:{image_layout}:rich", "-f", "raw", "-o", str(artifact)).code
        == 0
    )
    subprocess.run(
        ["debugfs", "-w", "-R", "sif /home/alice/notes uid 1234", f"{artifact}?offset=1048576"],
        check=True,
        capture_output=True,
    )
    result = oci2disk("verify", str(artifact), "--against", f"oci:{image_layout}:rich")
    assert result.code == 1
    assert "/home/alice/notes" in result.stdout and "1234" in result.stdout
    assert "1 difference" in result.stdout
