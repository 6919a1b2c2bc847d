"""Helpers of the source tests: a rich hand-made image, disks made from it rootless
(sfdisk + ``mke2fs -d -`` on the canonical stream, as ``oci2disk convert`` makes them),
and a Python that uid 65534 can run oci2disk with."""

from __future__ import annotations

import hashlib
import importlib
import os
import shutil
import subprocess
import sys
import tarfile
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

from layerkit import Layer, device, directory, fifo, file, hardlink, make_image, symlink, whiteout
from oci2disk.oci.layout import OciImage
from oci2disk.rootfs.flatten import flatten
from oci2disk.rootfs.model import Entry, with_digests

ROOT = Path(__file__).resolve().parent.parent
NOBODY = 65534
CAP_NET_RAW = bytes.fromhex("0100000200200000000000000000000000000000")
# A tiny x86-64 ELF header: enough for the architecture guess.
ELF_X86_64 = b"\x7fELF\x02\x01\x01" + bytes(9) + b"\x02\x00\x3e\x00" + bytes(44)
MIB = 1 << 20
# Incompressible and the same in every run (outputs are compared byte for byte).
NOISE = b"".join(hashlib.sha256(i.to_bytes(4, "little")).digest() for i in range(10_000))


def rich_image(layout: Path) -> OciImage:
    """Owners, setuid, devices, a FIFO, hard links (one setuid), xattrs, symlinks."""
    return make_image(
        layout,
        [
            [
                directory("bin"),
                file("bin/sh", ELF_X86_64 + b"shell", mode=0o755),
                directory("etc"),
                file("etc/os-release", b'ID=debian\nVERSION_ID="12"\n'),
                file("etc/shadow", b"root:*:1::::::\n", mode=0o640, gid=42),
                directory("home"),
                directory("home/alice", mode=0o750, uid=1000, gid=1000),
                file("home/alice/notes", b"alice's\n", mode=0o600, uid=1000, gid=1000),
                directory("srv", uid=2000, gid=3000, mode=0o2775),
                file("srv/data", NOISE, uid=2000, gid=3000),
                directory("tmp", mode=0o1777),
                directory("usr"),
                directory("usr/bin"),
                file("usr/bin/su", ELF_X86_64 + b"su", mode=0o4755),
                hardlink("usr/bin/su-again", "usr/bin/su", mode=0o4755),
                hardlink("usr/bin/su-third", "usr/bin/su", mode=0o4755),
                file(
                    "usr/bin/ping",
                    ELF_X86_64 + b"ping",
                    mode=0o755,
                    xattrs={"security.capability": CAP_NET_RAW},
                ),
                file("usr/bin/tagged", b"tagged", xattrs={"user.origin": b"oci2disk-test"}),
                symlink("usr/bin/sh", "/bin/sh"),
                directory("dev"),
                device("dev/null", 1, 3, mode=0o666),
                device("dev/sda", 8, 0, block=True, mode=0o660),
                device("dev/big", 259, 70000, mode=0o600),
                fifo("dev/initctl", mode=0o600),
                file("etc/hostname", b"old\n"),
            ],
            Layer([whiteout("etc/hostname"), file("etc/motd", b"second\n", uid=65534)]),
        ],
        tag="rich",
    )


def canonical_tar(image: OciImage, workdir: Path, out: Path) -> None:
    with flatten(image, workdir) as rootfs, out.open("wb") as sink:
        rootfs.write_tar(sink)


def entries(image: OciImage, workdir: Path, *, ignore: tuple[str, ...] = ()) -> list[Entry]:
    """The image's flattened entries with content digests (``link_group`` kept)."""
    with flatten(image, workdir) as rootfs:
        return [
            replace(e, size=e.size if e.is_file else 0)
            for e in with_digests(rootfs)
            if e.path not in ignore and not e.path.startswith(tuple(p + "/" for p in ignore))
        ]


