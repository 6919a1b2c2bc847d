"""open_image: every transport honours --platform, also when it holds a single image."""

from __future__ import annotations

import tarfile
from pathlib import Path

import pytest

from layerkit import file, make_image, write_docker_archive
from oci2disk.errors import ImageError
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
