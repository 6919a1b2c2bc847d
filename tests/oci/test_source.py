"""open_image: every transport honours --platform, also when it holds a single image;
an oci-archive is read as a stream, every blob checked against its name."""

from __future__ import annotations

import io
import tarfile
from collections.abc import Callable
from pathlib import Path

import pytest

from layerkit import file, make_image, write_docker_archive
from oci2disk.errors import ImageError
from oci2disk.oci.cache import Cache, using
from oci2disk.oci.layout import Platform
from oci2disk.oci.source import open_image
from oci2disk.refs import parse_ref

ARM64 = Platform.parse("linux/arm64")


def _oci_archive(layout: Path, archive: Path) -> None:
    with tarfile.open(archive, "w") as tar:
        for path in sorted(layout.rglob("*")):
            tar.add(path, arcname=path.relative_to(layout).as_posix(), recursive=False)


@pytest.mark.parametrize("transport", ["oci", "docker-archive", "oci-archive"])
def test_an_amd64_image_is_refused_when_arm64_is_asked_for(tmp_path: Path, transport: str) -> None:
    layout = tmp_path / "layout"
    make_image(layout, [[file("etc/hostname", b"x\n")]])  # an amd64 image, no index to choose
    source = {
        "oci": f"oci:{layout}:test",
        "docker-archive": f"docker-archive:{tmp_path / 'image.tar'}",
        "oci-archive": f"oci-archive:{tmp_path / 'image-oci.tar'}",
    }[transport]
    write_docker_archive(tmp_path / "image.tar", [[file("etc/hostname", b"x\n")]])
    _oci_archive(layout, tmp_path / "image-oci.tar")
    ref = parse_ref(source)
    with pytest.raises(ImageError, match=r"is an image for linux/amd64, not linux/arm64"):
        open_image(ref, tmp_path / "work", ARM64)
    # The platform it is for is accepted, and no platform means "whatever it is".
    assert open_image(ref, tmp_path / "work2", Platform.parse("linux/amd64")).config
    assert open_image(ref, tmp_path / "work3").config.platform.architecture == "amd64"


def _archive_with(tmp_path: Path, edit: Callable[[str, bytes], bytes | None]) -> Path:
    """An oci-archive of a small image whose members ``edit`` may change or drop."""
    layout = tmp_path / "layout"
    make_image(layout, [[file("etc/hostname", b"x\n")]])
    archive = tmp_path / "image-oci.tar"
    with tarfile.open(archive, "w") as tar:
        for path in sorted(p for p in layout.rglob("*") if p.is_file()):
            name = path.relative_to(layout).as_posix()
            data = edit(name, path.read_bytes())
            if data is not None:
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return archive


def _swap_layer(name: str, data: bytes) -> bytes:
    return data.replace(b"x\n", b"y\n") if b"etc/hostname" in data else data


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        pytest.param(_swap_layer, r"the blob stored as blobs/sha256/\w+ has digest", id="altered"),
        pytest.param(
            lambda name, data: None if name == "index.json" else data,
            "it has no index.json",
            id="no-index",
        ),
        pytest.param(
            lambda name, data: b"{" if name == "index.json" else data,
            "index.json: not valid JSON",
            id="bad-index",
        ),
    ],
)
def test_an_oci_archive_that_lies_is_refused_as_it_streams(
    tmp_path: Path, edit: Callable[[str, bytes], bytes | None], message: str
) -> None:
    archive = _archive_with(tmp_path, edit)
    with pytest.raises(ImageError, match=message):
        open_image(parse_ref(f"oci-archive:{archive}"), tmp_path / "work")


def test_an_oci_archive_streams_into_the_cache_indexed(tmp_path: Path) -> None:
    archive = _archive_with(tmp_path, lambda name, data: data)
    store = Cache(tmp_path / "cache")
    with using(store):
        image = open_image(parse_ref(f"oci-archive:{archive}"), tmp_path / "work")
    assert image.layout == tmp_path / "cache"
    assert not (tmp_path / "work").exists()  # no layout written first
    assert [p.name for p in (tmp_path / "cache" / "indexes").iterdir()] == [
        image.layers[0].digest.split(":")[1]
    ]
    assert Cache(tmp_path / "cache").image(image.config_descriptor.digest) is not None
