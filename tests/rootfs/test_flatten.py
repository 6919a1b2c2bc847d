"""Flattening layers into one canonical rootfs: whiteouts, links, xattrs, safety, output."""

from __future__ import annotations

import io
import re
import tarfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest

from layerkit import (
    MTIME,
    SPARSE_FORMATS,
    Layer,
    Member,
    TarFormat,
    device,
    directory,
    fifo,
    file,
    go_style_modes,
    hardlink,
    make_image,
    opaque,
    sparse_file,
    symlink,
    tar_bytes,
    whiteout,
    write_docker_archive,
)
from oci2disk import run
from oci2disk.errors import ImageError, LayerError
from oci2disk.oci.layout import (
    MT_DOCKER_LAYER,
    MT_DOCKER_LAYER_GZIP,
    MT_OCI_CONFIG,
    MT_OCI_INDEX,
    MT_OCI_LAYER,
    MT_OCI_LAYER_GZIP,
    MT_OCI_MANIFEST,
    REF_NAME,
    Descriptor,
    LayoutWriter,
    OciImage,
    Platform,
    canonical_json,
    layout_from_docker_archive,
    open_layout,
)
from oci2disk.rootfs import Entry, ExtraFile, Kind, RootfsStats
from oci2disk.rootfs.flat import FlatRootfs
from oci2disk.rootfs.flatten import flatten
from oci2disk.rootfs.model import NS

CAP = b"\x01\x00\x00\x02\x00\x20\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00"
LATIN1_NAME = b"caf\xe9.txt".decode("utf-8", "surrogateescape")


def flat(
    tmp_path: Path,
    layers: Sequence[Layer | Sequence[Member]],
    *,
    source_date_epoch: int | None = None,
    drop_container_files: bool = True,
) -> FlatRootfs:
    image = make_image(tmp_path / "oci", layers)
    return flatten(
        image,
        tmp_path / "work",
        source_date_epoch=source_date_epoch,
        drop_container_files=drop_container_files,
    )


def paths(rootfs: FlatRootfs) -> list[str]:
    return [e.path for e in rootfs.entries()]


def content(rootfs: FlatRootfs, path: str) -> bytes:
    with rootfs.open(path) as f:
        return f.read()


def entry(rootfs: FlatRootfs, path: str) -> Entry:
    found = rootfs.lookup(path)
    assert found is not None, path
    return found


def tar_of(rootfs: FlatRootfs, extra: Sequence[ExtraFile] = ()) -> bytes:
    out = io.BytesIO()
    rootfs.write_tar(out, extra=extra)
    return out.getvalue()


def read_tar(data: bytes) -> list[tuple[tarfile.TarInfo, bytes]]:
    members = []
    with tarfile.open(
        fileobj=io.BytesIO(data), mode="r:", encoding="utf-8", errors="surrogateescape"
    ) as tar:
        for info in tar.getmembers():
            f = tar.extractfile(info) if info.isreg() or info.islnk() else None
            members.append((info, f.read() if f else b""))
    return members


def layer_digest(image: OciImage, index: int) -> str:
    return image.layers[index].digest


# ------------------------------------------------------------------ basic tree


def test_files_dirs_symlinks_keep_their_metadata(tmp_path: Path) -> None:
    with flat(
        tmp_path,
        [
            [
                directory("etc", mode=0o755),
                file("etc/passwd", b"root:x:0:0\n", mode=0o644),
                file("home/u/notes", b"hi", mode=0o600, uid=1000, gid=1000, mtime=1_600_000_000.25),
                symlink("bin", "usr/bin"),
            ]
        ],
    ) as rootfs:
        assert paths(rootfs) == [".", "bin", "etc", "etc/passwd", "home", "home/u", "home/u/notes"]
        notes = entry(rootfs, "home/u/notes")
        assert (notes.kind, notes.mode, notes.uid, notes.gid, notes.size) == (
            Kind.FILE,
            0o600,
            1000,
            1000,
            2,
        )
        assert notes.mtime == 1_600_000_000.25
        assert entry(rootfs, "bin") == Entry(
            "bin", Kind.SYMLINK, 0o777, mtime_ns=MTIME * NS, linkname="usr/bin"
        )
        assert content(rootfs, "etc/passwd") == b"root:x:0:0\n"


def test_implied_parent_directories_are_root_owned_0755(tmp_path: Path) -> None:
    with flat(tmp_path, [[file("a/b/c", b"x", uid=5, gid=5)]]) as rootfs:
        for path in (".", "a", "a/b"):
            e = entry(rootfs, path)
            assert (e.kind, e.mode, e.uid, e.gid) == (Kind.DIR, 0o755, 0, 0)
        assert entry(rootfs, "a/b/c").uid == 5