def make_disk(tar: Path, disk: Path, *, table: str = "gpt", parts: int = 1, root: int = 1) -> None:
    """A disk with ``parts`` partitions of 32 MiB from 1 MiB; ``root`` gets ext4 from ``tar``.

    The others stay empty. GPT root partitions get the generic Linux type, so only
    /etc/os-release can tell which one is the root.
    """
    size = (2 + 32 * parts) * MIB
    with disk.open("wb") as f:
        f.truncate(size)
    lines = [f"label: {'gpt' if table == 'gpt' else 'dos'}"]
    kind = "0FC63DAF-8483-4772-8E79-3D69D8477DE4" if table == "gpt" else "83"
    for n in range(parts):
        lines.append(f"start={(1 + 32 * n) * 2048}, size={32 * 2048}, type={kind}")
    subprocess.run(
        ["sfdisk", "--no-reread", "--no-tell-kernel", "-q", str(disk)],
        input="\n".join(lines) + "\n",
        text=True,
        check=True,
        capture_output=True,
    )
    mkfs(tar, disk, offset=(1 + 32 * (root - 1)) * MIB, size=32 * MIB)


def mkfs(tar: Path, image: Path, *, offset: int, size: int) -> None:
    with tar.open("rb") as stream:
        subprocess.run(
            [
                "mke2fs",
                "-q",
                "-F",
                "-t",
                "ext4",
                "-b",
                "4096",
                "-d",
                "-",
                "-E",
                f"offset={offset}",
                str(image),
                f"{size // 1024}k",
            ],
            stdin=stream,
            check=True,
            capture_output=True,
        )
    # mke2fs keeps only security.capability; the others are set afterwards, as
    # oci2disk's disk writer does.
    device = f"{image}?offset={offset}"
    with tarfile.open(tar) as archive:
        for member in archive:
            for key, value in member.pax_headers.items():
                name = key.removeprefix("SCHILY.xattr.")
                if name == key or name == "security.capability":
                    continue
                value_file = image.parent / ".xattr-value"
                value_file.write_bytes(value.encode("utf-8", "surrogateescape"))
                path = "/" + member.name.removeprefix("./")
                subprocess.run(
                    ["debugfs", "-w", "-R", f"ea_set -f {value_file} {path} {name}", device],
                    check=True,
                    capture_output=True,
                )
                value_file.unlink()


def nobody_python(tree: Path) -> tuple[str, dict[str, str]]:
    """A copy of oci2disk (and its runtime modules) that uid 65534 can import."""
    shutil.copytree(
        ROOT / "src" / "oci2disk", tree / "oci2disk", ignore=shutil.ignore_patterns("__pycache__")
    )
    for name in ("zstandard", "isal"):
        origin = importlib.import_module(name).__file__
        assert origin is not None
        shutil.copytree(
            Path(origin).parent, tree / name, ignore=shutil.ignore_patterns("__pycache__")
        )
    for path in [tree, *tree.rglob("*")]:
        path.chmod(0o755 if path.is_dir() else 0o644)
    return os.path.realpath(sys.executable), {
        "PYTHONPATH": str(tree),
        "PYTHONDONTWRITEBYTECODE": "1",
    }


def run_as_nobody(python: str, env: dict[str, str], code: str) -> subprocess.CompletedProcess[str]:
    argv = [
        "setpriv",
        f"--reuid={NOBODY}",
        f"--regid={NOBODY}",
        "--clear-groups",
        "--inh-caps=-all",
        "--bounding-set=-all",
        python,
        "-c",
        code,
    ]
    clean = {"PATH": "/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin", "HOME": "/nonexistent", **env}
    return subprocess.run(argv, capture_output=True, text=True, env=clean, check=False, timeout=600)


def world_dirs(*paths: Path) -> Iterator[Path]:
    for path in paths:
        path.mkdir(parents=True, exist_ok=True)
        path.chmod(0o777)
        yield path
