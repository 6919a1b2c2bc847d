"""Run the GitHub Action's container the way the runner does.

GitHub builds ``action.yml``'s ``action.Dockerfile`` with the repository as context and
starts it with ``docker run``: as root, ``--workdir /github/workspace``, the workspace,
``/github/home`` and ``/github/file_commands`` mounted from the runner, the runner's
Docker socket mounted, every input as ``INPUT_<NAME>`` (upper case, hyphens kept, the
defaults of action.yml for inputs the workflow does not set) and ``GITHUB_OUTPUT``
naming a file under ``/github/file_commands``. The workspace belongs to the runner's
unprivileged user (uid 1001 on hosted runners).
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RUNNER_UID = 1001  # the `runner` user of GitHub's hosted images
ACTION_IMAGE = "oci2disk-test/action:latest"
WHEELS = ROOT / ".action-wheels"


def action_defaults() -> dict[str, str]:
    """The inputs of action.yml with their defaults (a small reader: no YAML library)."""
    text = (ROOT / "action.yml").read_text()
    section = text.split("\ninputs:\n", 1)[1].split("\noutputs:\n", 1)[0]
    defaults: dict[str, str] = {}
    name = ""
    for line in section.splitlines():
        if m := re.match(r"^  ([a-z][a-z0-9-]*):\s*$", line):
            name = m.group(1)
            defaults[name] = ""
        elif (m := re.match(r"^    default:\s*(.*)$", line)) and name:
            defaults[name] = m.group(1).strip().strip('"')
    return defaults


@dataclass(frozen=True)
class ActionRun:
    code: int
    log: str
    outputs: dict[str, str]
    workspace: Path
    summary: str


def build_action_image(base_image: str) -> str:
    """``docker build -f action.Dockerfile`` from the local base, Python wheels from the
    host's package index (the build container reaches Debian's mirror, not PyPI here)."""
    shutil.rmtree(WHEELS, ignore_errors=True)
    subprocess.run(
        [sys.executable, "-m", "pip", "download", "-q", "-d", str(WHEELS), "setuptools>=68",
         "wheel", "docker[ssh]>=7.0", "zstandard>=0.22", "isal>=1.6"],
        check=True, capture_output=True,
    )  # fmt: skip
    build = subprocess.run(
        ["docker", "build", "-q", "-f", "action.Dockerfile", "-t", ACTION_IMAGE,
         "--build-arg", f"BASE={base_image}",
         "--build-arg", "PIP_OPTIONS=--no-index --find-links /opt/oci2disk/wheels", "."],
        cwd=ROOT, capture_output=True, text=True, check=False,
    )  # fmt: skip
    shutil.rmtree(WHEELS, ignore_errors=True)
    assert build.returncode == 0, build.stdout[-3000:] + build.stderr[-3000:]
    return ACTION_IMAGE


def run_action(image: str, runner: Path, inputs: Mapping[str, str]) -> ActionRun:
    """``docker run`` the action image as GitHub's runner does; returns its outputs."""
    values = {**action_defaults(), **inputs}
    unknown = set(inputs) - set(action_defaults())
    assert not unknown, f"inputs not in action.yml: {unknown}"
    output_file = runner / "file_commands" / "set_output_0123"
    output_file.touch()
    (runner / "file_commands" / "step_summary_0123").touch()
    for path in runner.rglob("*"):
        shutil.chown(path, RUNNER_UID, RUNNER_UID)
    shutil.chown(runner, RUNNER_UID, RUNNER_UID)
    env = {f"INPUT_{name.upper()}": value for name, value in values.items()}
    env.update(
        {
            "HOME": "/github/home",
            "GITHUB_WORKSPACE": "/github/workspace",
            "GITHUB_OUTPUT": "/github/file_commands/set_output_0123",
            "GITHUB_STEP_SUMMARY": "/github/file_commands/step_summary_0123",
            "GITHUB_ACTIONS": "true",
            "CI": "true",
            "RUNNER_OS": "Linux",
        }
    )
    argv = ["docker", "run", "--rm", "--workdir", "/github/workspace"]
    for key, value in env.items():
        argv += ["-e", f"{key}={value}"]
    argv += [
        "-v", "/var/run/docker.sock:/var/run/docker.sock",
        "-v", f"{runner / 'home'}:/github/home",
        "-v", f"{runner / 'file_commands'}:/github/file_commands",
        "-v", f"{runner / 'workspace'}:/github/workspace",
        image,
    ]  # fmt: skip
    proc = subprocess.run(argv, capture_output=True, text=True, check=False, timeout=3600)
    outputs: dict[str, str] = {}
    for line in output_file.read_text().splitlines():
        key, _, value = line.partition("=")
        outputs[key] = value
    summary = (runner / "file_commands" / "step_summary_0123").read_text()
    return ActionRun(
        proc.returncode, proc.stdout + proc.stderr, outputs, runner / "workspace", summary
    )