def test_names_are_normalized_and_root_entry_sets_root_metadata(tmp_path: Path) -> None:
    with flat(
        tmp_path,
        [
            [
                directory("./", mode=0o700, mtime=1234),
                file("/abs/x", b"1"),
                file("./rel/y", b"2"),
                file("a//b/./c", b"3"),
                file("d/../e", b"4"),
            ]
        ],
    ) as rootfs:
        assert paths(rootfs) == [".", "a", "a/b", "a/b/c", "abs", "abs/x", "e", "rel", "rel/y"]
        root = entry(rootfs, ".")
        assert (root.mode, root.mtime) == (0o700, 1234)
        assert content(rootfs, "/e") == b"4"


def test_go_style_mode_fields_keep_permission_bits_only(tmp_path: Path) -> None:
    raw = go_style_modes(tar_bytes([directory("d", mode=0o1777), file("d/f", b"x", mode=0o4755)]))
    with flat(tmp_path, [Layer(raw=raw)]) as rootfs:
        assert entry(rootfs, "d").mode == 0o1777
        assert entry(rootfs, "d/f").mode == 0o4755


# ------------------------------------------------------------------ whiteouts


def test_whiteout_removes_the_lower_subtree(tmp_path: Path) -> None:
    with flat(
        tmp_path,
        [
            [file("a/b/c", b"1"), file("a/b/d/e", b"2"), file("a/keep", b"3")],
            [whiteout("a/b")],
        ],
    ) as rootfs:
        assert paths(rootfs) == [".", "a", "a/keep"]


def test_opaque_dir_hides_lower_contents_but_keeps_the_dir(tmp_path: Path) -> None:
    with flat(
        tmp_path,
        [
            [directory("d", mode=0o755), file("d/old1", b"1"), file("d/sub/old2", b"2")],
            [directory("d", mode=0o750, uid=7), opaque("d"), file("d/new", b"n")],
        ],
    ) as rootfs:
        assert paths(rootfs) == [".", "d", "d/new"]
        d = entry(rootfs, "d")
        assert (d.mode, d.uid) == (0o750, 7)


def test_whiteout_applies_to_lower_layers_only(tmp_path: Path) -> None:
    # A new entry and a whiteout of the same name in one layer: the new entry wins,
    # whichever comes first in the tar.
    with flat(
        tmp_path,
        [
            [file("x", b"old"), file("y", b"old")],
            [file("x", b"new"), whiteout("x"), whiteout("y"), file("y", b"new")],
        ],
    ) as rootfs:
        assert content(rootfs, "x") == b"new"
        assert content(rootfs, "y") == b"new"


def test_whiteout_of_a_missing_name_or_below_a_symlink_is_harmless(tmp_path: Path) -> None:
    with flat(
        tmp_path,
        [
            [symlink("s", "/etc"), file("f", b"1")],
            [whiteout("nothing"), whiteout("s/passwd"), whiteout("nodir/x")],
        ],
    ) as rootfs:
        assert paths(rootfs) == [".", "f", "s"]


def test_file_replaced_by_dir_and_dir_by_file(tmp_path: Path) -> None:
    with flat(
        tmp_path,
        [
            [file("p", b"was a file"), file("q/inner", b"was in a dir")],
            [directory("p"), file("p/child", b"c"), file("q", b"now a file")],
        ],
    ) as rootfs:
        assert paths(rootfs) == [".", "p", "p/child", "q"]
        assert entry(rootfs, "p").kind is Kind.DIR
        assert content(rootfs, "q") == b"now a file"


def test_dir_metadata_changed_in_upper_layer_keeps_children(tmp_path: Path) -> None:
    with flat(
        tmp_path,
        [
            [directory("srv", mode=0o755, uid=0), file("srv/data", b"d")],
            [directory("srv", mode=0o2770, uid=33, gid=33, xattrs={"user.tag": b"v"})],
        ],
    ) as rootfs:
        srv = entry(rootfs, "srv")
        assert (srv.mode, srv.uid, srv.gid, srv.xattrs) == (0o2770, 33, 33, (("user.tag", b"v"),))
        assert content(rootfs, "srv/data") == b"d"


def test_duplicate_entries_in_one_layer_last_wins(tmp_path: Path) -> None:
    with flat(
        tmp_path, [[file("f", b"first", mode=0o600), file("f", b"second", mode=0o640)]]
    ) as rootfs:
        assert content(rootfs, "f") == b"second"
        assert entry(rootfs, "f").mode == 0o640
        assert paths(rootfs) == [".", "f"]


# ------------------------------------------------------------------ hard links


def test_hard_links_within_a_layer_share_the_file(tmp_path: Path) -> None:
    with flat(
        tmp_path,
        [
            [
                file("usr/bin/su", b"SU", mode=0o4755, uid=0, xattrs={"security.capability": CAP}),
                hardlink("usr/bin/a-su", "usr/bin/su", mode=0o644, uid=99),
                hardlink("bin/su2", "/usr/bin/su"),
            ]
        ],
    ) as rootfs:
        leader = entry(rootfs, "bin/su2")  # first of the set in canonical order
        assert leader.kind is Kind.FILE
        for path in ("usr/bin/a-su", "usr/bin/su"):
            link = entry(rootfs, path)
            assert link.kind is Kind.FILE
            assert link.hardlink_to == link.link_group == "bin/su2"
            # Same metadata as the target, whatever the link header said.
            assert (link.mode, link.uid, link.mtime, link.xattrs) == (
                0o4755,
                0,
                leader.mtime,
                leader.xattrs,
            )
            assert content(rootfs, path) == b"SU"
        assert rootfs.stats.hardlinks == 2
        assert rootfs.stats.files == 1
        assert rootfs.stats.data_bytes == 2


