"""Every external command goes through here.

Argument lists only, never a shell. A failure raises ``CommandError`` carrying the
command line, the exit code and the tail of stderr; a missing program raises
``ToolMissingError`` naming the Debian package that provides it.
"""

from __future__ import annotations

import logging
import os
import shlex
import shutil
import subprocess
from collections.abc import Mapping, Sequence
from typing import IO, Any

from oci2disk.errors import CommandError, ToolMissingError

log = logging.getLogger("oci2disk.run")

# Program -> Debian package that ships it, for "install X (Debian package Y)".
DEBIAN_PACKAGES: dict[str, str] = {
    "mke2fs": "e2fsprogs (>= 1.47.1, from bookworm-backports)",
    "e2fsck": "e2fsprogs",
    "debugfs": "e2fsprogs",
    "sfdisk": "fdisk",
    "qemu-img": "qemu-utils",
    "qemu-system-x86_64": "qemu-system-x86",
    "qemu-system-aarch64": "qemu-system-arm",
    "mmdebstrap": "mmdebstrap",
    "docker": "docker.io",
    "dockerd": "docker.io",
    "buildah": "buildah",
    "skopeo": "skopeo",
    "umoci": "umoci",
    "cpio": "cpio",
    "mcopy": "mtools",
    "pigz": "pigz",
    "igzip": "isal",
    "lz4": "lz4",
    "zstd": "zstd",
    "xz": "xz-utils",
    "setpriv": "util-linux",
}

TAIL_LINES = 25


def which(program: str) -> str:
    """Return the absolute path of ``program`` or raise naming the package to install."""
    found = shutil.which(program) or _sbin_lookup(program)
    if found is None:
        package = DEBIAN_PACKAGES.get(program, program)
        raise ToolMissingError(
            f"{program} is not installed",
            hint=f"install {program} (Debian package {package}), or run ./setup.sh",
        )
    return found


def _sbin_lookup(program: str) -> str | None:
    # Unprivileged users often lack /sbin and /usr/sbin on PATH; mke2fs lives there.
    for directory in ("/usr/sbin", "/sbin"):
        candidate = os.path.join(directory, program)
        if os.access(candidate, os.X_OK):
            return candidate
    return None


def format_argv(argv: Sequence[str]) -> str:
    return shlex.join(argv)


def tail(text: str, lines: int = TAIL_LINES) -> str:
    return "\n".join(text.rstrip().splitlines()[-lines:])


def run(
    argv: Sequence[str],
    *,
    input: bytes | None = None,
    stdin: IO[bytes] | int | None = None,
    capture: bool = True,
    env: Mapping[str, str] | None = None,
    cwd: str | os.PathLike[str] | None = None,
    check: bool = True,
    what: str | None = None,
    hint: str | None = None,
) -> subprocess.CompletedProcess[bytes]:
    """Run a command to completion.

    ``argv[0]`` is resolved with :func:`which`, so a missing tool is a clear error.
    With ``capture`` stdout and stderr are collected; otherwise stdout is inherited
    and stderr is still captured so that a failure can show its tail.
    """
    resolved = [which(argv[0]), *argv[1:]]
    log.debug("run: %s", format_argv(resolved))
    full_env = None if env is None else {**os.environ, **env}
    kwargs: dict[str, Any] = {}
    if input is not None:
        kwargs["input"] = input
    else:
        kwargs["stdin"] = stdin if stdin is not None else subprocess.DEVNULL
    proc = subprocess.run(
        resolved,
        stdout=subprocess.PIPE if capture else None,
        stderr=subprocess.PIPE,
        env=full_env,
        cwd=cwd,
        check=False,
        **kwargs,
    )
    if check and proc.returncode != 0:
        raise command_error(resolved, proc.returncode, proc.stderr or b"", what=what, hint=hint)
    return proc


def start(
    argv: Sequence[str],
    *,
    stdin: IO[bytes] | int | None = None,
    stdout: IO[bytes] | int | None = None,
    stderr: IO[bytes] | int | None = None,
    env: Mapping[str, str] | None = None,
) -> subprocess.Popen[bytes]:
    """Start a long-running command (a pipe consumer, QEMU) and return the process."""
    resolved = [which(argv[0]), *argv[1:]]
    log.debug("start: %s", format_argv(resolved))
    full_env = None if env is None else {**os.environ, **env}
    return subprocess.Popen(
        resolved,
        stdin=stdin if stdin is not None else subprocess.DEVNULL,
        stdout=stdout,
        stderr=stderr if stderr is not None else subprocess.PIPE,
        env=full_env,
    )


def command_error(
    argv: Sequence[str],
    returncode: int,
    stderr: bytes,
    *,
    what: str | None = None,
    hint: str | None = None,
) -> CommandError:
    text = stderr.decode("utf-8", "replace")
    summary = what or f"{os.path.basename(argv[0])} failed"
    message = f"{summary} (exit code {returncode}): {format_argv(argv)}"
    stderr_tail = tail(text)
    if stderr_tail:
        message += "\n" + stderr_tail
    return CommandError(
        message, argv=list(argv), returncode=returncode, stderr_tail=stderr_tail, hint=hint
    )
