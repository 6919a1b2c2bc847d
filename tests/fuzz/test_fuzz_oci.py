"""Fuzzing the readers of untrusted input: the OCI layout parser, the layer reader and the
flattener. Generated inputs must give a result or an Oci2DiskError, never another
exception, a hang or a write outside the work directory.

Bounded for the test command (FUZZ_EXAMPLES examples per target, derandomized so CI
is repeatable); set OCI2DISK_FUZZ_EXAMPLES=5000 OCI2DISK_FUZZ_RANDOM=1 to search longer.
Crashers found are kept below as regression cases (@example).
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import tarfile
from pathlib import Path
from typing import Any

import hypothesis.strategies as st
from hypothesis import HealthCheck, example, given, settings

from layerkit import Layer, Member, make_image, tar_bytes
from oci2disk.errors import Oci2DiskError
from oci2disk.oci.layout import LayoutWriter, canonical_json, open_layout
from oci2disk.rootfs import Kind
from oci2disk.rootfs.flatten import flatten

FUZZ_EXAMPLES = int(os.environ.get("OCI2DISK_FUZZ_EXAMPLES", "150"))
FUZZ = settings(
    max_examples=FUZZ_EXAMPLES,
    deadline=None,
    derandomize=not os.environ.get("OCI2DISK_FUZZ_RANDOM"),
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
    database=None,
)

# Names made of the parts that matter to a flattener: traversal, whiteouts, links.
PARTS = st.sampled_from(["a", "b", "etc", ".", "..", ".wh.a", ".wh..wh..opq", "", "c d", "é"])
NAMES = st.lists(PARTS, min_size=1, max_size=4).map("/".join)
TYPES = st.sampled_from(
    [
        tarfile.REGTYPE,
        tarfile.DIRTYPE,
        tarfile.SYMTYPE,
        tarfile.LNKTYPE,
        tarfile.CHRTYPE,
        tarfile.BLKTYPE,
        tarfile.FIFOTYPE,
        tarfile.GNUTYPE_SPARSE,
        b"V",
    ]
)
PAX_KEYS = st.sampled_from(
    ["SCHILY.xattr.user.x", "LIBARCHIVE.xattr.user.y", "mtime", "uid", "size", "path"]
)


@st.composite
def members(draw: st.DrawFn) -> Member:
    info = tarfile.TarInfo(draw(NAMES))
    info.type = draw(TYPES)
    info.mode = draw(st.integers(0, 0o7777))
    info.uid = draw(st.integers(0, 70000))
    info.gid = draw(st.integers(0, 70000))
    info.mtime = draw(st.integers(0, 2**33))
    data = b""
    if info.type == tarfile.REGTYPE:
        data = draw(st.binary(max_size=64))
        info.size = len(data)
    elif info.type in (tarfile.SYMTYPE, tarfile.LNKTYPE):
        info.linkname = draw(NAMES)
    elif info.type in (tarfile.CHRTYPE, tarfile.BLKTYPE):
        info.devmajor = draw(st.integers(0, 4095))
        info.devminor = draw(st.integers(0, 255))
    pax = draw(st.dictionaries(PAX_KEYS, st.text(max_size=12), max_size=2))
    info.pax_headers = pax
    return Member(info, data)


def _snapshot(root: Path) -> set[str]:
    return {os.fspath(p.relative_to(root)) for p in root.rglob("*")}


def _flatten_or_refuse(tmp: Path, layers: list[Layer]) -> None:
    try:
        image = make_image(tmp / "oci", layers)
    except (ValueError, OverflowError, UnicodeError, tarfile.TarError):
        return  # tarfile itself cannot write this member: not an input to us
    before = _snapshot(tmp)
    try:
        with flatten(image, tmp / "work") as rootfs:
            paths = [e.path for e in rootfs.entries()]
            # Canonical order, no escape, every name normalized.
            assert paths[0] == "."
            assert all(".." not in p.split("/") and not p.startswith("/") for p in paths[1:])
            out = io.BytesIO()
            rootfs.write_tar(out)
            with tarfile.open(fileobj=io.BytesIO(out.getvalue())) as archive:
                names = [m.name for m in archive]
            assert [n.removeprefix("./").rstrip("/") or "." for n in names] == paths
            for entry in rootfs.entries():
                if entry.kind is Kind.FILE:
                    with rootfs.open(entry.path) as f:
                        assert len(f.read()) == entry.size
    except Oci2DiskError:
        pass
    after = _snapshot(tmp)
    assert after - before <= {"work"} | {p for p in after if p.startswith("work/")}


@FUZZ
@given(layers=st.lists(st.lists(members(), max_size=6), min_size=1, max_size=3))
def test_flatten_never_crashes_on_generated_layers(
    tmp_path_factory: Any, layers: list[list[Member]]
) -> None:
    tmp = tmp_path_factory.mktemp("fuzz")
    _flatten_or_refuse(tmp, [Layer(m) for m in layers])


@FUZZ
@given(
    layer=st.lists(members(), min_size=1, max_size=5),
    cut=st.integers(0, 4096),
    flips=st.lists(st.tuples(st.integers(0, 4095), st.integers(0, 255)), max_size=6),
    compression=st.sampled_from(["none", "gzip", "zstd"]),
)
@example(layer=[Member(tarfile.TarInfo("a"))], cut=100, flips=[], compression="gzip")
def test_flatten_never_crashes_on_damaged_layers(
    tmp_path_factory: Any,
    layer: list[Member],
    cut: int,
    flips: list[tuple[int, int]],
    compression: str,
) -> None:
    tmp = tmp_path_factory.mktemp("fuzz")
    try:
        raw = bytearray(tar_bytes(layer))
    except (ValueError, OverflowError, UnicodeError, tarfile.TarError):
        return
    for position, value in flips:
        if position < len(raw):
            raw[position] = value
    data = bytes(raw[: len(raw) - min(cut, len(raw))])
    # diff_ids claim what the damaged data hashes to, so the flattener must deal with the
    # bytes themselves, not stop at a digest check.
    _flatten_or_refuse(tmp, [Layer(raw=data, compression=compression)])


JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-5, 2**40) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=10), inner),
    max_leaves=8,
)
DIGEST = "sha256:" + "0" * 64


@st.composite
def documents(draw: st.DrawFn) -> dict[str, Any]:
    """An index, manifest and config where any part may have the wrong shape."""
    descriptor: dict[str, Any] = {
        "mediaType": draw(
            st.sampled_from(
                [
                    "application/vnd.oci.image.manifest.v1+json",
                    "application/vnd.oci.image.index.v1+json",
                    "",
                ]
            )
        ),
        "digest": DIGEST,
        "size": 2,
    }
    for key in draw(st.lists(st.sampled_from(["mediaType", "digest", "size", "platform"]))):
        descriptor[key] = draw(JSON_VALUES)
    config: Any = {
        "architecture": "amd64",
        "os": "linux",
        "rootfs": {"type": "layers", "diff_ids": []},
        "config": {},
    }
    for key in draw(st.lists(st.sampled_from(["rootfs", "config", "architecture"]), max_size=2)):
        config[key] = draw(JSON_VALUES)
    if draw(st.booleans()):
        config["config"] = {draw(st.sampled_from(["Env", "Cmd", "Entrypoint"])): draw(JSON_VALUES)}
    manifest: Any = {"schemaVersion": 2, "config": None, "layers": draw(JSON_VALUES)}
    index: Any = {"schemaVersion": 2, "manifests": [descriptor]}
    if draw(st.booleans()):
        index = draw(JSON_VALUES)
    return {"index": index, "manifest": manifest, "config": config}


@FUZZ
@given(docs=documents())
def test_open_layout_never_crashes_on_wrong_shapes(
    tmp_path_factory: Any, docs: dict[str, Any]
) -> None:
    layout = tmp_path_factory.mktemp("layout")
    writer = LayoutWriter(layout)
    config = writer.add_bytes(canonical_json(docs["config"]), "application/vnd.oci.image.config")
    manifest = dict(docs["manifest"])
    manifest["config"] = config.to_json()
    desc = writer.add_bytes(canonical_json(manifest), "application/vnd.oci.image.manifest.v1+json")
    index = docs["index"]
    if isinstance(index, dict) and isinstance(index.get("manifests"), list):
        for entry in index["manifests"]:
            if isinstance(entry, dict) and entry.get("digest") == DIGEST:
                entry["digest"] = desc.digest
                if entry.get("size") == 2:
                    entry["size"] = desc.size
    (layout / "index.json").write_text(json.dumps(index))
    with contextlib.suppress(Oci2DiskError):
        open_layout(layout)
