"""Every image transport has one reader, in one registry."""

from __future__ import annotations

from pathlib import Path

import pytest

from layerkit import directory, make_image
from oci2disk import sources
from oci2disk.errors import ImageError
from oci2disk.oci.source import READERS, open_image
from oci2disk.refs import Transport, parse_ref


def test_every_transport_has_a_reader() -> None:
    # disk: and iso: are read by the sources layer above (they need the rootfs code).
    assert set(READERS) == set(Transport) - {Transport.DISK, Transport.ISO}
    assert set(sources.READERS) == set(Transport)


def test_the_reader_of_the_reference_opens_it(tmp_path: Path) -> None:
    image = make_image(tmp_path / "layout", [[directory("etc")]])
    opened = open_image(parse_ref(f"oci:{tmp_path / 'layout'}:test"), tmp_path)
    assert opened.digest == image.digest
    with pytest.raises(ImageError, match="is not a file"):
        open_image(parse_ref(f"docker-archive:{tmp_path / 'missing.tar'}"), tmp_path)
