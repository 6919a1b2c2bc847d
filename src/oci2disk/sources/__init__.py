"""Sources that are not container images: disk images (``disk:``) and live ISOs (``iso:``).

Each one yields an :class:`~oci2disk.oci.layout.OciImage` (one uncompressed layer holding
the canonical rootfs tar, and an image config), so that flatten, every output and
``verify`` work on it unchanged.
"""

from __future__ import annotations

from pathlib import Path

from oci2disk.oci import source as oci_source
from oci2disk.oci.layout import OciImage, Platform
from oci2disk.oci.transports import check_platform
from oci2disk.refs import ImageRef, Transport

__all__ = ["READERS", "open_image"]


def from_disk(ref: ImageRef, workdir: Path, platform: Platform | None) -> OciImage:
    from oci2disk.sources.disk import image_from_disk, parse_disk_ref

    disk, partition = parse_disk_ref(ref.name)
    return image_from_disk(disk, workdir / "source", partition=partition, platform=platform)


def from_iso(ref: ImageRef, workdir: Path, platform: Platform | None) -> OciImage:
    from oci2disk.sources.iso import image_from_iso

    return image_from_iso(ref.path, workdir / "source", platform=platform)


# Every transport's reader: the image transports' (oci.source) and the two of this layer.
READERS: dict[Transport, oci_source.Reader] = {
    **oci_source.READERS,
    Transport.DISK: from_disk,
    Transport.ISO: from_iso,
}


def open_image(ref: ImageRef, workdir: Path, platform: Platform | None = None) -> OciImage:
    """Any reference as an OCI image: an image transport (``oci:``, ``docker-daemon:``...),
    an existing disk (``disk:``) or a live ISO (``iso:``). With ``platform``, an image for
    another platform is an error."""
    image = READERS[ref.transport](ref, workdir, platform)
    return check_platform(image, platform, str(ref))
