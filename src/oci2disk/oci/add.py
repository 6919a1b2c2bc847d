"""Add host files to an existing image without rebuilding it (``--add SRC:DEST[:UID:GID]``).

Each addition is one extra layer made by ``umoci insert`` on a copy of the image in an
OCI layout; the image's own layers are kept byte for byte. umoci's id maps say whom
the new files belong to: ``--uid-map UID:HOSTUID:1`` makes the files the running user
owns belong to UID in the image (root, 0:0, unless the addition names owners).
``--rootless`` is not used: in that mode umoci 0.4.7 ignores the maps and writes 0:0,
and reading files needs no privilege anyway. Nothing needs root, and a gem5 user adds a
benchmark folder to a stock image this way.

umoci before 0.4.8 (Debian bookworm has 0.4.7) ends an inserted layer without the
tar footer, not even the padding of the last file (opencontainers/umoci#436, fixed by
#534); GNU tar, Python's tarfile and oci2disk's flattener reject such a layer. The
layer is completed here (padding and two zero blocks, gzip again, the config's
diff_id and the manifest updated); a layer that is already complete is left alone.

Host tools: umoci.
"""

from __future__ import annotations

import datetime
import os
import posixpath
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from oci2disk import run
from oci2disk.bytestreams import HashingWriter
from oci2disk.errors import ImageError, UsageError
from oci2disk.oci.layers import open_layer
from oci2disk.oci.layout import (
    MT_OCI_LAYER_GZIP,
    Descriptor,
    LayoutWriter,
    OciImage,
    canonical_json,
    copy_layout_image,
    open_layout,
    read_json_blob,
    remember_verified,
)

BLOCK = 512
FOOTER = bytes(2 * BLOCK)

ADD_SYNTAX = "SRC:DEST[:UID:GID], e.g. ./bench:/opt/bench or ./bench:/opt/bench:1000:1000"


@dataclass(frozen=True)
class Addition:
    """A host file or directory ``source`` put at ``dest`` in the image, owned uid:gid."""

    source: Path
    dest: str  # absolute path in the image
    uid: int = 0
    gid: int = 0

    @classmethod
    def parse(cls, text: str) -> Addition:
        """Parse ``SRC:DEST[:UID:GID]`` as the command line and recipe write it."""
        parts = text.split(":")
        if len(parts) not in (2, 4) or not parts[0] or not parts[1]:
            raise UsageError(f"bad --add {text!r}", hint=f"write it as {ADD_SYNTAX}")
        uid = gid = 0
        if len(parts) == 4:
            try:
                uid, gid = int(parts[2]), int(parts[3])
            except ValueError:
                raise UsageError(
                    f"bad --add {text!r}: owner {parts[2]}:{parts[3]} is not numeric",
                    hint=f"write it as {ADD_SYNTAX}",
                ) from None
            if not (0 <= uid < 2**32 - 1 and 0 <= gid < 2**32 - 1):
                raise UsageError(f"bad --add {text!r}: owner out of range")
        return cls(Path(parts[0]), parts[1], uid, gid)

    def check(self) -> None:
        if not posixpath.isabs(self.dest) or ".." in self.dest.split("/"):
            raise UsageError(
                f"--add destination {self.dest!r} is not an absolute path in the image",
                hint=f"write it as {ADD_SYNTAX}",
            )
        if posixpath.normpath(self.dest) == "/":
            raise UsageError("--add cannot replace the image's root directory")
        if not self.source.exists() and not self.source.is_symlink():
            raise UsageError(f"--add source {self.source} does not exist")


