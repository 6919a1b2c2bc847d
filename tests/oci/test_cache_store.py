"""The cache store on its own: eviction order, stale temporaries, clones that keep holes."""

from __future__ import annotations

import os
import time
from pathlib import Path

from oci2disk.oci.cache import Cache, clone_file, parse_size


def _blob(cache: Cache, name: str, size: int, age: float) -> Path:
    path = cache.blobs / name
    path.write_bytes(b"x" * size)
    stamp = time.time() - age
    os.utime(path, (stamp, stamp))
    return path


def test_eviction_removes_the_least_recently_used_first(tmp_path: Path) -> None:
    cache = Cache(tmp_path / "c")
    with cache.session():
        old = _blob(cache, "a" * 64, 40960, age=300)
        recent = _blob(cache, "b" * 64, 40960, age=10)
        stale_temp = _blob(cache, ".in-dead", 4096, age=7200)
        fresh_temp = _blob(cache, ".in-live", 4096, age=1)
        cache.evict(50000)
    assert not old.exists()
    assert recent.exists()
    assert not stale_temp.exists(), "a temporary of a run that died is swept"
    assert fresh_temp.exists(), "a temporary of a running run is left alone"


def test_a_cache_under_its_limit_is_left_alone(tmp_path: Path) -> None:
    cache = Cache(tmp_path / "c", max_bytes=1 << 30)
    with cache.session():
        kept = _blob(cache, "c" * 64, 4096, age=1000)
    assert kept.exists()


def test_clone_keeps_content_and_holes(tmp_path: Path) -> None:
    source = tmp_path / "sparse.raw"
    with source.open("wb") as f:
        f.write(b"head")
        f.seek(64 << 20)
        f.write(b"tail")
    target = tmp_path / "copy.raw"
    clone_file(source, target)
    assert target.read_bytes() == source.read_bytes()
    assert target.stat().st_blocks * 512 < 8 << 20, "the hole stays a hole"


def test_sizes() -> None:
    assert parse_size("10G") == 10 << 30
    assert parse_size("512M") == 512 << 20
    assert parse_size("1.5GiB") == 3 << 29
    assert parse_size("4096") == 4096


def test_compressed_layers_are_kept_uncompressed_and_read_in_place(tmp_path: Path) -> None:
    from layerkit import Layer, directory, file, make_image
    from oci2disk.oci.layout import MT_OCI_LAYER
    from oci2disk.rootfs.flatten import flatten

    cache = Cache(tmp_path / "c")
    with cache.session():
        gz = Layer([directory("etc"), file("etc/a", b"a" * 5000)], compression="gzip")
        zst = Layer([file("etc/b", b"b" * 5000)], compression="zstd")
        image = cache.uncompressed(make_image(cache.root, [gz, zst]))
        assert [layer.media_type for layer in image.layers] == [MT_OCI_LAYER] * 2
        assert [layer.digest for layer in image.layers] == list(image.config.diff_ids)
        cache.remember_image(image)
        again = cache.image(image.config_descriptor.digest)
        assert again is not None and again.digest == image.digest
        with flatten(again, tmp_path / "work") as rootfs:
            assert {e.path for e in rootfs.entries()} >= {"etc/a", "etc/b"}
