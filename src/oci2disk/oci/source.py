"""Resolve an image reference to an OCI image on disk, whatever its transport."""

from __future__ import annotations

import tarfile
from pathlib import Path

from oci2disk.errors import ImageError
from oci2disk.oci import transports
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


def _open(ref: ImageRef, workdir: Path, platform: Platform | None) -> OciImage:
    if ref.transport is Transport.OCI:
        return open_layout(ref.path, ref.tag, platform)
    if ref.transport is Transport.DOCKER_DAEMON:
        from oci2disk.build import docker

        name = f"{ref.name}:{ref.tag}" if ref.tag else ref.name
        image = docker.save_to_layout(name, workdir / "image", tag=None)
        return transports.check_platform(image, platform, str(ref))
    if ref.transport is Transport.DOCKER:
        return transports.from_registry(ref, workdir, platform)
    if ref.transport is Transport.CONTAINERS_STORAGE:
        return transports.from_containers_storage(ref, workdir, platform)
    if ref.transport is Transport.ROOTFS:
        return transports.from_rootfs(ref, workdir, platform)
    if ref.transport is Transport.DISK:
        from oci2disk.sources.disk import image_from_disk, parse_disk_ref

        disk, partition = parse_disk_ref(ref.name)
        return image_from_disk(disk, workdir / "source", partition=partition, platform=platform)
    if ref.transport is Transport.ISO:
        from oci2disk.sources.iso import image_from_iso

        return image_from_iso(ref.path, workdir / "source", platform=platform)
    _require_file(ref)
    if ref.transport is Transport.DOCKER_ARCHIVE:
        with ref.path.open("rb") as stream:
            return layout_from_docker_archive(stream, workdir / "image", tag=None)
    if ref.transport is Transport.OCI_ARCHIVE:
        dest = workdir / "image"
        _extract_layout_archive(ref.path, dest)
        return open_layout(dest, None, platform)
    raise ImageError(f"{ref}: transport {ref.transport.value}: is not readable here")


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
        raise ImageError(f"{archive}: not a readable oci-archive ({exc})") from None
