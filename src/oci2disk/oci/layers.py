"""Layer I/O: a layer blob as its uncompressed tar, its digest and diff_id checked.

An uncompressed layer is read in place (its blob's digest is its diff_id); a gzip or
zstd layer is decompressed once, and hashed while it is, into an anonymous temporary
file that the flattener reads by offset.

Host tools: none (ISA-L's igzip module when installed, for gzip).
"""

from __future__ import annotations

import gzip
import hashlib
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, cast

from oci2disk.bytestreams import CHUNK
from oci2disk.compression import DECOMPRESS_ERRORS
from oci2disk.errors import ImageError
from oci2disk.oci.layout import LAYER_COMPRESSION, Descriptor, OciImage, open_verified_blob


@contextmanager
def open_layer(image: OciImage, desc: Descriptor) -> Iterator[IO[bytes]]:
    """Open a layer blob as an uncompressed tar byte stream (digest checked first)."""
    kind = LAYER_COMPRESSION[desc.media_type]
    with open_verified_blob(image.layout, desc) as raw:
        if kind == "none":
            yield raw
        elif kind == "gzip":
            with _gzip_reader(raw) as gz:
                yield gz
        else:
            yield _zstd_reader(raw)


def _gzip_reader(raw: IO[bytes]) -> IO[bytes]:
    """A gzip decompressor: ISA-L's when present (about twice zlib's speed here)."""
    try:
        from isal import igzip
    except ImportError:
        return cast(IO[bytes], gzip.GzipFile(fileobj=raw, mode="rb"))
    return cast(IO[bytes], igzip.IGzipFile(fileobj=raw, mode="rb"))  # type: ignore[no-untyped-call]


def _zstd_reader(raw: IO[bytes]) -> IO[bytes]:
    try:
        import zstandard
    except ImportError:
        raise ImageError(
            "this image has zstd-compressed layers and the zstandard module is missing",
            hint="pip install zstandard (it is part of oci2disk's dependencies)",
        ) from None
    return cast(IO[bytes], zstandard.ZstdDecompressor().stream_reader(raw))


def diff_id_error(desc: Descriptor, index: int, actual: str, expected: str) -> ImageError:
    return ImageError(
        f"layer {desc.digest}: its uncompressed content has digest {actual}, "
        f"but the image config's diff_ids[{index}] is {expected}",
        hint="the image is corrupt or was assembled wrongly; build or export it again",
    )


def layer_file(image: OciImage, index: int, workdir: Path) -> IO[bytes]:
    """The layer's uncompressed tar, open: the checked blob itself, or a decompressed copy."""
    desc = image.layers[index]
    diff_id = image.config.diff_ids[index]
    compression = LAYER_COMPRESSION[desc.media_type]
    if compression == "none":
        blob = open_verified_blob(image.layout, desc)
        # The blob's sha256 is its uncompressed digest, and it was just checked.
        if desc.digest != diff_id:
            blob.close()
            raise diff_id_error(desc, index, desc.digest, diff_id)
        return blob
    out = tempfile.TemporaryFile(dir=workdir, prefix="layer-")  # noqa: SIM115  # kept open
    try:
        digest = hashlib.sha256()
        with open_layer(image, desc) as stream:  # checks the blob's size and digest first
            try:
                while chunk := stream.read(CHUNK):
                    digest.update(chunk)
                    out.write(chunk)
            except DECOMPRESS_ERRORS as exc:
                raise ImageError(
                    f"layer {desc.digest}: cannot decompress its {compression} data ({exc})",
                    hint="the layer blob is corrupt; export the image again",
                ) from None
        out.flush()
        actual = "sha256:" + digest.hexdigest()
        if actual != diff_id:
            raise diff_id_error(desc, index, actual, diff_id)
        return out
    except BaseException:
        out.close()
        raise
