"""Resolve an image reference to an OCI image on disk, whatever its transport.

One reader per transport, in :data:`READERS`.

Host tools: those of the transport (skopeo, dockerd), see :mod:`.transports`.
"""

from __future__ import annotations

import errno
import tarfile
from pathlib import Path
from typing import Protocol

from oci2disk import engine
from oci2disk.errors import ImageError
from oci2disk.oci import cache, transports
from oci2disk.oci.layout import (
    OciImage,
    Platform,
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
    dest = workdir / "image"
    _extract_layout_archive(ref.path, dest)
    return open_layout(dest, None, platform)


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


def _extract_layout_archive(archive: Path, dest: Path) -> None:
    """Unpack an oci-archive; only the layout's own plain files, never links or escapes."""
    dest.mkdir(parents=True, exist_ok=True)
    try:
        with tarfile.open(archive, "r:*") as tar:
            for member in tar:
                name = Path(member.name.lstrip("./") or ".")
                if member.isdir():
                    continue
                allowed = name.parts[:1] in (("blobs",), ("index.json",), ("oci-layout",))
                if not member.isfile() or ".." in name.parts or not allowed:
                    continue
                target = dest / name
                target.parent.mkdir(parents=True, exist_ok=True)
                source = tar.extractfile(member)
                assert source is not None
                with source, target.open("wb") as out:
                    while chunk := source.read(1 << 20):
                        out.write(chunk)
    except (tarfile.TarError, OSError) as exc:
        if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
            raise  # the workspace's filesystem is full: the archive is fine
        raise ImageError(f"{archive}: not a readable oci-archive ({exc})") from None
