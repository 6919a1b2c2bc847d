"""The content-addressed cache, through the real command line and the real engine.

A recording proxy in front of the engine's socket shows which API calls a run made:
a cache hit asks the engine for nothing but the image's inspect.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import tarfile
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from clikit import CliResult, oci2disk
from oci2disk.oci.cache import Cache
from recordkit import Recorder, recording_engine

# What docker-py asks any engine before the work itself: the ping and the API version.
HANDSHAKE = {"/_ping", "/version"}


def _tiny_rootfs() -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name in ("etc", "usr", "usr/bin"):
            info = tarfile.TarInfo(name)
            info.type, info.mode, info.mtime = tarfile.DIRTYPE, 0o755, 1_700_000_000
            tar.addfile(info)
        for name, line in (("etc/os-release", b"ID=tiny\n"), ("usr/bin/hello", b"#!/bin/sh\n")):
            data = line * 1000
            info = tarfile.TarInfo(name)
            info.size, info.mode, info.mtime, info.uid = len(data), 0o755, 1_700_000_000, 1000
            tar.addfile(info, io.BytesIO(data))
        link = tarfile.TarInfo("usr/bin/hello-again")
        link.type, link.linkname = tarfile.LNKTYPE, "usr/bin/hello"
        tar.addfile(link)
    return buf.getvalue()


@pytest.fixture(scope="module")
def tiny_image() -> Iterator[str]:
    """A one-layer image in the engine, unique to this test run."""
    name = f"oci2disk-test/cache-tiny:{uuid.uuid4().hex[:12]}"
    subprocess.run(["docker", "import", "-", name], input=_tiny_rootfs(), check=True)
    yield name
    subprocess.run(["docker", "rmi", "-f", name], capture_output=True, check=False)


@pytest.fixture
def engine(tmp_path: Path) -> Iterator[Recorder]:
    with recording_engine(tmp_path) as recorder:
        yield recorder


def convert(
    image: str, output: Path, cache_dir: Path, recorder: Recorder, *extra: str
) -> CliResult:
    result = oci2disk(
        "convert",
        f"docker-daemon:{image}",
        "-f",
        "tar",
        "-o",
        os.fspath(output),
        "--cache-dir",
        os.fspath(cache_dir),
        *extra,
        env={"DOCKER_HOST": recorder.docker_host},
    )
    assert result.code == 0, result.stderr
    return result


def saved(recorder: Recorder) -> bool:
    """Whether the run read the image itself (``docker save``) from the engine."""
    return any(path.startswith("/images/") and path.endswith("/get") for path in recorder.paths())


def only_inspect(recorder: Recorder) -> bool:
    paths = set(recorder.paths())
    inspects = {p for p in paths if p.startswith("/images/") and p.endswith("/json")}
    return bool(inspects) and paths <= HANDSHAKE | inspects


def sha256_of(output: Path) -> str:
    data = json.loads(output.with_name(output.name + ".manifest.json").read_text())
    return str(data["artifacts"][0]["sha256"])


def test_a_cache_hit_reads_nothing_from_the_engine_but_its_inspect(
    tiny_image: str, engine: Recorder, tmp_path: Path
) -> None:
    cache_dir = tmp_path / "cache"
    convert(tiny_image, tmp_path / "first.tar", cache_dir, engine)
    assert saved(engine)
    # The output was copied into the cache while it was hashed; no copy is left over.
    assert [p.name for p in (cache_dir / "artifacts").iterdir() if p.name.startswith(".")] == []
    assert len(list((cache_dir / "indexes").iterdir())) == 1  # indexed as it arrived

    # Another output name: the finished artifact is not re-used, the image is.
    engine.clear()
    convert(tiny_image, tmp_path / "second.tar", cache_dir, engine)
    assert only_inspect(engine), engine.paths()
    first, second = tmp_path / "first.tar", tmp_path / "second.tar"
    assert first.read_bytes() == second.read_bytes()

    # The same run again: the stored artifact is copied, and the run says so.
    engine.clear()
    again = convert(tiny_image, tmp_path / "second.tar", cache_dir, engine)
    assert only_inspect(engine), engine.paths()
    assert "re-used from the cache" in again.stderr
    assert (tmp_path / "second.tar").read_bytes() == first.read_bytes()

    # verify reads the image from the cache too.
    engine.clear()
    result = oci2disk(
        "verify",
        os.fspath(first),
        "--against",
        f"docker-daemon:{tiny_image}",
        "--cache-dir",
        os.fspath(cache_dir),
        env={"DOCKER_HOST": engine.docker_host},
    )
    assert result.code == 0, result.stdout + result.stderr
    assert only_inspect(engine), engine.paths()


def test_a_docker_archive_read_with_a_cache_serves_the_engine_image_too(
    tiny_image: str, engine: Recorder, tmp_path: Path
) -> None:
    """A docker-archive: streams into the cache like the engine's own save: the engine's
    copy of that image is then found by its Id, and nothing but inspect is asked for."""
    archive = tmp_path / "tiny.tar"
    subprocess.run(["docker", "save", "-o", os.fspath(archive), tiny_image], check=True)
    cache_dir = tmp_path / "cache"
    from_file = tmp_path / "from-archive.tar"
    result = oci2disk(
        "convert", f"docker-archive:{archive}", "-f", "tar", "-o", os.fspath(from_file),
        "--cache-dir", os.fspath(cache_dir),
    )  # fmt: skip
    assert result.code == 0, result.stderr
    engine.clear()
    convert(tiny_image, tmp_path / "from-engine.tar", cache_dir, engine)
    assert only_inspect(engine), engine.paths()
    assert (tmp_path / "from-engine.tar").read_bytes() == from_file.read_bytes()


def test_no_cache_reads_everything_afresh(
    tiny_image: str, engine: Recorder, tmp_path: Path
) -> None:
    cache_dir = tmp_path / "cache"
    convert(tiny_image, tmp_path / "cached.tar", cache_dir, engine)
    expected = sha256_of(tmp_path / "cached.tar")
    before = Cache(cache_dir).usage()
    engine.clear()
    result = convert(tiny_image, tmp_path / "cached.tar", cache_dir, engine, "--no-cache")
    assert saved(engine)
    assert "re-used" not in result.stderr
    assert Cache(cache_dir).usage() == before
    assert sha256_of(tmp_path / "cached.tar") == expected


def _layer_blobs(cache_dir: Path) -> list[Path]:
    return [p for p in (cache_dir / "blobs" / "sha256").iterdir() if p.stat().st_size > 4096]


def test_a_corrupted_layer_is_detected_and_read_again(
    tiny_image: str, engine: Recorder, tmp_path: Path
) -> None:
    cache_dir = tmp_path / "cache"
    convert(tiny_image, tmp_path / "good.tar", cache_dir, engine)
    good = (tmp_path / "good.tar").read_bytes()
    for blob in _layer_blobs(cache_dir):  # same size, one byte changed: only a hash sees it
        data = bytearray(blob.read_bytes())
        data[600] ^= 0xFF
        blob.write_bytes(bytes(data))

    # Outputs stored for the image need none of its layers: re-used, nothing read.
    engine.clear()
    hit = convert(tiny_image, tmp_path / "good.tar", cache_dir, engine)
    assert "re-used from the cache" in hit.stderr
    assert only_inspect(engine), engine.paths()
    assert (tmp_path / "good.tar").read_bytes() == good

    # Another output needs the layers: the damaged one is found before it is read.
    engine.clear()
    after = convert(tiny_image, tmp_path / "after.tar", cache_dir, engine)
    assert saved(engine), "a corrupt layer must not be used"
    assert "cached layer was damaged" in after.stderr
    assert (tmp_path / "after.tar").read_bytes() == good

    # and the entry is whole again: the next run is a hit
    engine.clear()
    convert(tiny_image, tmp_path / "third.tar", cache_dir, engine)
    assert only_inspect(engine), engine.paths()


def test_a_changed_stored_artifact_is_never_copied(
    tiny_image: str, engine: Recorder, tmp_path: Path
) -> None:
    cache_dir = tmp_path / "cache"
    output = tmp_path / "out.tar"
    convert(tiny_image, output, cache_dir, engine)
    good = output.read_bytes()
    [stored] = (cache_dir / "artifacts").glob("*/files/*")
    stored.chmod(0o644)
    with stored.open("r+b") as f:  # same size, a byte changed
        f.seek(1000)
        f.write(b"X")

    result = convert(tiny_image, output, cache_dir, engine)
    assert "re-used" not in result.stderr
    assert output.read_bytes() == good


def test_two_runs_at_once_share_a_cache(tiny_image: str, engine: Recorder, tmp_path: Path) -> None:
    cache_dir = tmp_path / "cache"
    results: dict[str, CliResult] = {}

    def run(name: str) -> None:
        results[name] = oci2disk(
            "convert",
            f"docker-daemon:{tiny_image}",
            "-f",
            "tar",
            "-o",
            os.fspath(tmp_path / f"{name}.tar"),
            "--cache-dir",
            os.fspath(cache_dir),
            env={"DOCKER_HOST": engine.docker_host},
        )

    threads = [threading.Thread(target=run, args=(name,)) for name in ("a", "b")]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert all(r.code == 0 for r in results.values()), [r.stderr for r in results.values()]

    fresh = tmp_path / "fresh.tar"
    convert(tiny_image, fresh, cache_dir, engine, "--no-cache")
    assert (tmp_path / "a.tar").read_bytes() == fresh.read_bytes()
    assert (tmp_path / "b.tar").read_bytes() == fresh.read_bytes()
    check = oci2disk("cache", "--cache-dir", os.fspath(cache_dir), "--verify")
    assert check.code == 0, check.stderr
    assert "removed" not in check.stdout
    assert not [p for p in (cache_dir / "blobs" / "sha256").iterdir() if p.name.startswith(".")]


def test_the_cache_command_shows_and_prunes(
    tiny_image: str, engine: Recorder, tmp_path: Path
) -> None:
    cache_dir = tmp_path / "cache"
    convert(tiny_image, tmp_path / "x.tar", cache_dir, engine)
    shown = oci2disk("cache", "--cache-dir", os.fspath(cache_dir))
    assert shown.code == 0, shown.stderr
    assert "artifacts: 1" in shown.stdout and "images:    1" in shown.stdout
    pruned = oci2disk("cache", "--cache-dir", os.fspath(cache_dir), "--prune", "--max-size", "0")
    assert pruned.code == 0, pruned.stderr
    assert Cache(cache_dir).usage().total == 0

    engine.clear()
    convert(tiny_image, tmp_path / "x.tar", cache_dir, engine)
    assert saved(engine)


def test_a_no_op_run_leaves_untouched_outputs_and_restores_changed_ones(
    tiny_image: str, engine: Recorder, tmp_path: Path
) -> None:
    cache_dir = tmp_path / "cache"
    output = tmp_path / "out.tar"
    convert(tiny_image, output, cache_dir, engine)
    good = output.read_bytes()
    inode = output.stat().st_ino

    convert(tiny_image, output, cache_dir, engine)
    assert output.stat().st_ino == inode, "an untouched output is left where it is"

    with output.open("r+b") as f:  # the user changed the output (booted it, say)
        f.seek(1000)
        f.write(b"X")
    again = convert(tiny_image, output, cache_dir, engine)
    assert "re-used from the cache" in again.stderr
    assert output.read_bytes() == good


def test_quiet_runs_print_nothing_and_others_name_the_engine_transfer(
    tiny_image: str, tmp_path: Path
) -> None:
    args = ["convert", f"docker-daemon:{tiny_image}", "-f", "tar", "--no-cache"]
    quiet = oci2disk("-q", *args, "-o", os.fspath(tmp_path / "q.tar"))
    assert quiet.code == 0 and quiet.stderr == "", quiet.stderr
    shown = oci2disk(*args, "-o", os.fspath(tmp_path / "v.tar"))
    assert shown.code == 0, shown.stderr
    assert f"opening docker-daemon:{tiny_image}: done in" in shown.stderr


def tar_recipe(folder: Path, image: str, note: str) -> Path:
    """A recipe that adds /etc/note to ``image`` and writes a tar."""
    folder.mkdir()
    (folder / "Dockerfile").write_text(f"FROM {image}\nCOPY note /etc/note\n")
    (folder / "note").write_text(note)
    (folder / "recipe.toml").write_text(
        '[build]\ndockerfile = "Dockerfile"\n\n[outputs]\nformats = ["tar"]\n'
    )
    return folder


def test_two_builds_at_once_share_a_cache(tiny_image: str, tmp_path: Path) -> None:
    recipe = tar_recipe(tmp_path / "tiny-recipe", tiny_image, "built twice at once\n")
    cache_dir = tmp_path / "cache"
    results: dict[str, CliResult] = {}

    def build(name: str) -> None:
        args = ["build", os.fspath(recipe), "-o", os.fspath(tmp_path / name)]
        results[name] = oci2disk(*args, "--cache-dir", os.fspath(cache_dir))

    threads = [threading.Thread(target=build, args=(name,)) for name in ("a", "b")]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert all(r.code == 0 for r in results.values()), [r.stderr for r in results.values()]
    fresh = oci2disk("build", os.fspath(recipe), "-o", os.fspath(tmp_path / "fresh"), "--no-cache")
    assert fresh.code == 0, fresh.stderr
    [expected] = (tmp_path / "fresh").glob("*.tar")
    for name in ("a", "b"):
        [made] = (tmp_path / name).glob("*.tar")
        assert made.read_bytes() == expected.read_bytes()
    with tarfile.open(expected) as tar:
        note = tar.extractfile("etc/note")
        assert note is not None and note.read() == b"built twice at once\n"
    check = oci2disk("cache", "--cache-dir", os.fspath(cache_dir), "--verify")
    assert check.code == 0 and "removed" not in check.stdout, check.stdout + check.stderr


def test_a_build_whose_cached_layer_was_damaged_reads_the_image_again(
    tiny_image: str, tmp_path: Path
) -> None:
    recipe = tar_recipe(tmp_path / "damaged-recipe", tiny_image, "read again\n")
    cache_dir = tmp_path / "cache"
    first = oci2disk(
        "build", os.fspath(recipe), "-o", os.fspath(tmp_path / "a"),
        "--cache-dir", os.fspath(cache_dir),
    )  # fmt: skip
    assert first.code == 0, first.stderr
    for blob in _layer_blobs(cache_dir):
        data = bytearray(blob.read_bytes())
        data[600] ^= 0xFF
        blob.write_bytes(bytes(data))
    # Another format: the stored tar does not serve, the layers are read and checked.
    again = oci2disk(
        "build", os.fspath(recipe), "-o", os.fspath(tmp_path / "b"), "--format", "tar,fs",
        "--cache-dir", os.fspath(cache_dir),
    )  # fmt: skip
    assert again.code == 0, again.stderr
    assert "cached layer was damaged" in again.stderr
    [before] = (tmp_path / "a").glob("*.tar")
    [after] = (tmp_path / "b").glob("*.tar")
    assert after.read_bytes() == before.read_bytes()
    check = oci2disk("cache", "--cache-dir", os.fspath(cache_dir), "--verify")
    assert check.code == 0 and "removed" not in check.stdout, check.stdout + check.stderr