def add_files(
    image: OciImage,
    additions: Sequence[Addition],
    layout: Path,
    *,
    tag: str = "added",
) -> OciImage:
    """Copy ``image`` into the OCI layout ``layout`` as ``tag`` and add one layer per addition.

    Returns the new image (``oci:LAYOUT:TAG``): convert it, and verify artifacts against
    it. The files of each source that the running user owns get the addition's owner
    in the image; umoci refuses a source holding files of other owners.
    """
    for addition in additions:
        addition.check()
    copy_layout_image(image, layout, tag)
    epoch = os.environ.get("SOURCE_DATE_EPOCH", "")
    for addition in additions:
        argv = [
            "umoci", "insert",
            "--uid-map", f"{addition.uid}:{os.geteuid()}:1",
            "--gid-map", f"{addition.gid}:{os.getegid()}:1",
            "--history.created_by", f"oci2disk --add {addition.source.name}:{addition.dest}",
            "--image", f"{os.fspath(layout)}:{tag}",
        ]  # fmt: skip
        if epoch.isdigit():
            stamp = datetime.datetime.fromtimestamp(int(epoch), datetime.UTC)
            argv += ["--history.created", stamp.strftime("%Y-%m-%dT%H:%M:%SZ")]
        argv += [os.fspath(addition.source), posixpath.normpath(addition.dest)]
        run.run(
            argv,
            what=f"umoci could not add {addition.source} at {addition.dest}",
            hint="every file of the source must belong to the user running oci2disk "
            "(the addition's UID:GID says whom it belongs to in the image)",
        )
        complete_last_layer(layout, tag)
    run.run(["umoci", "gc", "--layout", os.fspath(layout)], what="umoci gc failed")
    added = open_layout(layout, tag)
    if len(added.layers) != len(image.layers) + len(additions):
        raise ImageError(
            f"{layout}: umoci left {len(added.layers)} layers, expected "
            f"{len(image.layers) + len(additions)}"
        )
    return added


def complete_last_layer(layout: Path, tag: str) -> OciImage:
    """Give the image's last layer the tar footer it lacks, if it lacks one (see above)."""
    image = open_layout(layout, tag)
    desc = image.layers[-1]
    blobs = layout / "blobs" / "sha256"
    fd, tmpname = tempfile.mkstemp(dir=blobs, prefix=".complete-")
    try:
        with os.fdopen(fd, "wb") as out:
            compressed = HashingWriter(out)
            from isal import igzip

            gz = igzip.IGzipFile(fileobj=compressed, mode="wb", mtime=0)  # type: ignore[no-untyped-call]
            plain = HashingWriter(gz)
            tail = b""
            with open_layer(image, desc) as src:
                while chunk := src.read(1 << 20):
                    plain.write(chunk)
                    tail = (tail + chunk)[-len(FOOTER) :]
            if plain.size % BLOCK == 0 and plain.size >= len(FOOTER) and tail == FOOTER:
                return image  # a complete tar already (a fixed umoci)
            padding = bytes(-plain.size % BLOCK)
            plain.write(padding)
            plain.write(FOOTER)
            gz.close()
        digest = "sha256:" + compressed.sha.hexdigest()
        target = blobs / digest.removeprefix("sha256:")
        os.replace(tmpname, target)
    except BaseException:
        Path(tmpname).unlink(missing_ok=True)
        raise
    remember_verified(target, digest)
    diff_id = "sha256:" + plain.sha.hexdigest()
    return _replace_last_layer(
        image, Descriptor(MT_OCI_LAYER_GZIP, digest, compressed.size), diff_id, tag
    )


def _replace_last_layer(image: OciImage, layer: Descriptor, diff_id: str, tag: str) -> OciImage:
    config: dict[str, Any] = read_json_blob(image.layout, image.config_descriptor)
    config["rootfs"]["diff_ids"][-1] = diff_id
    manifest: dict[str, Any] = read_json_blob(image.layout, image.manifest)
    writer = LayoutWriter(image.layout)
    # umoci's config and manifest are rewritten canonically; their content is unchanged
    config_desc = writer.add_bytes(canonical_json(config), image.config_descriptor.media_type)
    manifest["config"] = config_desc.to_json()
    manifest["layers"][-1] = layer.to_json()
    new = writer.add_bytes(canonical_json(manifest), image.manifest.media_type)
    writer._add_to_index(
        Descriptor(new.media_type, new.digest, new.size, {"org.opencontainers.image.ref.name": tag})
    )
    return open_layout(image.layout, tag)
