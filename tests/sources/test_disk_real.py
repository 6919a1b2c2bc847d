"""A real system through ``disk:``: the debian-qemu recipe's image (systemd, a kernel,
about 15 000 paths) made into a GPT qcow2 and read back equal, path for path."""

from __future__ import annotations

import subprocess
from dataclasses import replace
from pathlib import Path

import pytest

from bootkit import KERNEL_IMAGE, debian_kernel
from oci2disk.oci.layout import OciImage, layout_from_docker_archive
from oci2disk.rootfs.flatten import flatten
from oci2disk.rootfs.model import Entry, with_digests
from oci2disk.sources.disk import image_from_disk
from sourcekit import MIB

X86_64_ROOT = "4F68BCE3-E8CD-4DB1-96E7-FBCAF984B709"


def digested(image: OciImage, workdir: Path) -> list[Entry]:
    with flatten(image, workdir) as rootfs:
        return [
            replace(e, size=e.size if e.is_file else 0)
            for e in with_digests(rootfs)
            if e.path != "lost+found" and not e.path.startswith("lost+found/")
        ]


@pytest.mark.slow
def test_debian_system_round_trip_through_a_qcow2(tmp_path: Path) -> None:
    debian_kernel(tmp_path, ())  # builds the recipe's image when the engine lacks it
    archive = tmp_path / "image.tar"
    with archive.open("wb") as out:
        subprocess.run(["docker", "save", KERNEL_IMAGE], stdout=out, check=True)
    with archive.open("rb") as stream:
        image = layout_from_docker_archive(stream, tmp_path / "layout", None)
    archive.unlink()
    tar = tmp_path / "rootfs.tar"
    with flatten(image, tmp_path / "f0") as rootfs, tar.open("wb") as out:
        rootfs.write_tar(out)
    fs_bytes = tar.stat().st_size * 3 // 2 + 256 * MIB
    raw = tmp_path / "disk.raw"
    with raw.open("wb") as f:
        f.truncate(fs_bytes + 2 * MIB)
    subprocess.run(
        ["sfdisk", "-q", str(raw)],
        input=f"label: gpt\nstart=2048, type={X86_64_ROOT}\n",
        text=True,
        check=True,
    )
    with tar.open("rb") as stream:
        subprocess.run(
            [
                "mke2fs",
                "-q",
                "-F",
                "-t",
                "ext4",
                "-d",
                "-",
                "-E",
                f"offset={MIB}",
                str(raw),
                f"{fs_bytes // 1024}k",
            ],
            stdin=stream,
            check=True,
        )
    tar.unlink()
    qcow2 = tmp_path / "disk.qcow2"
    subprocess.run(["qemu-img", "convert", "-O", "qcow2", str(raw), str(qcow2)], check=True)
    raw.unlink()
    back = image_from_disk(qcow2, tmp_path / "work")
    assert back.config.architecture == "amd64"
    got, want = digested(back, tmp_path / "f1"), digested(image, tmp_path / "f2")
    assert len(want) > 10_000
    assert got == want
