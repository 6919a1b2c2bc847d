"""Progress of long steps: bytes and a rate on a terminal, plain lines otherwise, nothing quiet."""

from __future__ import annotations

import io
import time
from pathlib import Path

import pytest

from oci2disk import progress as progress_module
from oci2disk.progress import SILENT, Progress, current


def _read_all(p: Progress, size: int, total: int | None = None) -> None:
    with p.step("transfer"):
        source = current().reading(io.BytesIO(b"x" * size), "docker save img", total)
        while source.read(1 << 20):
            pass


def test_a_terminal_shows_bytes_of_the_total_and_a_rate() -> None:
    out = io.StringIO()
    _read_all(Progress(out, live=True), 3 << 20, total=3 << 20)
    text = out.getvalue()
    assert "\r\033[K    docker save img: 1 of 3 MiB, " in text
    assert "MiB/s" in text
    assert "transfer: done in" in text


def test_not_a_terminal_gets_plain_lines(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(progress_module, "PLAIN_EVERY", 0.0)
    out = io.StringIO()
    _read_all(Progress(out, live=False), 2 << 20)
    lines = out.getvalue().splitlines()
    assert "\r" not in out.getvalue() and "\033" not in out.getvalue()
    assert any(line.startswith("    docker save img: 2 MiB, ") for line in lines), lines


def test_quiet_shows_nothing_and_outside_a_step_there_is_no_reporter() -> None:
    assert current() is SILENT
    _read_all(SILENT, 2 << 20)  # nothing to see, and nothing breaks


def test_a_program_writing_a_file_is_watched(tmp_path: Path) -> None:
    out = io.StringIO()
    target = tmp_path / "disk.qcow2"
    with Progress(out, live=True).watching(target, "qemu-img qcow2"):
        target.write_bytes(b"y" * (2 << 20))
        time.sleep(1.2)
    assert "qemu-img qcow2: 2 MiB, " in out.getvalue()