def test_hard_link_to_a_file_replaced_later_keeps_the_old_content(tmp_path: Path) -> None:
    with flat(
        tmp_path,
        [
            [file("a", b"old"), hardlink("b", "a")],
            [file("a", b"new")],
        ],
    ) as rootfs:
        assert content(rootfs, "a") == b"new"
        assert entry(rootfs, "b").kind is Kind.FILE  # materialized: its name set split
        assert content(rootfs, "b") == b"old"
        assert rootfs.stats.hardlinks == 0


def test_hard_link_set_repoints_when_its_first_name_is_removed(tmp_path: Path) -> None:
    with flat(
        tmp_path,
        [
            [file("a", b"shared"), hardlink("b", "a"), hardlink("c", "a")],
            [whiteout("a")],
        ],
    ) as rootfs:
        assert entry(rootfs, "b").kind is Kind.FILE
        assert entry(rootfs, "c") == Entry(
            "c", Kind.FILE, 0o644, size=6, mtime_ns=MTIME * NS, link_group="b"
        )
        assert content(rootfs, "c") == b"shared"


def test_hard_link_set_split_across_layers(tmp_path: Path) -> None:
    with flat(
        tmp_path,
        [
            [file("lib/x", b"lib")],
            [hardlink("lib/y", "lib/x")],
        ],
    ) as rootfs:
        assert entry(rootfs, "lib/y").hardlink_to == "lib/x"
        assert content(rootfs, "lib/y") == b"lib"


def test_hard_link_within_one_layer_before_the_name_is_redefined(tmp_path: Path) -> None:
    with flat(tmp_path, [[file("a", b"v1"), hardlink("b", "a"), file("a", b"v2")]]) as rootfs:
        assert content(rootfs, "b") == b"v1"
        assert content(rootfs, "a") == b"v2"


def test_link_leader_is_first_by_path_components_and_precedes_its_links(tmp_path: Path) -> None:
    # As strings "a-c" < "a/b", but by components "a" < "a-c": a/b leads.
    with flat(tmp_path, [[file("a-c", b"x"), hardlink("a/b", "a-c")]]) as rootfs:
        assert paths(rootfs) == [".", "a", "a/b", "a-c"]
        assert entry(rootfs, "a/b").kind is Kind.FILE
        assert entry(rootfs, "a-c").hardlink_to == "a/b"


def test_hard_link_to_a_symlink_or_device_becomes_a_copy(tmp_path: Path) -> None:
    with flat(
        tmp_path,
        [
            [
                symlink("s", "target"),
                hardlink("s2", "s"),
                device("null", 1, 3),
                hardlink("null2", "null"),
            ]
        ],
    ) as rootfs:
        assert entry(rootfs, "s2").kind is Kind.SYMLINK
        assert entry(rootfs, "s2").linkname == "target"
        null2 = entry(rootfs, "null2")
        assert (null2.kind, null2.devmajor, null2.devminor) == (Kind.CHAR, 1, 3)


# ------------------------------------------------------------------ names, xattrs, specials


@pytest.mark.parametrize("fmt", [tarfile.PAX_FORMAT, tarfile.GNU_FORMAT])
def test_long_names_and_link_targets(tmp_path: Path, fmt: TarFormat) -> None:
    deep = "/".join(["d" * 60] * 5) + "/" + "f" * 120
    with flat(
        tmp_path,
        [
            Layer(
                [file(deep, b"deep"), symlink("s", "t" * 300), hardlink("h" * 150, deep)],
                format=fmt,
            )
        ],
    ) as rootfs:
        assert content(rootfs, deep) == b"deep"
        assert entry(rootfs, "s").linkname == "t" * 300
        assert entry(rootfs, "h" * 150).hardlink_to == deep
        members = {info.name: info for info, _ in read_tar(tar_of(rootfs))}
        assert members["s"].linkname == "t" * 300
        assert members[deep].isreg()


@pytest.mark.parametrize("fmt", [tarfile.PAX_FORMAT, tarfile.GNU_FORMAT])
def test_non_utf8_names_round_trip_byte_for_byte(tmp_path: Path, fmt: TarFormat) -> None:
    with flat(
        tmp_path, [Layer([file(LATIN1_NAME, b"latin-1"), symlink("link", LATIN1_NAME)], format=fmt)]
    ) as rootfs:
        assert LATIN1_NAME in paths(rootfs)
        assert content(rootfs, LATIN1_NAME) == b"latin-1"
        out = tar_of(rootfs)
        assert b"caf\xe9.txt" in out
        names = [info.name.encode("utf-8", "surrogateescape") for info, _ in read_tar(out)]
        assert b"caf\xe9.txt" in names


