"""Hostile layers: each gives a clear error naming the layer and entry, or a correct result;
never a write outside the output, never unbounded memory, never a hang.

Nothing here is ever extracted: the flattener only reads tar headers. The tests still
check that the directory around the image holds exactly what it held before, so a
regression that starts writing files would show.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import subprocess
import sys
import tarfile
import textwrap
from collections.abc import Sequence
from pathlib import Path

import pytest

from layerkit import (
    Layer,
    Member,
    directory,
    file,
    hardlink,
    make_image,
    sparse_file,
    symlink,
    tar_bytes,
    whiteout,
    write_empty_files_layer,
)
from oci2disk.errors import ImageError, LayerError
from oci2disk.oci.layout import MT_OCI_LAYER_GZIP, LayoutWriter, OciImage, open_layout
from oci2disk.rootfs import Kind
from oci2disk.rootfs.flatten import flatten

TESTS = Path(__file__).resolve().parent.parent
SRC = TESTS.parent / "src"


def snapshot(root: Path) -> dict[str, int]:
    """Every path under ``root`` with its size: what a stray write would change."""
    found = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = Path(dirpath, name)
            found[os.fspath(path.relative_to(root))] = path.lstat().st_size
    return found


def refused(
    tmp_path: Path, layers: Sequence[Layer | Sequence[Member]], *problem: str
) -> LayerError:
    """Flatten ``layers``; expect a LayerError that names the last layer and ``problem``."""
    image = make_image(tmp_path / "oci", layers)
    before = snapshot(tmp_path)
    with pytest.raises(LayerError) as err:
        flatten(image, tmp_path / "work")
    message = str(err.value)
    assert image.layers[-1].digest in message
    for text in problem:
        assert text in message
    after = snapshot(tmp_path)
    assert after == {**before, "work": after["work"]}  # nothing but the empty workdir
    assert list((tmp_path / "work").iterdir()) == []
    return err.value


# ------------------------------------------------------------------ paths


@pytest.mark.parametrize("name", ["../../etc/passwd", "a/../../etc/passwd", "/../../x"])
def test_traversal_is_refused(tmp_path: Path, name: str) -> None:
    refused(tmp_path, [[file("ok", b"")], [file(name, b"pwned")]], repr(name), "escapes")


def test_absolute_paths_stay_inside_the_image(tmp_path: Path) -> None:
    image = make_image(tmp_path / "oci", [[file("/etc/passwd", b"root"), symlink("/abs", "/etc")]])
    with flatten(image, tmp_path / "work") as rootfs:
        assert [e.path for e in rootfs.entries()] == [".", "abs", "etc", "etc/passwd"]
        assert rootfs.open("etc/passwd").read() == b"root"
    assert not Path("/abs").exists()


@pytest.mark.parametrize(
    "link", [symlink("a", "/etc"), symlink("a", "../../.."), symlink("a", "a")]
)
@pytest.mark.parametrize("same_layer", [False, True])
def test_writing_through_a_symlink_is_refused(
    tmp_path: Path, link: Member, same_layer: bool
) -> None:
    """``a -> /etc`` then ``a/passwd``: never followed.

    The references differ here: umoci resolves the symlink inside the rootfs and writes
    the file there (usr/bin/foo for bin -> usr/bin), Docker's overlay2 replaces the
    symlink with a directory. oci2disk refuses: the issue says such entries are
    refused, never followed.
    """
    layers: list[list[Member]] = [[link], [file("a/passwd", b"pwned")]]
    if same_layer:
        layers = [layers[0] + layers[1]]
    refused(tmp_path, layers, "'a/passwd'", "passes through the symlink 'a'")


@pytest.mark.parametrize(
    ("target", "why"),
    [
        ("../../etc/shadow", "escapes the image root"),
        ("/etc/shadow", "not in the image"),  # absolute: the image's own etc/shadow
        ("s/shadow", "not in the image"),  # through a symlink
        ("d", "hard link to the directory"),
        ("d/x", "which it would replace"),
    ],
)
def test_hard_links_must_point_inside_the_image(tmp_path: Path, target: str, why: str) -> None:
    layers = [[directory("d"), file("d/x", b"x"), symlink("s", "/etc")], [hardlink("d", target)]]
    if target == "d":
        layers[1] = [hardlink("h", target)]
    refused(tmp_path, layers, why)


def test_hard_link_to_an_absolute_name_of_an_image_file_works(tmp_path: Path) -> None:
    image = make_image(
        tmp_path / "oci", [[file("etc/shadow", b"s", mode=0o640)], [hardlink("h", "/etc/shadow")]]
    )
    with flatten(image, tmp_path / "work") as rootfs:
        h = rootfs.lookup("h")
        assert h is not None and (h.kind, h.hardlink_to, h.mode) == (
            Kind.FILE,
            "etc/shadow",
            0o640,
        )


@pytest.mark.parametrize(
    ("member", "why"),
    [
        (file(".wh.", b""), "whiteout for no name"),
        (file("d/.wh..", b""), "whiteout for no name"),
        (file(".wh.d/x", b""), "is a whiteout name"),
        (symlink(".", "/"), "replaces the root directory"),
        (file("a\0b", b""), "NUL"),
    ],
)
def test_malformed_names_are_refused(tmp_path: Path, member: Member, why: str) -> None:
    if "\0" in member.info.name:
        member.info.pax_headers = {"path": member.info.name}  # only PAX can carry a NUL
    refused(tmp_path, [[directory("d")], [member]], why)


def test_an_unknown_entry_type_is_refused(tmp_path: Path) -> None:
    member = file("volume", b"")
    member.info.type = b"V"
    refused(tmp_path, [[member]], "unsupported tar entry type")


def test_whiteouts_never_follow_symlinks(tmp_path: Path) -> None:
    image = make_image(
        tmp_path / "oci",
        [
            [directory("etc"), file("etc/passwd", b"root"), symlink("s", "etc")],
            [whiteout("s/passwd"), file("s2/.wh..wh..opq")],
        ],
    )
    with flatten(image, tmp_path / "work") as rootfs:
        assert rootfs.open("etc/passwd").read() == b"root"


# ------------------------------------------------------------------ blobs


def _rewrite_blob(image: OciImage, index: int, data: bytes) -> None:
    image.blob_path(image.layers[index].digest).write_bytes(data)


def test_layer_digest_mismatch(tmp_path: Path) -> None:
    image = make_image(tmp_path / "oci", [[file("f", b"original")]])
    blob = image.blob_path(image.layers[0].digest).read_bytes()
    _rewrite_blob(image, 0, blob.replace(b"original", b"Original"))
    with pytest.raises(ImageError, match=f"blob {image.layers[0].digest} has digest"):
        flatten(image, tmp_path / "work")


def test_config_digest_mismatch(tmp_path: Path) -> None:
    image = make_image(tmp_path / "oci", [[file("f", b"x")]])
    config = image.blob_path(image.config_descriptor.digest)
    config.write_bytes(config.read_bytes().replace(b"amd64", b"arm64"))
    with pytest.raises(ImageError, match=image.config_descriptor.digest):
        open_layout(tmp_path / "oci", "test")


@pytest.mark.parametrize("compression", ["none", "gzip", "zstd"])
def test_truncated_blob(tmp_path: Path, compression: str) -> None:
    image = make_image(tmp_path / "oci", [Layer([file("f", b"x" * 9000)], compression=compression)])
    blob = image.blob_path(image.layers[0].digest)
    blob.write_bytes(blob.read_bytes()[:-700])
    with pytest.raises(ImageError, match="truncated"):
        flatten(image, tmp_path / "work")


def _layer_image(tmp_path: Path, raw: bytes) -> OciImage:
    """An image whose one layer is ``raw``, with digests that match it: only the tar
    itself is wrong."""
    return make_image(tmp_path / "oci", [Layer(raw=raw)])


@pytest.mark.parametrize("cut", [600, 1024 + 512 + 100, 1024 + 512 + 512 + 7])
def test_truncated_tar_with_matching_digests(tmp_path: Path, cut: int) -> None:
    whole = tar_bytes([file("a", b"A" * 1000), file("b", b"B" * 100)])
    image = _layer_image(tmp_path, whole[:cut])
    with pytest.raises(ImageError, match=image.layers[0].digest) as err:
        flatten(image, tmp_path / "work")
    assert "truncated" in str(err.value)


def test_garbage_after_the_last_entry_is_refused(tmp_path: Path) -> None:
    whole = tar_bytes([file("a", b"A")])
    raw = whole[:1024] + b"not a tar header".ljust(512, b"!") + whole[1024:]
    image = _layer_image(tmp_path, raw)
    with pytest.raises(ImageError, match="invalid tar header at byte 1024"):
        flatten(image, tmp_path / "work")


def test_oversized_headers_are_refused_without_reading_them(tmp_path: Path) -> None:
    """A PAX header claiming 40 MiB (gzip makes it 40 KiB): refused, never held."""
    big = tarfile.TarInfo("big")
    big.pax_headers = {"SCHILY.xattr.user.big": "a" * (40 << 20)}
    raw = big.tobuf(tarfile.PAX_FORMAT) + bytes(1024)
    image = make_image(tmp_path / "oci", [Layer(raw=raw, compression="gzip")])
    with pytest.raises(LayerError, match="more than 16 MiB of tar headers"):
        flatten(image, tmp_path / "work")


def test_hostile_sparse_map_ends_without_a_hang(tmp_path: Path) -> None:
    """A GNU 1.0 sparse map that promises more entries than the layer holds: tarfile
    alone would read past the end forever. Run in a child so a hang fails the test."""
    member = sparse_file("s", 4096, [(0, b"x" * 512)], format="pax1.0")
    assert member.raw is not None
    raw = member.raw.replace(b"2\n0\n512\n", b"99999999\n0\n512\n", 1)
    make_image(tmp_path / "oci", [Layer(raw=raw[: len(raw) - 512])])
    code = """
        import sys
        from pathlib import Path
        from oci2disk.errors import ImageError
        from oci2disk.rootfs.flatten import flatten
        from oci2disk.oci.layout import open_layout
        try:
            flatten(open_layout(Path(sys.argv[1]), "test"), Path(sys.argv[2]))
        except ImageError as exc:
            print("refused:", exc)
    """
    result = _child(code, tmp_path / "oci", tmp_path / "work", timeout=60)
    assert "refused:" in result.stdout and "truncated" in result.stdout


@pytest.mark.parametrize(
    ("segments", "size"),
    [([(4096, 512), (0, 512)], 8192), ([(0, 9000)], 4096)],
    ids=["unordered", "past-the-end"],
)
def test_invalid_sparse_maps_are_refused(
    tmp_path: Path, segments: list[tuple[int, int]], size: int
) -> None:
    info = tarfile.TarInfo("s")
    data = b"x" * sum(n for _, n in segments)
    info.size = len(data)
    info.pax_headers = {
        "GNU.sparse.size": str(size),
        "GNU.sparse.map": ",".join(f"{o},{n}" for o, n in segments),
    }
    raw = info.tobuf(tarfile.PAX_FORMAT) + data + bytes(-len(data) % 512) + bytes(1024)
    refused(tmp_path, [[file("ok")], Layer(raw=raw)], "sparse map is invalid")


# ------------------------------------------------------------------ size and depth


def test_a_hundred_level_deep_directory(tmp_path: Path) -> None:
    deep = "/".join(f"level{i:03d}" for i in range(100))
    image = make_image(tmp_path / "oci", [[file(f"{deep}/leaf", b"bottom")], [file("top", b"t")]])
    with flatten(image, tmp_path / "work") as rootfs:
        paths = [e.path for e in rootfs.entries()]
        assert len(paths) == 1 + 100 + 1 + 1
        assert paths[100] == deep and paths[101] == f"{deep}/leaf"
        assert rootfs.open(f"{deep}/leaf").read() == b"bottom"
        out = io.BytesIO()
        rootfs.write_tar(out)
    with tarfile.open(fileobj=io.BytesIO(out.getvalue())) as tar:
        names = tar.getnames()
    assert names == paths


def test_very_deep_trees_need_no_recursion(tmp_path: Path) -> None:
    """5,000 levels: every walk (apply, whiteout, sort, write) is iterative."""
    deep = "/".join(["d"] * 5000)
    image = make_image(
        tmp_path / "oci", [[file(f"{deep}/leaf", b"x")], [directory("d"), whiteout("d/d")]]
    )
    with flatten(image, tmp_path / "work") as rootfs:
        assert [e.path for e in rootfs.entries()] == [".", "d"]
    image = make_image(tmp_path / "oci2", [[file(f"{deep}/leaf", b"x")]])
    with flatten(image, tmp_path / "work2") as rootfs:
        out = io.BytesIO()
        rootfs.write_tar(out)
        assert rootfs.stats.dirs == 5001


def _child(code: str, *args: Path, timeout: float) -> subprocess.CompletedProcess[str]:
    """Run ``code`` in a fresh interpreter: its peak RSS is its own, a hang is a timeout."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([os.fspath(SRC), os.fspath(TESTS)])}
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code), *map(os.fspath, args)],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
        check=True,
    )


