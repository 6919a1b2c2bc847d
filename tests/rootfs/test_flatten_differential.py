"""The flattener against two independent implementations: umoci and the Docker Engine.

Each layer stack is flattened by oci2disk (read back from the canonical tar it writes),
unpacked by ``umoci raw unpack`` (run as root, so owners are real) and loaded into
Docker (``docker load`` + ``docker create`` + ``docker export``). The three trees are
compared entry by entry: path, type, mode, owner, size, content hash, link target,
hard-link set, device numbers and xattrs. Modification times are not compared (each
reference stamps the directories it creates with the time of day).

Stacks come from two places: hand-written edge cases in tests/data/flatten/*.toml, and
random stacks from hypothesis. Where a reference disagrees, the case file says so
(``[umoci]`` / ``[docker]`` with ``result = "error"`` or ``"differs"``), which paths differ
and what the OCI image spec says; the test fails if the disagreement goes away or
changes, so the notes stay true.

What the comparison leaves out, and why:
- ``docker export`` writes only the security.capability xattr, so Docker is compared
  on that one alone (umoci on all of them);
- Docker's container layer adds /.dockerenv, /dev, /proc, /sys and /etc/{hosts,...};
  the stacks never use those names and they are dropped from the export;
- the root directory itself (Docker's export has no entry for it).
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import stat
import tarfile
import tomllib
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from layerkit import (
    SPARSE_FORMATS,
    Layer,
    Member,
    TarFormat,
    device,
    directory,
    fifo,
    file,
    hardlink,
    make_image,
    opaque,
    sparse_file,
    symlink,
    whiteout,
    write_docker_archive,
)
from oci2disk import run
from oci2disk.errors import LayerError
from oci2disk.rootfs.flatten import flatten

log = logging.getLogger(__name__)

CASES_DIR = Path(__file__).parent.parent / "data" / "flatten"
CAPABILITY = "security.capability"
DOCKER_CONTAINER_PATHS = frozenset(
    {
        ".dockerenv",
        "dev",
        "dev/console",
        "dev/pts",
        "dev/shm",
        "etc",
        "etc/hostname",
        "etc/hosts",
        "etc/mtab",
        "etc/resolv.conf",
        "proc",
        "sys",
    }
)
FORMATS: dict[str, TarFormat] = {
    "pax": tarfile.PAX_FORMAT,
    "gnu": tarfile.GNU_FORMAT,
    "ustar": tarfile.USTAR_FORMAT,
}


# ---------------------------------------------------------------- one tree, as each sees it


@dataclass(frozen=True)
class Node:
    kind: str  # file dir symlink char block fifo
    mode: int  # permission bits; 0 for symlinks, which have none
    uid: int
    gid: int
    size: int = 0
    sha256: str = ""
    linkname: str = ""
    dev: tuple[int, int] = (0, 0)
    xattrs: tuple[tuple[str, bytes], ...] = ()
    links: tuple[str, ...] = ()  # every name of a hard-linked file, sorted


Tree = dict[str, Node]


class RefFailed(Exception):
    """A reference refused the image."""


def _norm(name: str) -> str:
    name = name.lstrip("/")
    while name.startswith("./"):
        name = name[2:]
    return name.rstrip("/") or "."


_TAR_KINDS = {
    tarfile.REGTYPE: "file",
    tarfile.AREGTYPE: "file",
    tarfile.DIRTYPE: "dir",
    tarfile.SYMTYPE: "symlink",
    tarfile.CHRTYPE: "char",
    tarfile.BLKTYPE: "block",
    tarfile.FIFOTYPE: "fifo",
}


def tree_of_tar(path: Path, drop: frozenset[str] = frozenset()) -> Tree:
    nodes: Tree = {}
    hard: list[tuple[str, str]] = []
    with tarfile.open(path, encoding="utf-8", errors="surrogateescape") as tar:
        for info in tar:
            name = _norm(info.name)
            if name == "." or name in drop:
                continue
            if info.islnk():
                hard.append((name, _norm(info.linkname)))
                continue
            digest = ""
            if info.isreg():
                f = tar.extractfile(info)
                assert f is not None
                digest = hashlib.sha256(f.read()).hexdigest()
            kind = _TAR_KINDS[info.type]
            xattrs = tuple(
                sorted(
                    (key[len("SCHILY.xattr.") :], value.encode("utf-8", "surrogateescape"))
                    for key, value in info.pax_headers.items()
                    if key.startswith("SCHILY.xattr.")
                )
            )
            nodes[name] = Node(
                kind=kind,
                mode=0 if kind == "symlink" else info.mode & 0o7777,
                uid=info.uid,
                gid=info.gid,
                size=info.size if kind == "file" else 0,
                sha256=digest,
                linkname=info.linkname if kind == "symlink" else "",
                dev=(info.devmajor, info.devminor) if kind in ("char", "block") else (0, 0),
                xattrs=xattrs,
            )
    groups: dict[str, list[str]] = {}
    for name, target in hard:
        nodes[name] = nodes[target]  # a linked symlink or device is the same as a copy
        if nodes[target].kind == "file":
            groups.setdefault(target, [target]).append(name)
    for names in groups.values():
        for name in names:
            nodes[name] = replace(nodes[name], links=tuple(sorted(names)))
    return nodes


def tree_of_dir(root: Path) -> Tree:
    nodes: Tree = {}
    inodes: dict[int, list[str]] = {}
    top = os.fsencode(root)
    for dirpath, dirnames, filenames in os.walk(top):
        for base in dirnames + filenames:
            full = os.path.join(dirpath, base)
            name = os.path.relpath(full, top).decode("utf-8", "surrogateescape")
            st = os.lstat(full)
            mode = st.st_mode
            kind = {
                stat.S_IFREG: "file",
                stat.S_IFDIR: "dir",
                stat.S_IFLNK: "symlink",
                stat.S_IFCHR: "char",
                stat.S_IFBLK: "block",
                stat.S_IFIFO: "fifo",
            }[stat.S_IFMT(mode)]
            digest = ""
            if kind == "file":
                with open(full, "rb") as f:
                    digest = hashlib.file_digest(f, "sha256").hexdigest()
                if st.st_nlink > 1:
                    inodes.setdefault(st.st_ino, []).append(name)
            xattrs: tuple[tuple[str, bytes], ...] = ()
            if kind != "symlink":
                xattrs = tuple(sorted((k, os.getxattr(full, k)) for k in os.listxattr(full)))
            nodes[name] = Node(
                kind=kind,
                mode=0 if kind == "symlink" else stat.S_IMODE(mode),
                uid=st.st_uid,
                gid=st.st_gid,
                size=st.st_size if kind == "file" else 0,
                sha256=digest,
                linkname=os.readlink(full).decode("utf-8", "surrogateescape")
                if kind == "symlink"
                else "",
                dev=(os.major(st.st_rdev), os.minor(st.st_rdev))
                if kind in ("char", "block")
                else (0, 0),
                xattrs=xattrs,
            )
    for names in inodes.values():
        if len(names) > 1:
            for name in names:
                nodes[name] = replace(nodes[name], links=tuple(sorted(names)))
    return nodes


# ---------------------------------------------------------------- the three implementations


def tree_of_oci2disk(layers: Sequence[Layer], tmp: Path) -> Tree:
    image = make_image(tmp / "oci-ours", layers)
    with flatten(image, tmp / "work") as rootfs, (tmp / "ours.tar").open("wb") as out:
        rootfs.write_tar(out)
    return tree_of_tar(tmp / "ours.tar")


def tree_of_umoci(layers: Sequence[Layer], tmp: Path) -> Tree:
    make_image(tmp / "oci-umoci", layers, tag="ref")
    out = tmp / "umoci"
    result = run.run(
        ["umoci", "raw", "unpack", "--image", f"{tmp / 'oci-umoci'}:ref", os.fspath(out)],
        check=False,
    )
    if result.returncode:
        raise RefFailed(result.stderr.decode(errors="replace").strip())
    return tree_of_dir(out)


def tree_of_docker(layers: Sequence[Layer], tmp: Path) -> Tree:
    tag = f"oci2disk-differential:{uuid.uuid4().hex[:16]}"
    archive = tmp / "docker-archive.tar"
    write_docker_archive(archive, layers, tag=tag)
    loaded = run.run(["docker", "load", "-q", "-i", os.fspath(archive)], check=False)
    if loaded.returncode:
        raise RefFailed(loaded.stderr.decode(errors="replace").strip())
    try:
        container = run.run(["docker", "create", tag, "true"]).stdout.decode().strip()
        try:
            run.run(["docker", "export", "-o", os.fspath(tmp / "export.tar"), container])
        finally:
            run.run(["docker", "rm", container], check=False)
    finally:
        run.run(["docker", "rmi", tag], check=False)
    return tree_of_tar(tmp / "export.tar", DOCKER_CONTAINER_PATHS)


REFERENCES: dict[str, Callable[[Sequence[Layer], Path], Tree]] = {
    "umoci": tree_of_umoci,
    "docker": tree_of_docker,
}


def differences(
    ours: Tree, theirs: Tree, reference: str
) -> dict[str, tuple[Node | None, Node | None]]:
    def seen(node: Node | None) -> Node | None:
        if node is None or reference != "docker":
            return node
        return replace(node, xattrs=tuple(x for x in node.xattrs if x[0] == CAPABILITY))

    found = {}
    for path in sorted(ours.keys() | theirs.keys()):
        a, b = seen(ours.get(path)), seen(theirs.get(path))
        if a != b:
            found[path] = (a, b)
    return found


def explain(diff: Mapping[str, tuple[Node | None, Node | None]], reference: str) -> str:
    lines = [f"oci2disk and {reference} differ at {len(diff)} path(s):"]
    for path, (a, b) in diff.items():
        lines += [f"  {path!r}", f"    oci2disk: {a}", f"    {reference}: {b}"]
    return "\n".join(lines)


# ---------------------------------------------------------------- the hand-written corpus


@dataclass(frozen=True)
class Expect:
    result: str = "same"  # same | differs | error
    paths: tuple[str, ...] = ()
    note: str = ""


@dataclass(frozen=True)
class Case:
    name: str
    description: str
    layers: tuple[Layer, ...]
    expect: Mapping[str, Expect] = field(default_factory=dict)


def _raw_text(text: str) -> str:
    r"""Case files write a byte that is not UTF-8 as \xNN (TOML strings are Unicode)."""
    raw = re.sub(rb"\\x([0-9a-fA-F]{2})", lambda m: bytes([int(m[1], 16)]), text.encode())
    return raw.decode("utf-8", "surrogateescape")


def _value(text: str) -> bytes:
    return bytes.fromhex(text[4:]) if text.startswith("hex:") else text.encode()


def _member(spec: Mapping[str, Any]) -> Member:
    path = _raw_text(spec["path"])
    kind = spec["type"]
    meta = {k: spec[k] for k in ("mode", "uid", "gid", "mtime") if k in spec}
    xattrs = {k: _value(v) for k, v in spec.get("xattrs", {}).items()}
    if kind == "file":
        return file(path, spec.get("data", "").encode(), xattrs=xattrs or None, **meta)
    if kind == "dir":
        return directory(path, xattrs=xattrs or None, **meta)
    if kind == "symlink":
        return symlink(path, _raw_text(spec["target"]))
    if kind == "hardlink":
        return hardlink(path, _raw_text(spec["target"]), **meta)
    if kind in ("char", "block"):
        return device(
            path, spec["major"], spec["minor"], block=kind == "block", mode=spec.get("mode", 0o600)
        )
    if kind == "fifo":
        return fifo(path, mode=spec.get("mode", 0o644))
    if kind == "whiteout":
        return whiteout(path)
    if kind == "opaque":
        return opaque(path)
    if kind == "sparse":
        segments = [(offset, text.encode() * count) for offset, text, count in spec["segments"]]
        return sparse_file(path, spec["size"], segments, format=spec["format"])
    raise ValueError(f"unknown entry type {kind!r}")


def load_case(path: Path) -> Case:
    data = tomllib.loads(path.read_text())
    layers = tuple(
        Layer(
            [_member(e) for e in layer["entries"]],
            compression=layer.get("compression", "none"),
            format=FORMATS[layer.get("format", "pax")],
        )
        for layer in data["layers"]
    )
    expect = {
        ref: Expect(data[ref]["result"], tuple(data[ref].get("paths", ())), data[ref]["note"])
        for ref in REFERENCES
        if ref in data
    }
    return Case(path.stem, data["description"], layers, expect)


CASES = [load_case(p) for p in sorted(CASES_DIR.glob("*.toml"))]


def check_case(case: Case, reference: str, tmp: Path) -> None:
    ours = tree_of_oci2disk(case.layers, tmp)
    expect = case.expect.get(reference, Expect())
    try:
        theirs = REFERENCES[reference](case.layers, tmp)
    except RefFailed as exc:
        assert expect.result == "error", f"{reference} refused {case.name}: {exc}"
        return
    assert expect.result != "error", (
        f"{reference} now accepts {case.name}: update tests/data/flatten/{case.name}.toml"
    )
    diff = differences(ours, theirs, reference)
    if expect.result == "differs":
        assert set(diff) == set(expect.paths), explain(diff, reference)
    else:
        assert not diff, explain(diff, reference)


def test_the_corpus_covers_the_issue() -> None:
    """Every semantic case of the issue has a case file (a guard against losing one)."""
    names = {case.name for case in CASES}
    assert len(CASES) >= 25
    for needed in (
        "whiteout-subtree",
        "whiteout-after-same-layer-entry",
        "opaque-with-new-entries",
        "replace-file-and-dir",
        "dir-metadata-changed",
        "hardlink-target-replaced-later",
        "hardlink-across-layers",
        "implied-parent-over-lower-dir",
        "duplicates-last-wins",
        "long-names-gnu",
        "non-utf8-names-pax",
        "xattrs",
        "special-bits",
        "devices-fifos",
        "sparse-pax1.0",
        "compressed-and-mtimes",
    ):
        assert needed in names
    assert {f"sparse-{f}" for f in SPARSE_FORMATS} <= names


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_corpus_equals_umoci(case: Case, tmp_path: Path) -> None:
    check_case(case, "umoci", tmp_path)


@pytest.mark.slow
@pytest.mark.docker
@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_corpus_equals_docker(case: Case, tmp_path: Path) -> None:
    check_case(case, "docker", tmp_path)


# ---------------------------------------------------------------- random stacks

NAMES = ("a", "b", "c")
KINDS = ("file", "file", "dir", "dir", "symlink", "hardlink", "fifo", "whiteout", "opaque")
MODES = {"file": (0o644, 0o600, 0o755, 0o4755, 0o2711), "dir": (0o755, 0o700, 0o1777, 0o2750)}
CONTENTS = (b"", b"x", b"hello\n", bytes(range(256)) * 5)


@dataclass
class _Seen:
    kind: str
    layer: int
    mode: int
    uid: int
    gid: int
    xattrs: dict[str, bytes] | None = None


class _Model:
    """What the stack holds so far, just enough to keep generated stacks valid: no entry
    below a non-directory, hard links only to files."""

    def __init__(self) -> None:
        self.paths: dict[tuple[str, ...], _Seen] = {}

    def below(self, parts: tuple[str, ...]) -> list[tuple[str, ...]]:
        return [p for p in self.paths if len(p) > len(parts) and p[: len(parts)] == parts]

    def parents_are_dirs(self, parts: tuple[str, ...]) -> bool:
        return all(
            self.paths.get(parts[:i], _Seen("dir", 0, 0, 0, 0)).kind == "dir"
            for i in range(1, len(parts))
        )

    def write(self, parts: tuple[str, ...], seen: _Seen) -> None:
        for i in range(1, len(parts)):
            self.paths.setdefault(parts[:i], _Seen("dir", seen.layer, 0o755, 0, 0))
        old = self.paths.get(parts)
        if old is None or old.kind != "dir" or seen.kind != "dir":
            for p in self.below(parts):
                del self.paths[p]
        self.paths[parts] = seen

    def remove(self, parts: tuple[str, ...], keep_top: bool) -> None:
        for p in self.below(parts):
            del self.paths[p]
        if not keep_top:
            self.paths.pop(parts, None)


@st.composite
def stacks(draw: st.DrawFn, docker_safe: bool) -> list[Layer]:
    """Random layer stacks over a tiny namespace, so names collide often.

    With ``docker_safe`` the stacks look like the layers Docker writes itself: every
    parent directory has its own entry in the layer, a whiteout's path has no other
    entry in its layer, hard links stay inside their layer, and an opaque directory is
    written in the same layer. Without it, only the one order umoci handles differently
    (a whiteout after its own layer's entries below the path) is avoided.
    """
    model = _Model()
    layers = []
    for index in range(draw(st.integers(1, 4))):
        members: list[Member] = []
        written: set[tuple[str, ...]] = set()  # this layer's entries and their parents
        whited: set[tuple[str, ...]] = set()
        opaqued: set[tuple[str, ...]] = set()
        for _ in range(draw(st.integers(1, 8))):
            parts = tuple(draw(st.lists(st.sampled_from(NAMES), min_size=1, max_size=3)))
            kind = draw(st.sampled_from(KINDS))
            path = "/".join(parts)
            if not model.parents_are_dirs(parts):
                continue
            if docker_safe and any(parts[: len(w)] == w for w in whited):
                continue
            if kind in ("whiteout", "opaque"):
                if any(len(p) > len(parts) and p[: len(parts)] == parts for p in written):
                    continue
                if kind == "opaque":
                    if parts not in model.paths or model.paths[parts].kind != "dir":
                        continue
                    if docker_safe and parts in opaqued:
                        continue
                    opaqued.add(parts)
                    if docker_safe:
                        members += _explicit_dirs(draw, model, (*parts, "x"), index, written)
                    members.append(opaque(path))
                    model.remove(parts, keep_top=True)
                    continue
                if docker_safe:
                    # overlay2 creates a whiteout's missing parents (and so replaces the
                    # lower ones' attributes); Docker's own layers write the parents too.
                    if parts in written or not all(
                        parts[:i] in model.paths for i in range(1, len(parts))
                    ):
                        continue
                    members += _explicit_dirs(draw, model, parts, index, written)
                members.append(whiteout(path))
                mine = parts in model.paths and model.paths[parts].layer == index
                model.remove(parts, keep_top=mine)
                whited.add(parts)
                continue
            if docker_safe and parts in written:
                continue  # Docker refuses a path named twice in a layer
            if docker_safe:
                members += _explicit_dirs(draw, model, parts, index, written)
            uid, gid = draw(st.sampled_from(((0, 0), (1000, 1000), (0, 42))))
            if kind == "hardlink":
                targets = sorted(
                    p
                    for p, s in model.paths.items()
                    if s.kind == "file" and p != parts and (not docker_safe or s.layer == index)
                )
                if not targets:
                    continue
                target = draw(st.sampled_from(targets))
                seen = model.paths[target]
                # Like Docker's own layers, the link header repeats its file's attributes.
                members.append(
                    hardlink(
                        path,
                        "/".join(target),
                        mode=seen.mode,
                        uid=seen.uid,
                        gid=seen.gid,
                        xattrs=seen.xattrs,
                    )
                )
                model.write(parts, replace(seen, layer=index))
            elif kind in ("file", "dir"):
                mode = draw(st.sampled_from(MODES[kind]))
                xattrs = draw(
                    st.sampled_from(
                        (
                            None,
                            None,
                            {"user.k": b"v"},
                            {CAPABILITY: b"\x01\x00\x00\x02" + bytes(16)},
                        )
                    )
                )
                if kind == "file":
                    data = draw(st.sampled_from(CONTENTS))
                    members.append(file(path, data, mode=mode, uid=uid, gid=gid, xattrs=xattrs))
                else:
                    members.append(directory(path, mode=mode, uid=uid, gid=gid, xattrs=xattrs))
                model.write(parts, _Seen(kind, index, mode, uid, gid, xattrs))
            elif kind == "symlink":
                members.append(symlink(path, draw(st.sampled_from(("a", "../b", "/etc/x", "c/d")))))
                model.write(parts, _Seen("symlink", index, 0, 0, 0))
            else:
                members.append(fifo(path, mode=0o600))
                model.write(parts, _Seen("fifo", index, 0o600, 0, 0))
            written.update(parts[:i] for i in range(1, len(parts) + 1))
        fmt = draw(st.sampled_from((FORMATS["pax"], FORMATS["gnu"])))
        compression = draw(st.sampled_from(("none", "gzip")))
        layers.append(Layer(members, compression=compression, format=fmt))
    return layers


def _explicit_dirs(
    draw: st.DrawFn,
    model: _Model,
    parts: tuple[str, ...],
    index: int,
    written: set[tuple[str, ...]],
) -> list[Member]:
    """Entries for the parents of ``parts`` that this layer has not written yet."""
    out = []
    for i in range(1, len(parts)):
        parent = parts[:i]
        if parent in written:
            continue
        mode = draw(st.sampled_from(MODES["dir"]))
        out.append(directory("/".join(parent), mode=mode))
        model.write(parent, _Seen("dir", index, mode, 0, 0))
        written.add(parent)
    return out


def _check_random(layers: list[Layer], reference: str, tmp_root: Path) -> None:
    tmp = tmp_root / uuid.uuid4().hex
    tmp.mkdir()
    try:
        ours = tree_of_oci2disk(layers, tmp)
    except LayerError as exc:
        # Refusing is right only if the reference refuses the stack too.
        with pytest.raises(RefFailed):
            REFERENCES[reference](layers, tmp)
        log.info("both refuse: %s", exc)
        return
    theirs = REFERENCES[reference](layers, tmp)
    diff = differences(ours, theirs, reference)
    assert not diff, explain(diff, reference)


@settings(
    max_examples=200,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(layers=stacks(docker_safe=False))
def test_random_stacks_equal_umoci(layers: list[Layer], tmp_path: Path) -> None:
    _check_random(layers, "umoci", tmp_path)


@pytest.mark.slow
@pytest.mark.docker
@settings(
    max_examples=25,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(layers=stacks(docker_safe=True))
def test_random_stacks_equal_docker(layers: list[Layer], tmp_path: Path) -> None:
    _check_random(layers, "docker", tmp_path)