def test_xattrs_round_trip_exactly(tmp_path: Path) -> None:
    binary = bytes(range(256))
    with flat(
        tmp_path,
        [
            [
                file(
                    "bin/ping",
                    b"P",
                    mode=0o755,
                    xattrs={"user.z": b"last", "security.capability": CAP, "user.bin": binary},
                )
            ]
        ],
    ) as rootfs:
        assert entry(rootfs, "bin/ping").xattrs == (
            ("security.capability", CAP),
            ("user.bin", binary),
            ("user.z", b"last"),
        )
        info = {i.name: i for i, _ in read_tar(tar_of(rootfs))}["bin/ping"]
        got = {
            k: v.encode("utf-8", "surrogateescape")
            for k, v in info.pax_headers.items()
            if k.startswith("SCHILY.xattr.")
        }
        assert got == {
            "SCHILY.xattr.security.capability": CAP,
            "SCHILY.xattr.user.bin": binary,
            "SCHILY.xattr.user.z": b"last",
        }


def test_special_bits_devices_and_fifos(tmp_path: Path) -> None:
    with flat(
        tmp_path,
        [
            [
                file("usr/bin/passwd", b"p", mode=0o4755),
                file("usr/bin/wall", b"w", mode=0o2755, gid=5),
                directory("tmp", mode=0o1777),
                device("dev/null", 1, 3, mode=0o666),
                device("dev/sda", 8, 0, block=True, mode=0o660),
                fifo("run/initctl", mode=0o600),
            ]
        ],
    ) as rootfs:
        assert entry(rootfs, "usr/bin/passwd").mode == 0o4755
        assert entry(rootfs, "usr/bin/wall").mode == 0o2755
        assert entry(rootfs, "tmp").mode == 0o1777
        null = entry(rootfs, "dev/null")
        assert (null.kind, null.devmajor, null.devminor, null.mode) == (Kind.CHAR, 1, 3, 0o666)
        sda = entry(rootfs, "dev/sda")
        assert (sda.kind, sda.devmajor, sda.devminor) == (Kind.BLOCK, 8, 0)
        assert entry(rootfs, "run/initctl").kind is Kind.FIFO
        assert rootfs.stats.specials == 3
        by_name = {i.name: i for i, _ in read_tar(tar_of(rootfs))}
        assert by_name["dev/sda"].isblk() and by_name["dev/sda"].devmajor == 8
        assert by_name["run/initctl"].isfifo()
        assert by_name["usr/bin/passwd"].mode == 0o4755


def test_subsecond_mtimes_and_source_date_epoch(tmp_path: Path) -> None:
    layers = [[file("old", b"o", mtime=1000.5), file("new", b"n", mtime=2_000_000_000.75)]]
    with flat(tmp_path, layers) as rootfs:
        assert entry(rootfs, "old").mtime == 1000.5
        by_name = {i.name: i for i, _ in read_tar(tar_of(rootfs))}
        assert by_name["new"].mtime == 2_000_000_000.75
    with flat(tmp_path / "sde", layers, source_date_epoch=1_500_000_000) as rootfs:
        assert entry(rootfs, "old").mtime == 1000.5  # older than the epoch: kept
        assert entry(rootfs, "new").mtime == 1_500_000_000
        by_name = {i.name: i for i, _ in read_tar(tar_of(rootfs))}
        assert by_name["new"].mtime == 1_500_000_000


# ------------------------------------------------------------------ safety


def test_traversal_is_refused_naming_layer_and_entry(tmp_path: Path) -> None:
    image = make_image(tmp_path / "oci", [[file("ok", b"")], [file("../../etc/passwd", b"x")]])
    with pytest.raises(LayerError) as err:
        flatten(image, tmp_path / "work")
    assert layer_digest(image, 1) in str(err.value)
    assert "../../etc/passwd" in str(err.value)
    assert list((tmp_path / "work").iterdir()) == []


@pytest.mark.parametrize("same_layer", [False, True])
def test_writing_through_a_symlink_is_refused(tmp_path: Path, same_layer: bool) -> None:
    layers: list[list[Member]] = [[symlink("a", "/etc")], [file("a/passwd", b"pwned")]]
    if same_layer:
        layers = [layers[0] + layers[1]]
    image = make_image(tmp_path / "oci", layers)
    with pytest.raises(LayerError, match="symlink") as err:
        flatten(image, tmp_path / "work")
    assert layer_digest(image, len(layers) - 1) in str(err.value)
    assert "a/passwd" in str(err.value)


def test_entry_below_a_regular_file_is_refused(tmp_path: Path) -> None:
    image = make_image(tmp_path / "oci", [[file("a", b"f")], [file("a/b", b"x")]])
    with pytest.raises(LayerError, match="not a directory"):
        flatten(image, tmp_path / "work")


