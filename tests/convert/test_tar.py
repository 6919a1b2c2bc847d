"""The tar output: the canonical rootfs, plain or compressed, that docker import takes."""

from __future__ import annotations

import subprocess
import uuid
from pathlib import Path

import pytest

from layerkit import Member, device, directory, file, hardlink, symlink
from oci2disk.compression import open_decompressed
from oci2disk.convert import ConvertOptions, convert, default_outputs
from oci2disk.errors import RecipeError
from oci2disk.recipe import ArchiveCompression, Format, TarSpec, load
from oci2disk.rootfs.archives import TarTree
from oci2disk.rootfs.flatten import flatten
from oci2disk.verify import compare
from oci2disk.workspace import Workspace
from outputkit import convert_to, image_of, image_records

SAMPLE: list[Member] = [
    directory("etc"),
    file("etc/passwd", b"root:x:0:0::/root:/bin/sh\n"),
    directory("home/alice", mode=0o750, uid=1000, gid=1000),
    file("home/alice/notes", b"n" * 100_000, mode=0o600, uid=1000, gid=1000),
    file("usr/bin/su", b"su", mode=0o4755),
    hardlink("usr/bin/su-again", "usr/bin/su", mode=0o4755),
    file("usr/bin/tagged", b"t", xattrs={"user.origin": b"test"}),
    symlink("bin", "usr/bin"),
    device("dev/null", 1, 3, mode=0o666),
]
# What `docker export` has that the imported tar did not: Docker's own files.
DOCKER_ADDITIONS = (
    ".dockerenv",
    "etc/hosts",
    "etc/hostname",
    "etc/resolv.conf",
    "etc/mtab",
    "dev/console",
)


@pytest.mark.parametrize(
    ("compression", "name", "magic"),
    [
        (ArchiveCompression.NONE, "disk.tar", b""),
        (ArchiveCompression.GZIP, "disk.tar.gz", b"\x1f\x8b"),
        (ArchiveCompression.ZSTD, "disk.tar.zst", b"\x28\xb5\x2f\xfd"),
        (ArchiveCompression.XZ, "disk.tar.xz", b"\xfd7zXZ"),
    ],
)
def test_tar_holds_the_image_plain_or_compressed(
    tmp_path: Path, compression: ArchiveCompression, name: str, magic: bytes
) -> None:
    image = image_of(tmp_path, SAMPLE)
    options = ConvertOptions(tar=TarSpec(compression))
    outputs = default_outputs(tmp_path, "disk", (Format.TAR,), options)
    out = outputs[Format.TAR]
    assert out.name == name
    result = convert_to(image, outputs, options)
    assert out.read_bytes().startswith(magic)
    # no ext filesystem for an fstab to name: a tar carries one only when asked (--fstab)
    assert result.generated == ()
    with open_decompressed(out) as stream:
        have = list(TarTree.from_stream(stream).entries())
    assert compare(image_records(image), have, ignore=result.generated) == []
    # GNU tar reads it (and finds the compression by itself)
    listing = subprocess.run(["tar", "-tf", str(out)], capture_output=True, text=True, check=True)
    assert "./usr/bin/su-again" in listing.stdout.splitlines() or "usr/bin/su-again" in (
        listing.stdout
    )


def test_compressed_tar_is_reproducible(tmp_path: Path) -> None:
    image = image_of(tmp_path, SAMPLE)
    options = ConvertOptions(tar=TarSpec(ArchiveCompression.GZIP, 6))
    convert_to(image, {Format.TAR: tmp_path / "a.tar.gz"}, options)
    convert_to(image, {Format.TAR: tmp_path / "b.tar.gz"}, options)
    assert (tmp_path / "a.tar.gz").read_bytes() == (tmp_path / "b.tar.gz").read_bytes()


@pytest.mark.slow
@pytest.mark.docker
def test_docker_import_runs_it_and_export_gives_it_back(base_image: str, outdir: Path) -> None:
    from oci2disk.oci.source import open_image
    from oci2disk.refs import parse_ref

    out = outdir / "rootfs.tar.gz"
    options = ConvertOptions(tar=TarSpec(ArchiveCompression.GZIP))
    with Workspace() as ws:
        image = open_image(parse_ref(f"docker-daemon:{base_image}"), ws.path)
        with flatten(image, ws.subdir("flat")) as rootfs:
            result = convert(image, rootfs, {Format.TAR: out}, options, ws)
    tag = f"oci2disk-test/imported:{uuid.uuid4().hex[:12]}"
    subprocess.run(["docker", "import", str(out), tag], check=True, capture_output=True)
    container = ""
    try:
        ran = subprocess.run(
            ["docker", "run", "--rm", "--network=none", tag, "cat", "/etc/os-release"],
            capture_output=True,
            text=True,
            check=True,
        )
        assert "VERSION_CODENAME=bookworm" in ran.stdout
        container = subprocess.run(
            ["docker", "create", tag, "true"], capture_output=True, text=True, check=True
        ).stdout.strip()
        exported = outdir / "export.tar"
        with exported.open("wb") as f:
            subprocess.run(["docker", "export", container], stdout=f, check=True)
    finally:
        if container:
            subprocess.run(["docker", "rm", container], capture_output=True)
        subprocess.run(["docker", "rmi", tag], capture_output=True)
    with open_decompressed(out) as stream:
        ours = list(TarTree.from_stream(stream).entries())
    with exported.open("rb") as stream:
        theirs = list(TarTree.from_stream(stream).entries())
    assert len(ours) > 5000
    assert "etc/fstab" not in result.generated
    # entry by entry equal, except the files Docker itself adds to every container
    assert compare(ours, theirs, ignore=DOCKER_ADDITIONS) == []
    assert {d.path for d in compare(ours, theirs)} <= set(DOCKER_ADDITIONS)


def test_recipe_tar_table(tmp_path: Path) -> None:
    (tmp_path / "Dockerfile").write_text("FROM scratch\n")
    (tmp_path / "recipe.toml").write_text('[tar]\ncompression = "gzip"\nlevel = 6\n')
    rcp = load(tmp_path)
    assert rcp.tar == TarSpec(ArchiveCompression.GZIP, 6)
    assert ConvertOptions.from_recipe(rcp).tar == rcp.tar
    (tmp_path / "recipe.toml").write_text('[tar]\ncompression = "bz2"\n')
    with pytest.raises(RecipeError, match=r"tar\.compression: expected one of 'gzip'"):
        load(tmp_path)
