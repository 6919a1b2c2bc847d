"""Bad input fails with exit 1, one clear message, no traceback, and no partial output."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from clikit import CliResult, oci2disk

pytestmark = pytest.mark.docker


def assert_clean_failure(result: CliResult, outdir: Path, *needles: str) -> None:
    assert result.code == 1, result
    assert "Traceback" not in result.stderr
    assert result.stderr.count("error: ") == 1, result.stderr
    message = result.stderr[result.stderr.index("error: ") :]
    for needle in needles:
        assert needle in message, result.stderr
    assert sorted(p.name for p in outdir.rglob("*")) == []  # nothing written, not even a temp


def test_failing_run_step_shows_step_and_log_tail(
    base_image: str, outdir: Path, tmp_path: Path
) -> None:
    recipe = tmp_path / "recipe"
    recipe.mkdir()
    (recipe / "recipe.toml").write_text('[outputs]\nformats = ["raw", "qcow2"]\n')
    (recipe / "Dockerfile").write_text(
        f"FROM {base_image}\nRUN echo preparing-things\n"
        "RUN echo about-to-fail && false\nRUN echo never\n"
    )
    result = oci2disk("build", str(recipe), "-o", str(outdir))
    assert_clean_failure(
        result,
        outdir,
        "failed at Step 3/4 : RUN echo about-to-fail && false",
        "about-to-fail",  # the log tail
        "returned a non-zero code: 1",
    )


def test_unknown_recipe_key(outdir: Path, tmp_path: Path) -> None:
    recipe = tmp_path / "recipe"
    recipe.mkdir()
    (recipe / "recipe.toml").write_text('[disk]\nsize = "4G"\nlable = "root"\n')
    (recipe / "Dockerfile").write_text("FROM scratch\n")
    result = oci2disk("build", str(recipe), "-o", str(outdir))
    assert_clean_failure(result, outdir, "recipe.toml: unknown key disk.lable", "label")


def test_fixed_size_too_small_states_size_needed(base_image: str, outdir: Path) -> None:
    result = oci2disk(
        "convert",
        f"docker-daemon:{base_image}",
        "-f",
        "raw",
        "-o",
        str(outdir / "disk.raw"),
        "--size",
        "64M",
    )
    assert_clean_failure(result, outdir, "64.0 MiB is too small", "needs at least")
    # the number it states is enough: converting at that size works
    need = result.stderr.split("or a size of at least ")[1].split("M")[0]
    ok = oci2disk(
        "convert",
        f"docker-daemon:{base_image}",
        "-f",
        "raw",
        "-o",
        str(outdir / "disk.raw"),
        "--size",
        f"{need}M",
    )
    assert ok.code == 0, ok.stderr
    assert (outdir / "disk.raw").stat().st_size == int(need) << 20


def test_missing_host_tool_names_debian_package(base_image: str, outdir: Path) -> None:
    # a PATH without /usr/bin hides qemu-img (mke2fs and sfdisk are found in /usr/sbin)
    python_dir = str(Path(shutil.which("python3") or "/usr/bin/python3").parent)
    env = {"PATH": f"/nonexistent:{python_dir}" if python_dir != "/usr/bin" else "/nonexistent"}
    assert shutil.which("qemu-img", path=env["PATH"]) is None
    result = oci2disk(
        "convert",
        f"docker-daemon:{base_image}",
        "-f",
        "qcow2",
        "-o",
        str(outdir / "disk.qcow2"),
        env=env,
    )
    assert_clean_failure(result, outdir, "qemu-img is not installed", "Debian package qemu-utils")


def test_output_in_missing_directory(base_image: str, outdir: Path) -> None:
    target = outdir / "no" / "such" / "dir" / "disk.raw"
    result = oci2disk("convert", f"docker-daemon:{base_image}", "-f", "raw", "-o", str(target))
    assert_clean_failure(result, outdir, f"output directory {target.parent} does not exist")


def test_bad_reference_is_a_clear_error(outdir: Path) -> None:
    result = oci2disk("convert", "debian:bookworm", "-f", "raw", "-o", str(outdir / "x.raw"))
    assert_clean_failure(result, outdir, "bad image reference", "docker-daemon:NAME[:TAG]")


def test_usage_errors_exit_2() -> None:
    result = oci2disk("convert", "docker-daemon:x")
    assert result.code == 2
    assert "-f/--format" in result.stderr
    result = oci2disk("convert", "docker-daemon:x", "-f", "floppy", "-o", "x")
    assert result.code == 2 and "unknown output format 'floppy'" in result.stderr


def test_debug_shows_traceback(outdir: Path) -> None:
    result = oci2disk("--debug", "convert", "nope:x", "-f", "raw", "-o", str(outdir / "x.raw"))
    assert result.code == 1 and "Traceback" in result.stderr


def test_interrupted_run_leaves_nothing(base_image: str, outdir: Path) -> None:
    """Ctrl-C in the middle of writing: exit 130 and no half-written disk."""
    import signal
    import subprocess
    import sys
    import time

    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "oci2disk.cli",
            "convert",
            f"docker-daemon:{base_image}",
            "-f",
            "qcow2",
            "-o",
            str(outdir / "disk.qcow2"),
        ],
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ},
    )
    assert proc.stderr is not None
    for line in proc.stderr:  # wait until the filesystem is being written
        if "mke2fs" in line:
            break
    time.sleep(0.3)
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=120) == 130
    assert sorted(p.name for p in outdir.iterdir()) == []