@pytest.mark.parametrize(
    ("target", "why"),
    [
        ("../../etc/shadow", "escapes"),
        ("missing", "not in the image"),
        ("d", "directory"),
        ("s/passwd", "not in the image"),
    ],
)
def test_bad_hard_links_are_refused(tmp_path: Path, target: str, why: str) -> None:
    image = make_image(
        tmp_path / "oci",
        [
            [directory("d"), symlink("s", "/etc")],
            [hardlink("h", target)],
        ],
    )
    with pytest.raises(LayerError, match=why) as err:
        flatten(image, tmp_path / "work")
    assert layer_digest(image, 1) in str(err.value)
    assert "'h'" in str(err.value)


def test_blob_digest_mismatch_is_an_image_error(tmp_path: Path) -> None:
    image = make_image(tmp_path / "oci", [[file("f", b"original")]])
    blob = image.blob_path(image.layers[0].digest)
    data = bytearray(blob.read_bytes())
    data[data.index(b"original")] ^= 0x20
    blob.write_bytes(bytes(data))
    with pytest.raises(ImageError, match=image.layers[0].digest):
        flatten(image, tmp_path / "work")


@pytest.mark.parametrize("compression", ["none", "gzip"])
def test_truncated_blob_is_an_image_error(tmp_path: Path, compression: str) -> None:
    image = make_image(tmp_path / "oci", [Layer([file("f", b"x" * 5000)], compression=compression)])
    blob = image.blob_path(image.layers[0].digest)
    blob.write_bytes(blob.read_bytes()[:-100])
    with pytest.raises(ImageError, match="truncated"):
        flatten(image, tmp_path / "work")


@pytest.mark.parametrize("compression", ["none", "gzip", "zstd"])
def test_diff_id_mismatch_names_the_layer(tmp_path: Path, compression: str) -> None:
    wrong = "sha256:" + "0" * 64
    image = make_image(
        tmp_path / "oci", [Layer([file("f", b"x")], compression=compression)], diff_ids=[wrong]
    )
    with pytest.raises(ImageError, match="diff_ids") as err:
        flatten(image, tmp_path / "work")
    assert image.layers[0].digest in str(err.value)
    assert list((tmp_path / "work").iterdir()) == []


def test_a_layer_that_is_not_a_tar_is_an_image_error(tmp_path: Path) -> None:
    image = make_image(tmp_path / "oci", [Layer(raw=b"this is not a tar archive" * 40)])
    with pytest.raises(ImageError, match=image.layers[0].digest):
        flatten(image, tmp_path / "work")


# ------------------------------------------------------------------ compression, workdir


@pytest.mark.parametrize("compression", ["gzip", "zstd"])
def test_compressed_layers(tmp_path: Path, compression: str) -> None:
    big = bytes(range(256)) * 8192  # 2 MiB: more than one copy chunk
    with flat(
        tmp_path,
        [
            Layer([file("big", big), file("gone", b"g")], compression=compression),
            Layer([whiteout("gone"), file("small", b"s")], compression=compression),
        ],
    ) as rootfs:
        assert content(rootfs, "big") == big
        assert content(rootfs, "small") == b"s"
        assert paths(rootfs) == [".", "big", "small"]
        out = {i.name: data for i, data in read_tar(tar_of(rootfs))}
        assert out["big"] == big
        # Decompressed layers live in workdir as files without a name: nothing to leave behind.
        assert list((tmp_path / "work").iterdir()) == []


def test_uncompressed_layers_are_read_in_place(tmp_path: Path) -> None:
    with flat(tmp_path, [[file("f", b"data")]]) as rootfs:
        assert list((tmp_path / "work").iterdir()) == []
        assert content(rootfs, "f") == b"data"


# ------------------------------------------------------------------ container files


def test_docker_placeholders_are_dropped_but_real_content_is_kept(tmp_path: Path) -> None:
    layers = [
        [
            file(".dockerenv"),
            file("etc/hosts"),
            file("etc/hostname"),
            file("etc/resolv.conf", b"nameserver 10.0.0.1\n"),
            file("srv/etc/hosts"),
        ]
    ]
    with flat(tmp_path, layers) as rootfs:
        assert paths(rootfs) == [".", "etc", "etc/resolv.conf", "srv", "srv/etc", "srv/etc/hosts"]
    with flat(tmp_path / "keep", layers, drop_container_files=False) as rootfs:
        assert {".dockerenv", "etc/hosts", "etc/hostname"} <= set(paths(rootfs))


# ------------------------------------------------------------------ canonical tar


def test_canonical_tar_layout(tmp_path: Path) -> None:
    with flat(
        tmp_path,
        [
            [
                file("z", b"zz", mode=0o4750, uid=1000, gid=100),
                hardlink("b", "z"),
                directory("a", uid=3),
                file("a/x", b"ax"),
            ],
        ],
    ) as rootfs:
        data = tar_of(rootfs)
        members = read_tar(data)
        assert [i.name for i, _ in members] == [".", "a", "a/x", "b", "z"]
        assert len(data) % tarfile.RECORDSIZE == 0
        b_info, z_info = members[3][0], members[4][0]
        assert b_info.isreg() and z_info.islnk() and z_info.linkname == "b"
        for info in (b_info, z_info):
            assert (info.mode, info.uid, info.gid, info.mtime) == (0o4750, 1000, 100, MTIME)
            assert (info.uname, info.gname) == ("", "")
        # Raw mode fields hold permission bits only (no 0100000 type bits).
        modes = re.findall(rb"\x00(0[0-7]{6})\x00", data)
        assert modes and all(int(m, 8) <= 0o7777 for m in modes)
        assert data[:2] == b"./"
        assert members[3][1] == b"zz" and members[4][1] == b"zz"
        assert rootfs.stats == RootfsStats(
            entries=5, files=2, dirs=2, symlinks=0, hardlinks=1, specials=0, data_bytes=4
        )


