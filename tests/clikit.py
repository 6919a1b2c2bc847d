"""Run the real oci2disk command line from tests, as a user would."""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
OCI2DISK = [sys.executable, "-m", "oci2disk.cli"]


@dataclass(frozen=True)
class CliResult:
    code: int
    stdout: str
    stderr: str


def oci2disk(
    *args: str, env: dict[str, str] | None = None, user: int | None = None, timeout: float = 1800
) -> CliResult:
    """Run the real command line in a subprocess, as a user would.

    build, convert and verify run with ``--no-cache`` unless the test names a cache
    (``--cache-dir``): a test must see the work done, not a copy of an earlier test's
    result (two runs compared for equal bytes would otherwise compare one run twice).
    The cache has tests of its own, which give their own --cache-dir.
    """
    args = _uncached(args)
    argv = [*OCI2DISK, *args]
    if user is not None:
        argv = ["setpriv", f"--reuid={user}", f"--regid={user}", "--clear-groups", *argv]
    proc = subprocess.run(
        argv,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
        check=False,
        cwd=ROOT,
    )
    return CliResult(proc.returncode, proc.stdout, proc.stderr)


def _uncached(args: tuple[str, ...]) -> tuple[str, ...]:
    if "--cache-dir" in args or "--no-cache" in args:
        return args
    for i, word in enumerate(args):
        if word in ("build", "convert", "verify"):
            return (*args[: i + 1], "--no-cache", *args[i + 1 :])
        if not word.startswith("-"):
            break  # another command
    return args
