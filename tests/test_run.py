"""run.py: feeding a process's stdin, and the environment of parsed commands."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from oci2disk import run
from oci2disk.errors import CommandError, ToolMissingError


def test_feeding_writes_through_a_wide_pipe_and_waits(tmp_path: Path) -> None:
    out = tmp_path / "copy"
    with out.open("wb") as f, run.feeding(["cat"], stdout=f) as sink:
        sink.write(b"x" * (3 << 20))  # more than a default pipe holds
    assert out.read_bytes() == b"x" * (3 << 20)


def test_feeding_raises_with_the_stderr_tail_when_the_command_fails() -> None:
    with (
        pytest.raises(CommandError) as caught,
        run.feeding(["sh", "-c", "echo cannot go on >&2; exit 3"], what="sh failed") as sink,
    ):
        sink.write(b"y" * (4 << 20))  # the reader has gone: the pipe breaks
    assert caught.value.returncode == 3
    assert "cannot go on" in caught.value.stderr_tail
    assert str(caught.value).startswith("sh failed (exit code 3)")


def test_feeding_kills_the_command_when_the_writer_fails(tmp_path: Path) -> None:
    pid_file = tmp_path / "pid"
    with (
        pytest.raises(RuntimeError, match="writer broke"),
        run.feeding(["sh", "-c", f"echo $$ > {pid_file}; exec cat"]) as sink,
    ):
        sink.write(b"z")
        sink.flush()
        while not pid_file.exists() or not pid_file.read_text().strip():
            time.sleep(0.01)
        raise RuntimeError("writer broke")
    pid = int(pid_file.read_text())
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)  # killed and reaped, not left running


def test_parsed_commands_run_in_the_c_locale() -> None:
    os.environ["LC_ALL"] = "de_DE.UTF-8"
    try:
        shown = run.run(["sh", "-c", "echo $LC_ALL"], parsed=True).stdout.decode().strip()
        kept = run.run(["sh", "-c", "echo $LC_ALL"]).stdout.decode().strip()
    finally:
        del os.environ["LC_ALL"]
    assert shown == run.PARSED_ENV["LC_ALL"] and shown.startswith("C")
    assert kept == "de_DE.UTF-8"


def test_a_missing_tool_names_the_package_its_format_declares() -> None:
    with pytest.raises(ToolMissingError, match=r"Debian package some-package"):
        run.which("no-such-tool-oci2disk", package="some-package")