def test_extra_files_replace_and_add_in_sorted_position(tmp_path: Path) -> None:
    with flat(
        tmp_path,
        [
            [
                file("etc/fstab", b"old", mode=0o600),
                hardlink("etc/fstab.bak", "etc/fstab"),
                file("etc/zz", b"z"),
            ]
        ],
    ) as rootfs:
        data = tar_of(
            rootfs,
            [
                ExtraFile("etc/fstab", b"new\n"),
                ExtraFile("/etc/hostname", b"vm\n", mode=0o640, uid=5),
            ],
        )
        members = read_tar(data)
        assert [i.name for i, _ in members] == [
            ".",
            "etc",
            "etc/fstab",
            "etc/fstab.bak",
            "etc/hostname",
            "etc/zz",
        ]
        by_name = {i.name: (i, d) for i, d in members}
        assert by_name["etc/fstab"][1] == b"new\n"
        assert by_name["etc/fstab"][0].mode == 0o644
        bak = by_name["etc/fstab.bak"][0]
        assert bak.isreg() and by_name["etc/fstab.bak"][1] == b"old"  # broken out of the set
        assert bak.mode == 0o600
        assert (by_name["etc/hostname"][0].mode, by_name["etc/hostname"][0].uid) == (0o640, 5)
        # The flattened view itself does not change.
        assert content(rootfs, "etc/fstab") == b"old"


@pytest.mark.parametrize(
    ("path", "why"),
    [("nodir/file", "not a directory"), ("etc", "directory there"), ("link/x", "not a dir")],
)
def test_bad_extra_files_are_refused(tmp_path: Path, path: str, why: str) -> None:
    with (
        flat(tmp_path, [[directory("etc"), symlink("link", "etc")]]) as rootfs,
        pytest.raises(ImageError, match=why),
    ):
        rootfs.write_tar(io.BytesIO(), extra=[ExtraFile(path, b"x")])


def test_same_image_gives_the_same_bytes(tmp_path: Path) -> None:
    layers = [
        Layer(
            [
                file("b", b"1"),
                hardlink("a", "b"),
                directory("d"),
                file("d/x", b"x" * 3000),
                file(LATIN1_NAME, b"l", xattrs={"user.k": b"\xff"}),
            ],
            compression="gzip",
        ),
        Layer([whiteout("d/x"), file("c", b"c", mtime=MTIME + 0.5)], compression="zstd"),
    ]
    image = make_image(tmp_path / "oci", layers)
    with (
        flatten(image, tmp_path / "w1", source_date_epoch=MTIME) as one,
        flatten(image, tmp_path / "w2", source_date_epoch=MTIME) as two,
    ):
        first, second = tar_of(one), tar_of(two)
    assert first == second
    other = make_image(tmp_path / "oci2", layers)
    with flatten(other, tmp_path / "w3", source_date_epoch=MTIME) as three:
        assert tar_of(three) == first


def test_open_and_lookup_follow_no_symlinks(tmp_path: Path) -> None:
    with flat(
        tmp_path,
        [[directory("real"), file("real/f", b"f"), symlink("l", "real"), symlink("lf", "real/f")]],
    ) as rootfs:
        assert rootfs.lookup("l/f") is None
        with pytest.raises(ImageError, match="not a regular file"):
            rootfs.open("lf")
        with pytest.raises(ImageError):
            rootfs.open("l/f")
        assert rootfs.lookup("/real/f") == entry(rootfs, "real/f")


