"""Layer indexes: made as a layer arrives, kept in the cache, never trusted when damaged.

A layer's index is its tar headers with where each member's data lies. The one made
from the bytes as they stream in must equal the one read from the stored blob (the
flattener uses either), a stored index that was damaged must be noticed and rebuilt,
and a layer that does not scan cleanly while it arrives must leave no index behind,
so that the flattener reads the blob and reports the problem with the layer's digest.
"""

from __future__ import annotations

import hashlib
import io
import os
import random
from pathlib import Path

import pytest

from layerkit import (
    Layer,
    directory,
    file,
    hardlink,
    make_image,
    sparse_file,
    symlink,
    tar_bytes,
    write_docker_archive,
)
from oci2disk.errors import ImageError
from oci2disk.oci.cache import Cache, using
from oci2disk.oci.layers import LayerIndex, StreamIndexer, dump_index, file_members, load_index
from oci2disk.oci.layout import OciImage
from oci2disk.rootfs.flatten import flatten

RICH = [
    directory("etc"),
    file("etc/os-release", b"ID=test\n" * 300, xattrs={"user.note": b"kept"}),
    file("usr/share/" + "long-name-" * 20 + ".txt", os.urandom(70_000), uid=1000, gid=1000),
    symlink("bin", "usr/bin"),
    hardlink("etc/again", "etc/os-release"),
    sparse_file("var/sparse.img", 1 << 20, [(4096, b"data" * 1024), (700_416, b"tail" * 128)]),
    file("etc/\udcffnot-utf8", b"x"),
]


def _from_file(data: bytes, tmp_path: Path) -> LayerIndex:
    path = tmp_path / "layer.tar"
    path.write_bytes(data)
    with path.open("rb") as f:
        return LayerIndex(tuple(file_members(f, "sha256:test")))


def _streamed(data: bytes, rng: random.Random) -> LayerIndex | None:
    indexer = StreamIndexer()
    position = 0
    while position < len(data):
        step = rng.choice([1, 511, 512, 513, 4096, 65_537, 1 << 20])
        indexer.feed(data[position : position + step])
        position += step
    return indexer.finish()


def test_an_index_made_as_the_layer_arrives_equals_the_blobs(tmp_path: Path) -> None:
    data = tar_bytes(RICH)
    from_blob = _from_file(data, tmp_path)
    assert len(from_blob.members) == len(RICH)
    for seed in range(5):
        streamed = _streamed(data, random.Random(seed))
        assert streamed is not None
        assert dump_index(streamed) == dump_index(from_blob)
    loaded = load_index(dump_index(from_blob))
    assert loaded is not None and dump_index(loaded) == dump_index(from_blob)


@pytest.mark.parametrize("damage", ["truncated", "garbled-header", "junk-after-the-last"])
def test_a_layer_that_does_not_scan_leaves_no_index(damage: str, tmp_path: Path) -> None:
    good = tar_bytes(RICH)
    end = _from_file(good, tmp_path).members[-1][1]  # where the end-of-archive blocks start
    data = {
        "truncated": good[: len(good) // 2],
        "garbled-header": good[:1024] + b"\xff" * 512 + good[1536:],
        "junk-after-the-last": good[:end] + b"not a tar header".ljust(1024, b"!"),
    }[damage]
    with pytest.raises(ImageError):  # what the flattener reports, reading the blob
        _from_file(data, tmp_path)
    assert _streamed(data, random.Random(1)) is None


def test_the_flattener_uses_and_keeps_the_cache_index_and_rebuilds_a_damaged_one(
    tmp_path: Path,
) -> None:
    """An image in the cache: the first flatten stores each layer's index, a damaged
    index is dropped (never used), and every flatten gives the same rootfs stream."""
    store = Cache(tmp_path / "cache")
    with using(store):
        image = make_image(tmp_path / "src", [RICH, Layer([file("etc/motd", b"hello\n")])])
        archive = tmp_path / "image.tar"
        write_docker_archive(archive, [RICH, Layer([file("etc/motd", b"hello\n")])])
        assert store is not None
        with archive.open("rb") as stream:
            cached = store.add_docker_archive(stream)  # indexed as the layers arrive
        indexes = sorted((tmp_path / "cache" / "indexes").iterdir())
        assert [p.name for p in indexes] == sorted(d.digest.split(":")[1] for d in cached.layers)

        def rootfs_stream(img: OciImage) -> bytes:
            out = io.BytesIO()
            with flatten(img, tmp_path / "work") as rootfs:
                rootfs.write_tar(out)
            return out.getvalue()

        expected = rootfs_stream(image)  # read from its own layout, no cache index
        assert rootfs_stream(cached) == expected
        for path in indexes:  # damage every stored index: a flipped byte in the body
            data = bytearray(path.read_bytes())
            data[-3] ^= 0xFF
            path.write_bytes(bytes(data))
        assert rootfs_stream(cached) == expected
        for path in indexes:  # rebuilt from the blobs, and sound again
            assert load_index(path.read_bytes()) is not None
        assert Cache(tmp_path / "cache").verify_all() == []


def test_a_damaged_layer_arriving_is_reported_with_its_digest(tmp_path: Path) -> None:
    """No index is kept for a layer whose tar is broken; flattening reads the blob and
    names the layer by its digest."""
    good = tar_bytes(RICH)
    second = _from_file(good, tmp_path).members[0][1]  # where the second header starts
    broken = good[:second] + b"\xff" * 512 + good[second + 512 :]  # a garbled header
    digest = "sha256:" + hashlib.sha256(broken).hexdigest()
    store = Cache(tmp_path / "cache")
    with using(store):
        archive = tmp_path / "image.tar"
        write_docker_archive(archive, [Layer(raw=broken)])
        assert store is not None
        with archive.open("rb") as stream:
            image = store.add_docker_archive(stream)
        assert list((tmp_path / "cache" / "indexes").iterdir()) == []
        with pytest.raises(ImageError, match=digest), flatten(image, tmp_path / "work"):
            pass


def test_an_index_of_another_format_or_cut_short_is_not_read(tmp_path: Path) -> None:
    data = dump_index(_from_file(tar_bytes(RICH), tmp_path))
    assert load_index(data) is not None
    assert load_index(data.replace(b"index-1", b"index-9", 1)) is None
    assert load_index(data[:40]) is None
    assert load_index(data[:-1]) is None
