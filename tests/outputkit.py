"""Convert hand-made images in-process, for the tests of the cgz, tar and dir outputs."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from layerkit import Member, make_image
from oci2disk.convert import ConvertOptions, ConvertResult, convert
from oci2disk.oci.layout import OciImage
from oci2disk.recipe import Format
from oci2disk.rootfs import Entry, with_digests
from oci2disk.rootfs.flatten import flatten
from oci2disk.workspace import Workspace


def image_of(path: Path, members: Sequence[Member]) -> OciImage:
    return make_image(path / "layout", [members])


def convert_to(
    image: OciImage, outputs: dict[Format, Path], options: ConvertOptions | None = None
) -> ConvertResult:
    with Workspace() as ws, flatten(image, ws.subdir("flat")) as rootfs:
        return convert(image, rootfs, outputs, options or ConvertOptions(), ws)


def image_records(image: OciImage) -> list[Entry]:
    """The image's entries as verify sees them: the flattened rootfs, with digests."""
    with Workspace() as ws, flatten(image, ws.subdir("flat")) as rootfs:
        return list(with_digests(rootfs))