def test_write_tar_to_a_pipe_consumer(tmp_path: Path) -> None:
    """The canonical tar as mke2fs reads it: hard links keep setuid mode and owner."""
    with flat(
        tmp_path,
        [
            [
                file(
                    "usr/bin/sudo",
                    b"#!sudo\n",
                    mode=0o4755,
                    uid=0,
                    gid=0,
                    xattrs={"security.capability": CAP},
                )
            ],
            # Docker-style upper layer: the link's own header disagrees with its file.
            [
                file("opt/tool", b"tool", mode=0o4750, uid=1000, gid=1000),
                hardlink("bin/tool", "opt/tool", mode=0o644, uid=0, gid=0),
                hardlink("usr/bin/sudoedit", "usr/bin/sudo"),
            ],
        ],
    ) as rootfs:
        tar_path = tmp_path / "rootfs.tar"
        with tar_path.open("wb") as out:
            rootfs.write_tar(out)
    img = tmp_path / "fs.img"
    with img.open("wb") as f:
        f.truncate(32 << 20)
    with tar_path.open("rb") as stdin:
        run.run(
            [
                "mke2fs",
                "-q",
                "-F",
                "-t",
                "ext4",
                "-d",
                "-",
                "-E",
                "root_owner=0:0",
                str(img),
                "8192",
            ],
            stdin=stdin,
        )

    def stat(path: str) -> dict[str, str]:
        text = run.run(["debugfs", "-R", f"stat {path}", str(img)]).stdout.decode()
        fields = dict(re.findall(r"(\w+):\s+(\S+)", text))
        return fields

    for path in ("/bin/tool", "/opt/tool"):
        st = stat(path)
        assert (st["Mode"], st["User"], st["Group"], st["Links"]) == ("04750", "1000", "1000", "2")
        assert st["Type"] == "regular"
        got = run.run(["debugfs", "-R", f"cat {path}", str(img)]).stdout
        assert got == b"tool"
    sudo = stat("/usr/bin/sudoedit")
    assert (sudo["Mode"], sudo["User"], sudo["Links"]) == ("04755", "0", "2")
    ea = run.run(["debugfs", "-R", "ea_list /usr/bin/sudo", str(img)]).stdout.decode()
    assert "security.capability" in ea


# ------------------------------------------------------------------ sparse and huge files


@pytest.mark.parametrize("fmt", SPARSE_FORMATS)
def test_sparse_files_become_regular_files_with_zeros(tmp_path: Path, fmt: str) -> None:
    size = 1 << 20
    segments = [(0, b"h" * 512), (65536, b"x" * 3072), (size - 512, b"E" * 512)]
    expected = bytearray(size)
    for offset, data in segments:
        expected[offset : offset + len(data)] = data
    with flat(
        tmp_path, [[file("before", b"b"), sparse_file("sp", size, segments, format=fmt)]]
    ) as rootfs:
        sp = entry(rootfs, "sp")
        assert (sp.kind, sp.size) == (Kind.FILE, size)
        assert content(rootfs, "sp") == expected
        with rootfs.open("sp") as f:
            f.seek(65536 + 3000)
            assert f.read(100) == b"x" * 72 + bytes(28)
        out = {i.name: (i, d) for i, d in read_tar(tar_of(rootfs))}
        info, data = out["sp"]
        assert info.type == tarfile.REGTYPE and info.sparse is None
        assert data == expected
        assert rootfs.stats.data_bytes == size + 1


class _ProbeSink(io.RawIOBase):
    """Counts what it is given and keeps only the head and a few probed ranges."""

    def __init__(self, probes: Sequence[tuple[int, int]]) -> None:
        self.size = 0
        self.head = bytearray()
        self.largest_write = 0
        self.probes = {p: bytearray() for p in probes}

    def writable(self) -> bool:
        return True

    def write(self, data: Any) -> int:
        view = memoryview(data).cast("B")
        start, n = self.size, len(view)
        if len(self.head) < 65536:
            self.head += view[: 65536 - len(self.head)]
        for (offset, length), got in self.probes.items():
            lo, hi = max(offset, start), min(offset + length, start + n)
            if lo < hi:
                got += view[lo - start : hi - start]
        self.size += n
        self.largest_write = max(self.largest_write, n)
        return n


def peak_rss_kib() -> int:
    with open("/proc/self/status") as status:
        return int(next(line.split()[1] for line in status if line.startswith("VmHWM:")))


def reset_peak_rss_kib() -> int:
    """Reset this process's peak RSS to its current RSS and return it.

    ru_maxrss never goes down, so after earlier tests grew the process a later growth
    would not show; writing 5 to clear_refs resets the peak (Linux >= 4.0).
    """
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    return peak_rss_kib()


def test_a_sparse_file_larger_than_8_gib_streams_in_bounded_memory(tmp_path: Path) -> None:
    huge = 9 << 30  # past the 8 GiB limit of the ustar size field
    tail = huge - 4096
    member = sparse_file("huge", huge, [(0, b"head" * 128), (tail, b"tail" * 1024)])
    before = reset_peak_rss_kib()
    with flat(tmp_path, [[member, file("z", b"after")]]) as rootfs:
        assert entry(rootfs, "huge").size == huge
        assert rootfs.stats.data_bytes == huge + 5
        with rootfs.open("huge") as f:
            f.seek(tail - 2)
            assert f.read(6) == b"\0\0tail"
        data_start = 4 * 512  # headers: ".", then for "huge" PAX header, its records, ustar
        sink = _ProbeSink([(data_start, 8), (data_start + tail, 16)])
        rootfs.write_tar(sink)  # type: ignore[arg-type]
    grown_mib = (peak_rss_kib() - before) / 1024
    assert grown_mib < 64
    assert sink.largest_write <= 1 << 20
    with tarfile.open(fileobj=io.BytesIO(bytes(sink.head)), mode="r:") as tar:
        assert tar.next() is not None  # "."
        info = tar.next()
    assert info is not None and (info.name, info.size, info.type) == ("huge", huge, tarfile.REGTYPE)
    assert info.offset_data == data_start
    assert info.pax_headers["size"] == str(huge)
    assert sink.probes[(data_start, 8)] == b"headhead"
    assert sink.probes[(data_start + tail, 16)] == b"tail" * 4
    # The "z" member follows the 9 GiB of data; the stream ends on a record boundary.
    assert sink.size > huge and sink.size % tarfile.RECORDSIZE == 0


