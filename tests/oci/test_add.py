"""Files added to an existing image without a rebuild (``--add SRC:DEST[:UID:GID]``):
an extra layer made by umoci on an OCI layout, by an unprivileged user, with the owners
asked for, and `verify` finds them in the converted disk."""

from __future__ import annotations

import json
import os
import subprocess
import tarfile
from pathlib import Path

import pytest

from clikit import oci2disk
from layerkit import directory, file, make_image
from oci2disk.diskimage.extfs import open_filesystem
from oci2disk.errors import UsageError
from oci2disk.oci.add import Addition, add_files
from oci2disk.oci.layout import open_layout
from test_unprivileged import NOBODY, run_as_nobody, unprivileged_python

__all__ = ["unprivileged_python"]  # the fixture, used by name

ADD_SCRIPT = """\
import json, sys
from pathlib import Path
from oci2disk.oci.add import Addition, add_files
from oci2disk.oci.layout import open_layout

base, out, *adds = sys.argv[1:]
image = add_files(open_layout(Path(base), "base"), [Addition.parse(a) for a in adds], Path(out))
print(json.dumps({"digest": image.digest, "layers": len(image.layers)}))
"""


def test_addition_syntax() -> None:
    assert Addition.parse("bench:/opt/bench") == Addition(Path("bench"), "/opt/bench", 0, 0)
    assert Addition.parse("b:/opt/b:1000:100") == Addition(Path("b"), "/opt/b", 1000, 100)
    for bad in ("bench", "bench:/opt:1000", "b:/o:x:y", ":/opt"):
        with pytest.raises(UsageError, match="SRC:DEST"):
            Addition.parse(bad)
    with pytest.raises(UsageError, match="not an absolute path"):
        Addition(Path("."), "opt/bench").check()


def test_unprivileged_user_adds_a_directory(
    outdir: Path, unprivileged_python: tuple[str, dict[str, str]]
) -> None:
    base = outdir / "base"
    make_image(
        base,
        [[directory("etc"), file("etc/os-release", b"ID=test\n"), directory("opt")]],
        tag="base",
    )
    bench = outdir / "bench"
    (bench / "data").mkdir(parents=True)
    (bench / "run.sh").write_text("#!/bin/sh\necho benchmark\n")
    (bench / "run.sh").chmod(0o755)
    (bench / "data" / "input.txt").write_bytes(b"1 2 3\n" * 1000)
    os.symlink("data/input.txt", bench / "input")
    motd = outdir / "motd"
    motd.write_text("added by oci2disk\n")
    for path in [base, *base.rglob("*")]:
        path.chmod(0o755 if path.is_dir() else 0o644)
    for path in [bench, *bench.rglob("*"), motd]:  # the user's own files
        os.lchown(path, NOBODY, NOBODY)

    python, env = unprivileged_python
    added = outdir / "added"
    who = subprocess.run(
        ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups",
         "--inh-caps=-all", "--bounding-set=-all",
         python, "-c", ADD_SCRIPT, str(base), str(added),
         f"{bench}:/opt/bench:1000:1001", f"{motd}:/etc/motd"],
        capture_output=True, text=True, check=False, timeout=300,
        env={"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": "/nonexistent", **env},
    )  # fmt: skip
    assert who.returncode == 0, who.stderr
    assert json.loads(who.stdout)["layers"] == 3  # one layer per addition

    disk = outdir / "disk.ext4"
    converted = run_as_nobody(
        python, env, "-q", "convert", f"oci:{added}:added", "-f", "fs", "-o", str(disk)
    )
    assert converted.returncode == 0, converted.stderr
    with open_filesystem(disk) as fs:
        owners = {
            path: (entry.uid, entry.gid, entry.mode)
            for path in ("opt/bench", "opt/bench/run.sh", "opt/bench/data/input.txt", "etc/motd")
            if (entry := fs.lookup(path)) is not None
        }
        assert owners == {
            "opt/bench": (1000, 1001, 0o755),
            "opt/bench/run.sh": (1000, 1001, 0o755),
            "opt/bench/data/input.txt": (1000, 1001, 0o644),
            "etc/motd": (0, 0, 0o644),
        }
        link = fs.lookup("opt/bench/input")
        assert link is not None and link.linkname == "data/input.txt"
        with fs.open("opt/bench/run.sh") as f:
            assert f.read() == b"#!/bin/sh\necho benchmark\n"

    # the disk equals the image with the additions, and differs from the base by them
    same = run_as_nobody(python, env, "verify", str(disk), "--against", f"oci:{added}:added")
    assert same.returncode == 0, same.stdout + same.stderr
    differs = run_as_nobody(python, env, "verify", str(disk), "--against", f"oci:{base}:base")
    assert differs.returncode == 1
    assert "opt/bench/run.sh" in differs.stdout and "etc/motd" in differs.stdout


def test_the_layer_umoci_writes_is_a_complete_tar(outdir: Path) -> None:
    """umoci 0.4.7 leaves the tar footer out of inserted layers; GNU tar must read ours."""
    base = outdir / "base"
    make_image(base, [[directory("opt")]], tag="base")
    src = outdir / "one"
    src.write_bytes(b"x\n")
    image = add_files(open_layout(base, "base"), [Addition(src, "/opt/one")], outdir / "added")
    layer = image.blob_path(image.layers[-1].digest)
    listing = subprocess.run(
        ["tar", "-tvzf", str(layer)], capture_output=True, text=True, check=False
    )
    assert listing.returncode == 0, listing.stderr
    assert "opt/one" in listing.stdout


def test_convert_add_flag_as_nobody(outdir: Path) -> None:
    """`oci2disk convert --add` from the command line, unprivileged: the tar holds the
    added tree with the owners asked for, and the base layout is left as it was."""
    base = outdir / "base"
    make_image(base, [[directory("etc"), directory("opt")]], tag="base")
    bench = outdir / "bench"
    bench.mkdir()
    (bench / "run.sh").write_text("#!/bin/sh\necho benchmark\n")
    for path in [base, *base.rglob("*")]:
        path.chmod(0o755 if path.is_dir() else 0o644)
    for path in [bench, *bench.rglob("*")]:
        os.lchown(path, NOBODY, NOBODY)
    before = sorted(p.name for p in (base / "blobs" / "sha256").iterdir())
    out = outdir / "rootfs.tar"
    result = oci2disk(
        "-q", "convert", f"oci:{base}:base", "--add", f"{bench}:/opt/bench:1000:1001",
        "-f", "tar", "-o", str(out), user=NOBODY,
    )  # fmt: skip
    assert result.code == 0, result.stderr
    with tarfile.open(out) as tar:
        owners = {m.name.removeprefix("./"): (m.uid, m.gid) for m in tar}
    assert owners["opt/bench"] == (1000, 1001)
    assert owners["opt/bench/run.sh"] == (1000, 1001)
    assert sorted(p.name for p in (base / "blobs" / "sha256").iterdir()) == before
    bad = oci2disk("convert", f"oci:{base}:base", "--add", "nocolon", "-f", "tar", "-o", "x")
    assert bad.code == 2 and "SRC:DEST" in bad.stderr
