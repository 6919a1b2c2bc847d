"""Resolve an image reference to an OCI image on disk, whatever its transport.

One reader per transport, in :data:`READERS`.

Host tools: those of the transport (skopeo, dockerd), see :mod:`.transports`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

from oci2disk import engine
from oci2disk.errors import ImageError
from oci2disk.oci import cache, transports
from oci2disk.oci.layout import (
    OciImage,
    Platform,
    image_from_oci_archive,
    layout_from_docker_archive,
    open_layout,
)
from oci2disk.refs import ImageRef, Transport


def open_image(ref: ImageRef, workdir: Path, platform: Platform | None = None) -> OciImage:
    """Return ``ref`` as an OciImage; copies land in ``workdir`` only when needed.

    With ``platform``, an image for another platform is an error whatever the
    transport: a single-image layout or archive has no index to choose from, and
    converting it anyway would give a disk for the wrong machine.
    """
    image = _open(ref, workdir, platform)
    return transports.check_platform(image, platform, str(ref))


class Reader(Protocol):
    """Reads one transport's images: ``ref`` as an OCI image, copied into ``workdir``
    only when it is not an OCI layout already."""

    def __call__(self, ref: ImageRef, workdir: Path, platform: Platform | None) -> OciImage: ...


def _open(ref: ImageRef, workdir: Path, platform: Platform | None) -> OciImage:
    reader = READERS.get(ref.transport)
    if reader is None:
        raise ImageError(f"{ref}: transport {ref.transport.value}: is not readable here")
    return reader(ref, workdir, platform)


def from_layout(ref: ImageRef, workdir: Path, platform: Platform | None) -> OciImage:
    return open_layout(ref.path, ref.tag, platform)


def from_engine(ref: ImageRef, workdir: Path, platform: Platform | None) -> OciImage:
    name = f"{ref.name}:{ref.tag}" if ref.tag else ref.name
    return engine.save_to_layout(name, workdir / "image", tag=None)


def from_docker_archive(ref: ImageRef, workdir: Path, platform: Platform | None) -> OciImage:
    _require_file(ref)
    store = cache.active()
    with ref.path.open("rb") as stream:
        if store is not None:  # its layers kept by digest, like the engine's images
            return store.add_docker_archive(stream)
        return layout_from_docker_archive(stream, workdir / "image", tag=None)


def from_oci_archive(ref: ImageRef, workdir: Path, platform: Platform | None) -> OciImage:
    _require_file(ref)
    store = cache.active()
    with ref.path.open("rb") as stream:
        if store is not None:  # its layers kept by digest, like the engine's images
            return store.add_oci_archive(stream, str(ref.path), platform)
        return image_from_oci_archive(stream, workdir / "image", str(ref.path), platform)


READERS: dict[Transport, Reader] = {
    Transport.OCI: from_layout,
    Transport.DOCKER_DAEMON: from_engine,
    Transport.DOCKER: transports.from_registry,
    Transport.CONTAINERS_STORAGE: transports.from_containers_storage,
    Transport.ROOTFS: transports.from_rootfs,
    Transport.DOCKER_ARCHIVE: from_docker_archive,
    Transport.OCI_ARCHIVE: from_oci_archive,
}


def _require_file(ref: ImageRef) -> None:
    if not ref.path.is_file():
        raise ImageError(f"{ref}: {ref.path} is not a file")