def test_nanosecond_mtimes_are_kept_exactly(tmp_path: Path) -> None:
    member = file("f", b"x")
    member.info.pax_headers = {"mtime": "1700000000.123456789"}
    with flat(tmp_path, [[member, file("old", b"o", mtime=-1.5)]]) as rootfs:
        out = tar_of(rootfs)
        by_name = {i.name: i for i, _ in read_tar(out)}
    assert by_name["f"].pax_headers["mtime"] == "1700000000.123456789"
    assert by_name["old"].pax_headers["mtime"] == "-1.5"


# ------------------------------------------------------------------ inputs


@pytest.mark.parametrize(
    ("media_type", "compression"),
    [
        (MT_DOCKER_LAYER, "none"),
        (MT_DOCKER_LAYER_GZIP, "gzip"),
        ("application/vnd.oci.image.layer.nondistributable.v1.tar+zstd", "zstd"),
    ],
)
def test_docker_and_nondistributable_media_types(
    tmp_path: Path, media_type: str, compression: str
) -> None:
    layers = [
        Layer([file("a", b"1")], compression=compression, media_type=media_type),
        Layer([whiteout("a"), file("b", b"2")], compression=compression, media_type=media_type),
    ]
    with flat(tmp_path, layers) as rootfs:
        assert paths(rootfs) == [".", "b"]


def test_docker_archive_input_equals_the_oci_layout(tmp_path: Path) -> None:
    """What `docker save` writes: layer tars, a repeated layer as a symlink, a gzip layer."""
    layers = [
        Layer([file("a", b"1"), directory("d")]),
        Layer([file("d/x", b"x")], compression="gzip"),
        Layer([file("a", b"1"), directory("d")]),  # the same blob again
    ]
    archive = tmp_path / "image.tar"
    write_docker_archive(archive, layers)
    with tarfile.open(archive) as tar:
        assert any(m.issym() for m in tar.getmembers())
    with archive.open("rb") as stream:
        from_archive = layout_from_docker_archive(stream, tmp_path / "from-archive", None)
    assert [d.media_type for d in from_archive.layers] == [
        MT_OCI_LAYER,
        MT_OCI_LAYER_GZIP,
        MT_OCI_LAYER,
    ]
    with flatten(from_archive, tmp_path / "w1") as one:
        first = tar_of(one)
    with flatten(make_image(tmp_path / "oci", layers), tmp_path / "w2") as two:
        assert tar_of(two) == first


def _two_platform_layout(layout: Path, nested: bool) -> None:
    writer = LayoutWriter(layout)
    manifests = []
    for arch in ("amd64", "arm64"):
        blob = tar_bytes([file("arch", arch.encode())])
        layer = writer.add_bytes(blob, MT_OCI_LAYER)
        config = {
            "architecture": arch,
            "os": "linux",
            "rootfs": {"type": "layers", "diff_ids": [layer.digest]},
        }
        config_desc = writer.add_bytes(canonical_json(config), MT_OCI_CONFIG)
        manifest = {
            "schemaVersion": 2,
            "mediaType": MT_OCI_MANIFEST,
            "config": config_desc.to_json(),
            "layers": [layer.to_json()],
        }
        desc = writer.add_bytes(canonical_json(manifest), MT_OCI_MANIFEST)
        manifests.append(
            Descriptor(desc.media_type, desc.digest, desc.size, platform=Platform("linux", arch))
        )
    if nested:
        index = {"schemaVersion": 2, "manifests": [m.to_json() for m in manifests]}
        inner = writer.add_bytes(canonical_json(index), MT_OCI_INDEX)
        manifests = [Descriptor(inner.media_type, inner.digest, inner.size, {REF_NAME: "multi"})]
    top = {"schemaVersion": 2, "manifests": [m.to_json() for m in manifests]}
    (layout / "index.json").write_bytes(canonical_json(top))


@pytest.mark.parametrize("nested", [False, True], ids=["index.json", "nested-index"])
def test_a_multi_platform_index_picks_the_asked_platform(tmp_path: Path, nested: bool) -> None:
    _two_platform_layout(tmp_path / "oci", nested)
    for arch in ("arm64", "amd64"):
        image = open_layout(tmp_path / "oci", None, Platform.parse(f"linux/{arch}"))
        assert image.config.architecture == arch
        with flatten(image, tmp_path / f"w-{arch}") as rootfs:
            assert content(rootfs, "arch") == arch.encode()
    with pytest.raises(ImageError, match="no image for platform linux/s390x") as err:
        open_layout(tmp_path / "oci", None, Platform.parse("linux/s390x"))
    assert err.value.hint == "platforms present: linux/amd64, linux/arm64"
