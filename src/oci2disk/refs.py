"""Image references in the transports of skopeo / containers-image.

``docker-daemon:NAME[:TAG]``, ``oci:DIR[:TAG]``, ``docker-archive:FILE``,
``oci-archive:FILE``, ``containers-storage:NAME[:TAG]`` (buildah/podman storage),
``docker://REGISTRY/NAME[:TAG|@DIGEST]``, ``rootfs:FILE[:CONFIG]`` (an already flat
rootfs tarball, with an optional image config JSON file), ``disk:FILE[:PARTITION]`` (a
disk image; the partition is split off when the source is opened) and ``iso:FILE``.
"""

from __future__ import annotations

import enum
import ipaddress
from dataclasses import dataclass
from pathlib import Path

from oci2disk.errors import RefError


class Transport(enum.Enum):
    DOCKER_DAEMON = "docker-daemon"
    OCI = "oci"
    DOCKER_ARCHIVE = "docker-archive"
    OCI_ARCHIVE = "oci-archive"
    CONTAINERS_STORAGE = "containers-storage"
    DOCKER = "docker"  # a registry: docker://REGISTRY/NAME:TAG
    ROOTFS = "rootfs"
    DISK = "disk"  # disk:FILE[:PARTITION], an existing disk image (sources/disk.py)
    ISO = "iso"  # iso:FILE, a live ISO (sources/iso.py)


TRANSPORT_HELP = (
    "docker-daemon:NAME[:TAG], oci:DIR[:TAG], docker-archive:FILE, oci-archive:FILE, "
    "containers-storage:NAME[:TAG], docker://REGISTRY/NAME[:TAG], rootfs:FILE[:CONFIG.json], "
    "disk:FILE[:PARTITION], iso:FILE"
)


@dataclass(frozen=True)
class ImageRef:
    transport: Transport
    name: str  # image name for docker-daemon, containers-storage and docker; a path otherwise
    tag: str | None = None
    config: str | None = None  # rootfs: an image config JSON file beside the tarball

    @property
    def path(self) -> Path:
        return Path(self.name)

    @property
    def image_name(self) -> str:
        """``NAME:TAG`` or ``NAME@DIGEST`` as engines and registries write it."""
        return f"{self.name}:{self.tag}" if self.tag else self.name

    @property
    def registry(self) -> str:
        """The registry host[:port] of a docker:// or engine reference ("" for Docker Hub)."""
        first, slash, _ = self.name.partition("/")
        if slash and ("." in first or ":" in first or first == "localhost"):
            return first
        return ""

    def __str__(self) -> str:
        if self.transport is Transport.DOCKER:
            return f"docker://{self.image_name}"
        text = f"{self.transport.value}:{self.name}"
        if self.tag:
            text += f":{self.tag}"
        if self.config:
            text += f":{self.config}"
        return text


def parse_ref(text: str) -> ImageRef:
    """Parse ``TRANSPORT:REST``; the error lists every transport."""
    transport_name, sep, rest = text.partition(":")
    try:
        transport = Transport(transport_name)
    except ValueError:
        transport = None
    if transport is Transport.DOCKER:
        # skopeo's syntax: docker://NAME; "docker:NAME" is a typo for it, not a path.
        rest = rest[2:] if rest.startswith("//") else ""
    if not sep or transport is None or not rest:
        raise RefError(
            f"bad image reference {text!r}",
            hint=f"write TRANSPORT:WHERE, one of: {TRANSPORT_HELP}",
        )
    if transport in (Transport.DOCKER_DAEMON, Transport.CONTAINERS_STORAGE, Transport.DOCKER):
        name, tag = _split_tag(rest)
        if not name or name.startswith("/") or name.endswith("/"):
            raise RefError(
                f"bad image reference {text!r}: {name!r} is not an image name",
                hint=f"write TRANSPORT:WHERE, one of: {TRANSPORT_HELP}",
            )
        if tag is None and "@" in name:
            return ImageRef(transport, name, None)
        return ImageRef(transport, name, tag or "latest")
    if transport is Transport.OCI:
        # oci:DIR[:TAG] -- a tag never contains "/", a directory may contain ":".
        head, colon, tail = rest.rpartition(":")
        if colon and head and "/" not in tail and not Path(rest).exists():
            return ImageRef(transport, head, tail)
        return ImageRef(transport, rest, None)
    if transport is Transport.ROOTFS:
        # rootfs:FILE[:CONFIG] -- the whole text is the tarball when such a file exists.
        head, colon, tail = rest.rpartition(":")
        if colon and head and tail and not Path(rest).exists() and Path(head).exists():
            return ImageRef(transport, head, None, tail)
        return ImageRef(transport, rest, None)
    return ImageRef(transport, rest, None)


def _split_tag(name: str) -> tuple[str, str | None]:
    if "@" in name:
        return name, None
    head, colon, tail = name.rpartition(":")
    if colon and "/" not in tail:
        return head, tail
    return name, None


def is_loopback_registry(registry: str) -> bool:
    """True for ``localhost[:port]``, ``127.x.x.x[:port]`` and ``[::1][:port]``.

    The Docker Engine talks plain HTTP to these without being told; skopeo and buildah
    need ``--tls-verify=false``, which oci2disk gives them for these registries only.
    """
    host = registry
    if host.startswith("["):
        host = host[1:].partition("]")[0]
    elif host.count(":") == 1:
        host = host.partition(":")[0]
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