def _bomb_layout(layout: Path, dirs: int, files_per_dir: int) -> None:
    """A gzip layer of dirs x files_per_dir empty files, streamed: 512 MiB of tar for a
    million files, a few MiB once compressed."""
    gz_path = layout.parent / "bomb.tar.gz"
    with gz_path.open("wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", compresslevel=1) as gz:
        sink = _HashingWriter(gz)
        write_empty_files_layer(sink, dirs, files_per_dir)  # type: ignore[arg-type]
    writer = LayoutWriter(layout)
    with gz_path.open("rb") as f:
        layer = writer.add_stream(f, MT_OCI_LAYER_GZIP)
    gz_path.unlink()
    config = {
        "architecture": "amd64",
        "os": "linux",
        "rootfs": {"type": "layers", "diff_ids": ["sha256:" + sink.digest.hexdigest()]},
    }
    writer.add_image(config, [layer], "test")


class _HashingWriter:
    def __init__(self, out: gzip.GzipFile) -> None:
        self.out = out
        self.digest = hashlib.sha256()

    def write(self, data: bytes) -> int:
        self.digest.update(data)
        return self.out.write(data)


BOMB_FLATTEN = """
    import json, sys, time
    from pathlib import Path
    from oci2disk.rootfs.flatten import flatten
    from oci2disk.oci.layout import open_layout

    class Count:
        size = 0
        def write(self, data):
            self.size += len(data)
        def flush(self):
            pass

    start = time.monotonic()
    image = open_layout(Path(sys.argv[1]), "test")
    with flatten(image, Path(sys.argv[2])) as rootfs:
        indexed = time.monotonic()
        out = Count()
        rootfs.write_tar(out)
        stats = rootfs.stats
    print(json.dumps({
        "entries": stats.entries, "files": stats.files, "dirs": stats.dirs,
        "tar_bytes": out.size,
        "index_seconds": round(indexed - start, 1),
        "total_seconds": round(time.monotonic() - start, 1),
        # VmHWM, not ru_maxrss: Linux keeps ru_maxrss across exec, so a child forked
        # from a large pytest process would report the parent's size.
        "peak_rss_mib": int(next(line.split()[1] for line in open("/proc/self/status")
                                 if line.startswith("VmHWM:"))) // 1024,
    }))
"""


