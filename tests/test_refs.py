"""Image references: every transport parses; a bad one lists them all."""

from __future__ import annotations

import pytest

from oci2disk.errors import RefError
from oci2disk.refs import ImageRef, Transport, parse_ref


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("docker-daemon:debian", ImageRef(Transport.DOCKER_DAEMON, "debian", "latest")),
        (
            "docker-daemon:oci2disk/debian:bookworm",
            ImageRef(Transport.DOCKER_DAEMON, "oci2disk/debian", "bookworm"),
        ),
        (
            "docker-daemon:127.0.0.1:5000/debian:12",
            ImageRef(Transport.DOCKER_DAEMON, "127.0.0.1:5000/debian", "12"),
        ),
        (
            "docker-daemon:127.0.0.1:5000/debian",
            ImageRef(Transport.DOCKER_DAEMON, "127.0.0.1:5000/debian", "latest"),
        ),
        ("oci:/srv/layout:bookworm", ImageRef(Transport.OCI, "/srv/layout", "bookworm")),
        ("oci:/srv/layout", ImageRef(Transport.OCI, "/srv/layout", None)),
        ("docker-archive:/tmp/x.tar", ImageRef(Transport.DOCKER_ARCHIVE, "/tmp/x.tar", None)),
        ("oci-archive:x.tar", ImageRef(Transport.OCI_ARCHIVE, "x.tar", None)),
        ("rootfs:/tmp/rootfs.tar.gz", ImageRef(Transport.ROOTFS, "/tmp/rootfs.tar.gz", None)),
    ],
)
def test_parse(text: str, expected: ImageRef) -> None:
    assert parse_ref(text) == expected


@pytest.mark.parametrize("text", ["debian:bookworm", "docker:foo", "oci:", "", "podman:x"])
def test_bad_reference_lists_transports(text: str) -> None:
    with pytest.raises(RefError) as info:
        parse_ref(text)
    for transport in ("docker-daemon:", "oci:", "docker-archive:", "oci-archive:", "rootfs:"):
        assert transport in str(info.value)
