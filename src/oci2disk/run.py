"""Every external command goes through here.

Argument lists only, never a shell. A failure raises ``CommandError`` carrying the
command line, the exit code and the tail of stderr; a missing program raises
``ToolMissingError`` naming the Debian package that provides it.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import shlex
import shutil
import subprocess
import tempfile
import threading
import weakref
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import IO, Any, BinaryIO, cast

from oci2disk.errors import CommandError, Oci2DiskError, ToolMissingError

log = logging.getLogger("oci2disk.run")

# Every child still running, so that SIGTERM or Ctrl-C stops them too: a signal sent
# to oci2disk alone (timeout, CI cancellation, docker stop) would leave a qemu-img or
# mke2fs writing on with nobody to remove its output.
_children: weakref.WeakSet[subprocess.Popen[bytes]] = weakref.WeakSet()
_children_lock = threading.Lock()
_stopping = threading.Event()


def _popen(argv: Sequence[str], **kwargs: Any) -> subprocess.Popen[bytes]:
    with _children_lock:
        if _stopping.is_set():
            raise Oci2DiskError(f"not starting {argv[0]}: oci2disk is stopping")
        proc = subprocess.Popen(argv, **kwargs)
        _children.add(proc)
    return proc


def stop_children() -> None:
    """Kill every child still running and start no more (the run is being stopped)."""
    with _children_lock:
        _stopping.set()
        running = list(_children)
    for proc in running:
        if proc.poll() is None:
            with contextlib.suppress(OSError):
                proc.kill()


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
    "mdir": "mtools",
    "mmd": "mtools",
    "mlabel": "mtools",
    "mkfs.fat": "dosfstools",
    "grub-mkimage": "grub-common",
    "pigz": "pigz",
    "igzip": "isal",
    "lz4": "lz4",
    "zstd": "zstd",
    "xz": "xz-utils",
    "setpriv": "util-linux",
}

TAIL_LINES = 25
# The environment of a command whose output oci2disk reads: the C locale's untranslated
# messages and numbers, whatever the user's. C.UTF-8 rather than C: in plain C,
# libarchive (mke2fs -d) refuses UTF-8 file names ("Pathname can't be converted from
# UTF-8 to current locale"); where C.UTF-8 is missing the C locale applies anyway.
PARSED_ENV = {"LC_ALL": "C.UTF-8"}
F_SETPIPE_SZ = getattr(fcntl, "F_SETPIPE_SZ", 1031)
PIPE_BYTES = 1 << 20


def which(program: str, *, package: str | None = None) -> str:
    """Return the absolute path of ``program`` or raise naming the package to install."""
    found = shutil.which(program) or _sbin_lookup(program)
    if found is None:
        package = package or DEBIAN_PACKAGES.get(program, program)
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
    parsed: bool = False,
    what: str | None = None,
    hint: str | None = None,
) -> subprocess.CompletedProcess[bytes]:
    """Run a command to completion.

    ``argv[0]`` is resolved with :func:`which`, so a missing tool is a clear error.
    With ``capture`` stdout and stderr are collected; otherwise stdout is inherited
    and stderr is still captured so that a failure can show its tail. ``parsed``
    commands (whose output is read) run with ``LC_ALL=C``.
    """
    resolved = [which(argv[0]), *argv[1:]]
    log.debug("run: %s", format_argv(resolved))
    full_env = _environment(env, parsed)
    if input is not None:
        stdin = subprocess.PIPE
    elif stdin is None:
        stdin = subprocess.DEVNULL
    child = _popen(
        resolved,
        stdin=stdin,
        stdout=subprocess.PIPE if capture else None,
        stderr=subprocess.PIPE,
        env=full_env,
        cwd=cwd,
    )
    with child:
        try:
            out, err = child.communicate(input)
        except BaseException:
            child.kill()
            raise
    proc = subprocess.CompletedProcess(resolved, child.wait(), out, err)
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
    parsed: bool = False,
) -> subprocess.Popen[bytes]:
    """Start a long-running command (a pipe consumer, QEMU) and return the process."""
    resolved = [which(argv[0]), *argv[1:]]
    log.debug("start: %s", format_argv(resolved))
    full_env = _environment(env, parsed)
    return _popen(
        resolved,
        stdin=stdin if stdin is not None else subprocess.DEVNULL,
        stdout=stdout,
        stderr=stderr if stderr is not None else subprocess.PIPE,
        env=full_env,
    )


def _environment(env: Mapping[str, str] | None, parsed: bool) -> dict[str, str] | None:
    if env is None and not parsed:
        return None  # inherit
    return {**os.environ, **(PARSED_ENV if parsed else {}), **(env or {})}


@contextmanager
def feeding(
    argv: Sequence[str],
    *,
    stdout: IO[bytes] | int | None = subprocess.DEVNULL,
    env: Mapping[str, str] | None = None,
    parsed: bool = False,
    what: str | None = None,
    hint: str | None = None,
) -> Iterator[BinaryIO]:
    """Run a command that reads what the block writes to the sink this yields.

    The pipe holds 1 MiB: libarchive (mke2fs -d -) reads 4 KiB at a time, and with
    the default 64 KiB pipe the two processes ping-pong (mke2fs took 20% longer).
    When the block ends the sink is closed and the command waited for; a failing exit
    status, or a command that stopped reading early, raises :class:`CommandError` with
    its stderr tail. When the block raises, the command is
    killed and waited for, and the block's exception propagates.
    """
    with tempfile.TemporaryFile() as errfile:
        proc = start(
            argv, stdin=subprocess.PIPE, stdout=stdout, stderr=errfile, env=env, parsed=parsed
        )
        assert proc.stdin is not None
        with contextlib.suppress(OSError):  # a lower pipe-max-size only costs speed
            fcntl.fcntl(proc.stdin.fileno(), F_SETPIPE_SZ, PIPE_BYTES)
        broken = False
        try:
            yield cast(BinaryIO, proc.stdin)
        except BrokenPipeError:
            broken = True  # the command stopped reading; its exit status says why
        except BaseException:
            proc.kill()
            proc.wait()
            with contextlib.suppress(BrokenPipeError):
                proc.stdin.close()
            raise
        try:
            proc.stdin.close()
        except BrokenPipeError:
            broken = True
        code = proc.wait()
        if code != 0 or broken:
            errfile.seek(0)
            raise command_error(
                [which(argv[0]), *argv[1:]], code, errfile.read(), what=what, hint=hint
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