def run_bomb(tmp_path: Path, dirs: int, files_per_dir: int) -> dict[str, int]:
    tmp_path.mkdir(parents=True, exist_ok=True)
    _bomb_layout(tmp_path / "oci", dirs, files_per_dir)
    # The timeout is a hang guard only; the figures are what the tests assert.
    result = _child(BOMB_FLATTEN, tmp_path / "oci", tmp_path / "work", timeout=600)
    figures: dict[str, int] = json.loads(result.stdout)
    return figures


@pytest.mark.slow
def test_a_million_empty_files_in_bounded_memory(tmp_path: Path) -> None:
    figures = run_bomb(tmp_path, dirs=1000, files_per_dir=1000)
    assert figures["files"] == 1_000_000
    assert figures["dirs"] == 1001
    assert figures["tar_bytes"] >= 1_001_001 * 512
    assert figures["peak_rss_mib"] < 300, figures
    assert list((tmp_path / "work").iterdir()) == []


def test_memory_per_entry_is_small(tmp_path: Path) -> None:
    """The quick version of the bomb: 50,000 entries must cost well under 300 bytes each."""
    small = run_bomb(tmp_path / "small", dirs=10, files_per_dir=100)
    large = run_bomb(tmp_path / "large", dirs=100, files_per_dir=500)
    per_entry = (large["peak_rss_mib"] - small["peak_rss_mib"]) * 2**20 / 49_000
    assert per_entry < 300, (small, large)


@pytest.mark.parametrize(
    ("field", "value", "why"),
    [
        ("uid", 2**32 + 5, "uid 4294967301 is outside 0..4294967295"),
        ("gid", 2**40, "gid 1099511627776 is outside 0..4294967295"),
    ],
)
def test_ids_beyond_32_bits_are_refused_not_wrapped(
    tmp_path: Path, field: str, value: int, why: str
) -> None:
    """PAX carries any decimal; 2**32 + 5 must not become uid 5, nor 2**40 root's group."""
    member = file("etc/shadow", b"secret")
    setattr(member.info, field, value)  # tarfile writes it as a PAX record
    refused(tmp_path, [[file("ok", b"")], [member]], "'etc/shadow'", why)


def test_a_negative_pax_size_is_refused(tmp_path: Path) -> None:
    member = file("f", b"")
    member.info.pax_headers = {"size": "-5"}
    refused(tmp_path, [[member]], "'f'", "size -5 is negative")
