"""SIGTERM (timeout, CI cancellation, docker stop) stops a raw+qcow2 conversion like
Ctrl-C: children stopped, temporary outputs and the workspace removed, exit 143."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from clikit import OCI2DISK, ROOT
from layerkit import TAG, directory, file, make_image

MiB = 1 << 20


def children(pid: int) -> list[tuple[int, str]]:
    """(pid, command name) of every live descendant of ``pid``."""
    parent: dict[int, int] = {}
    names: dict[int, str] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        name = stat[stat.index("(") + 1 : stat.rindex(")")]
        fields = stat[stat.rindex(")") + 2 :].split()
        if fields[0] != "Z":
            parent[int(entry)], names[int(entry)] = int(fields[1]), name
    found, todo = [], [pid]
    while todo:
        here = todo.pop()
        for child, up in parent.items():
            if up == here:
                found.append((child, names[child]))
                todo.append(child)
    return found


def wait_for(what: Callable[[], bool], proc: subprocess.Popen[bytes]) -> bool:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and proc.poll() is None:
        if what():
            return True
        time.sleep(0.01)
    return False


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory) -> str:
    layout = tmp_path_factory.mktemp("sigterm") / "layout"
    data = [file(f"srv/blob{n}", os.urandom(24 * MiB)) for n in range(4)]
    make_image(layout, [[directory("etc"), file("etc/hostname", b"vm\n"), *data]])
    return f"oci:{layout}:{TAG}"


@pytest.mark.parametrize("when", ["flattening", "writing", "qemu-img"])
def test_sigterm_leaves_nothing_behind(source: str, tmp_path: Path, when: str) -> None:
    out, workspaces, recipe = tmp_path / "out", tmp_path / "tmp", tmp_path / "recipe"
    for folder in (out, workspaces, recipe):
        folder.mkdir()
    (recipe / "recipe.toml").write_text(
        f'[build]\nimage = "{source}"\n\n[outputs]\nformats = ["raw", "qcow2"]\n'
    )
    proc = subprocess.Popen(
        [*OCI2DISK, "-q", "build", str(recipe), "-o", str(out)],
        env={**os.environ, "OCI2DISK_TMPDIR": str(workspaces)},
        cwd=ROOT,
        stderr=subprocess.PIPE,
    )
    points = {
        "flattening": lambda: any(workspaces.iterdir()),
        "writing": lambda: any(p.name.endswith(".part") for p in out.iterdir()),
        "qemu-img": lambda: any(name == "qemu-img" for _, name in children(proc.pid)),
    }
    reached = wait_for(points[when], proc)
    running = children(proc.pid)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=60)
    if not reached:
        pytest.fail(f"the run ended before {when} (exit {proc.returncode}): {stderr!r}")
    assert proc.returncode == 143, stderr.decode()
    assert b"Traceback" not in stderr
    assert list(out.iterdir()) == []  # no .part, no half disk, no manifest
    assert list(workspaces.iterdir()) == []
    alive = [(pid, name) for pid, name in running if Path(f"/proc/{pid}").exists()]
    alive = [(p, n) for p, n in alive if "Z" not in Path(f"/proc/{p}/stat").read_text().split()[2]]
    assert alive == [], f"still running after SIGTERM: {alive}"
