"""`oci2disk build` end to end with the real Docker Engine, mke2fs and qemu-img."""

from __future__ import annotations

import hashlib
import json
import subprocess
from pathlib import Path

import pytest

from clikit import oci2disk
from oci2disk.diskimage.extfs import open_filesystem
from oci2disk.rootfs import Kind

pytestmark = pytest.mark.docker

DOCKERFILE = """\
FROM {base}
ARG GREETING=hello
RUN useradd -u 1500 -m builder \\
 && echo "$GREETING from the build" > /etc/motd \\
 && install -d -o 1500 -g 1500 -m 0750 /srv/builder \\
 && echo secret > /srv/builder/key && chown 1500:1500 /srv/builder/key \\
 && ln /usr/bin/gpasswd /usr/bin/gpasswd-hardlink \\
 && mknod /srv/console c 5 1
RUN rm -rf /usr/share/doc && mkdir -p /opt/app && echo v2 > /opt/app/VERSION
"""


@pytest.fixture
def recipe(base_image: str, tmp_path: Path) -> Path:
    folder = tmp_path / "small"
    folder.mkdir()
    (folder / "Dockerfile").write_text(DOCKERFILE.format(base=base_image))
    (folder / "recipe.toml").write_text(
        '[build]\nargs = { GREETING = "hi" }\n\n'
        '[disk]\ntable = "gpt"\nlabel = "smallroot"\n\n'
        '[outputs]\nformats = ["raw", "qcow2"]\nname = "small"\n'
    )
    return folder


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_build_recipe_to_raw_and_qcow2(recipe: Path, outdir: Path) -> None:
    result = oci2disk(
        "--json", "build", str(recipe), "-o", str(outdir), "--build-arg", "GREETING=howdy"
    )
    assert result.code == 0, result.stderr
    manifest = json.loads(result.stdout)
    assert manifest == json.loads((outdir / "small.manifest.json").read_text())
    raw, qcow2 = outdir / "small.raw", outdir / "small.qcow2"
    assert [(a["format"], a["path"]) for a in manifest["artifacts"]] == [
        ("raw", str(raw)),
        ("qcow2", str(qcow2)),
    ]
    for artifact in manifest["artifacts"]:
        path = Path(artifact["path"])
        assert artifact["size"] == path.stat().st_size
        assert artifact["sha256"] == sha256(path)
    assert manifest["source"]["digest"].startswith("sha256:")
    assert manifest["root_partition"] == 1
    assert manifest["filesystem"]["table"] == "gpt"

    # the qcow2 holds exactly the raw disk
    subprocess.run(
        ["qemu-img", "compare", "-f", "raw", "-F", "qcow2", str(raw), str(qcow2)],
        check=True,
        capture_output=True,
    )
    # GPT written into the file, partition 1 at 1 MiB
    table = json.loads(
        subprocess.run(
            ["sfdisk", "--json", str(raw)], check=True, capture_output=True, text=True
        ).stdout
    )["partitiontable"]
    assert table["label"] == "gpt" and table["partitions"][0]["start"] == 2048

    with open_filesystem(raw) as fs:
        assert fs.label == "smallroot"
        assert fs.uuid == manifest["filesystem"]["uuid"]
        with fs.open("etc/motd") as f:
            assert f.read() == b"howdy from the build\n"  # --build-arg overrides the recipe
        key = fs.lookup("srv/builder/key")
        assert key is not None and (key.uid, key.gid) == (1500, 1500)
        assert fs.lookup("usr/share/doc") is None  # removed in the second layer
        assert fs.lookup(".dockerenv") is None
        console = fs.lookup("srv/console")
        assert console is not None and (console.kind, console.devmajor, console.devminor) == (
            Kind.CHAR,
            5,
            1,
        )
        with fs.open("etc/fstab") as f:
            assert f"UUID={fs.uuid}\t/\text4" in f.read().decode()

    source = manifest["source"]["ref"]
    for artifact in (raw, qcow2):
        check = oci2disk("verify", str(artifact), "--against", source, "--recipe", str(recipe))
        assert check.code == 0, check.stdout + check.stderr


def test_same_image_gives_same_disk(base_image: str, outdir: Path) -> None:
    """Deterministic by construction: UUIDs, timestamps and layout derive from the image."""
    first, second = outdir / "a.raw", outdir / "b.raw"
    for target in (first, second):
        assert (
            oci2disk(
                "-q", "convert", f"docker-daemon:{base_image}", "-f", "raw", "-o", str(target)
            ).code
            == 0
        )
    assert sha256(first) == sha256(second)


def test_fs_format_is_a_bare_filesystem(base_image: str, outdir: Path) -> None:
    target = outdir / "root.ext4"
    result = oci2disk(
        "-q",
        "convert",
        f"docker-daemon:{base_image}",
        "-f",
        "fs",
        "-o",
        str(target),
        "--fs",
        "ext3",
        "--label",
        "bare",
        "--fstab",
        "label",
    )
    assert result.code == 0, result.stderr
    with open_filesystem(target) as fs:
        assert fs.offset == 0 and fs.label == "bare"
        with fs.open("etc/fstab") as f:
            assert "LABEL=bare\t/\text3" in f.read().decode()
    probe = subprocess.run(
        ["blkid", "-p", "-o", "value", "-s", "TYPE", str(target)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert probe.stdout.strip() == "ext3"
