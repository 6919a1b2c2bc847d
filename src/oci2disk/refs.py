"""Image references in the transports of skopeo / containers-image.

``docker-daemon:NAME[:TAG]``, ``oci:DIR[:TAG]``, ``docker-archive:FILE``,
``oci-archive:FILE`` and ``rootfs:FILE`` (an already flat rootfs tarball).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from pathlib import Path

from oci2disk.errors import RefError


class Transport(enum.Enum):
    DOCKER_DAEMON = "docker-daemon"
    OCI = "oci"
    DOCKER_ARCHIVE = "docker-archive"
    OCI_ARCHIVE = "oci-archive"
    ROOTFS = "rootfs"


TRANSPORT_HELP = (
    "docker-daemon:NAME[:TAG], oci:DIR[:TAG], docker-archive:FILE, oci-archive:FILE, rootfs:FILE"
)


@dataclass(frozen=True)
class ImageRef:
    transport: Transport
    name: str  # image name for docker-daemon, a path otherwise
    tag: str | None = None

    @property
    def path(self) -> Path:
        return Path(self.name)

    def __str__(self) -> str:
        text = f"{self.transport.value}:{self.name}"
        return f"{text}:{self.tag}" if self.tag else text


def parse_ref(text: str) -> ImageRef:
    """Parse ``TRANSPORT:REST``; the error lists every transport."""
    transport_name, sep, rest = text.partition(":")
    try:
        transport = Transport(transport_name)
    except ValueError:
        transport = None
    if not sep or transport is None or not rest:
        raise RefError(
            f"bad image reference {text!r}",
            hint=f"write TRANSPORT:WHERE, one of: {TRANSPORT_HELP}",
        )
    if transport is Transport.DOCKER_DAEMON:
        name, tag = _split_tag(rest)
        return ImageRef(transport, name, tag or "latest")
    if transport is Transport.OCI:
        # oci:DIR[:TAG] -- a tag never contains "/", a directory may contain ":".
        head, colon, tail = rest.rpartition(":")
        if colon and head and "/" not in tail and not Path(rest).exists():
            return ImageRef(transport, head, tail)
        return ImageRef(transport, rest, None)
    return ImageRef(transport, rest, None)


def _split_tag(name: str) -> tuple[str, str | None]:
    if "@" in name:
        return name, None
    head, colon, tail = name.rpartition(":")
    if colon and "/" not in tail:
        return head, tail
    return name, None
