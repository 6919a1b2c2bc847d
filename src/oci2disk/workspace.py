"""A workspace owns the temporary paths of one run and removes them even on failure.

Temporary names carry the process id of the run that made them (``oci2disk-PID-*``,
``.NAME.PID.*.part``), so that the leftovers of a run killed with SIGKILL, which could
not clean up, can be told from those of a run still going and removed by the next run
(:func:`sweep_leftovers`).
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import shutil
import stat
import tempfile
from pathlib import Path
from types import TracebackType

log = logging.getLogger("oci2disk")

WORKSPACE_PREFIX = "oci2disk-"
# A workspace, or a hidden temporary output beside its target (".disk.raw.PID.x1y2.part").
_WORKSPACE = re.compile(rf"^{WORKSPACE_PREFIX}(\d+)-[^./]+$")
_PART = re.compile(r"^\..+\.(\d+)\.[^./]+\.(part|old)$")


def temp_base() -> Path:
    """Where workspaces go: $OCI2DISK_TMPDIR, else the system's temporary directory."""
    return Path(os.environ.get("OCI2DISK_TMPDIR") or tempfile.gettempdir())


class Workspace:
    def __init__(self, prefix: str = WORKSPACE_PREFIX) -> None:
        self.path = Path(tempfile.mkdtemp(prefix=f"{prefix}{os.getpid()}-", dir=temp_base()))

    def subdir(self, name: str) -> Path:
        path = self.path / name
        path.mkdir(parents=True, exist_ok=True)
        return path

    def cleanup(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)

    def __enter__(self) -> Workspace:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.cleanup()


class AtomicOutput:
    """A file written under a temporary name beside ``target`` and renamed on commit.

    If the run fails before ``commit()``, the temporary file is removed, so a failed or
    interrupted run never leaves a half-written artifact behind.
    """

    def __init__(self, target: Path) -> None:
        self.target = Path(target)
        check_file_target(self.target)
        fd, name = tempfile.mkstemp(
            dir=self.target.parent, prefix=_temp_prefix(self.target), suffix=".part"
        )
        os.close(fd)
        self.tmp = Path(name)
        self.committed = False

    def commit(self) -> Path:
        os.chmod(self.tmp, 0o644)
        os.replace(self.tmp, self.target)
        self.committed = True
        return self.target

    def discard(self) -> None:
        if not self.committed:
            self.tmp.unlink(missing_ok=True)


class AtomicDirectory:
    """A directory written under a temporary name beside ``target`` and renamed on commit.

    An existing empty ``target`` directory is replaced on commit; a non-empty one only
    with ``replace`` (the caller has made sure that oci2disk made it: replacing would
    delete whatever else the directory held). If the run fails before ``commit()``, the
    temporary directory is removed.
    """

    def __init__(self, target: Path, *, replace: bool = False) -> None:
        self.target = Path(target)
        check_directory_target(self.target, replace=replace)
        self.tmp = Path(
            tempfile.mkdtemp(
                dir=self.target.parent, prefix=_temp_prefix(self.target), suffix=".part"
            )
        )
        self.committed = False

    def commit(self) -> Path:
        old = None
        if self.target.is_dir() and not self.target.is_symlink():
            old = Path(
                tempfile.mkdtemp(
                    dir=self.target.parent, prefix=_temp_prefix(self.target), suffix=".old"
                )
            )
            os.replace(self.target, old / "tree")
        os.replace(self.tmp, self.target)
        self.committed = True
        if old is not None:
            _remove_tree(old)
        return self.target

    def discard(self) -> None:
        if not self.committed:
            _remove_tree(self.tmp)


def _temp_prefix(target: Path) -> str:
    return f".{target.name}.{os.getpid()}."


def _output_error(message: str, hint: str) -> Exception:
    from oci2disk.errors import ConvertError

    return ConvertError(message, hint=hint)


def _check_parent(target: Path) -> os.stat_result | None:
    """The target's lstat (None when it does not exist), once its directory is usable."""
    parent = target.parent
    if not parent.is_dir():
        raise missing_directory(parent)
    if not os.access(parent, os.W_OK | os.X_OK):
        raise _output_error(
            f"cannot write into the output directory {parent} (permission denied)",
            "choose an output path in a directory you may write to",
        )
    try:
        return target.lstat()
    except FileNotFoundError:
        return None


def missing_directory(parent: Path) -> Exception:
    """Why ``parent`` cannot hold an output: missing, not a directory, or out of reach."""
    try:
        st = os.stat(parent)
    except FileNotFoundError:
        happened = "does not exist"
    except NotADirectoryError:
        happened = "cannot exist: a path above it is a file, not a directory"
    except PermissionError:
        happened = "cannot be reached: permission denied on a directory above it"
    else:
        happened = "is a file, not a directory" if not stat.S_ISDIR(st.st_mode) else "is odd"
    hint = f"create it first (mkdir -p {parent})" if happened == "does not exist" else "fix it"
    return _output_error(f"output directory {parent} {happened}", f"{hint} or choose another path")


def check_file_target(target: Path) -> None:
    """Refuse to put a file where a directory or a device is: a file output replaces
    only a regular file (or a symlink, itself, never what it points to)."""
    st = _check_parent(target)
    if st is None or stat.S_ISREG(st.st_mode):
        return
    if stat.S_ISLNK(st.st_mode):
        if target.is_dir():
            raise _output_error(
                f"{target} is a symlink to a directory, not a file",
                "give the output file's own path, e.g. -o DIR/disk.raw",
            )
        return
    if stat.S_ISDIR(st.st_mode):
        raise _output_error(
            f"{target} is a directory; this output is a file",
            "give the output file's path, e.g. -o DIR/disk.raw",
        )
    raise _output_error(
        f"{target} is not a regular file (a device node, a fifo or a socket): "
        "oci2disk writes only files and directories it creates",
        "choose a file path; to write a disk onto a device, copy the raw file with dd",
    )


def check_directory_target(target: Path, *, replace: bool) -> None:
    """Refuse to replace anything but an empty directory, or a non-empty one when asked."""
    st = _check_parent(target)
    if st is None:
        return
    if not stat.S_ISDIR(st.st_mode):
        kind = "a symlink" if stat.S_ISLNK(st.st_mode) else "not a directory"
        raise _output_error(
            f"{target} exists and is {kind}",
            "remove it or choose another output path",
        )
    if replace:
        return
    try:
        empty = next(os.scandir(target), None) is None
    except OSError as exc:
        raise _output_error(
            f"cannot read {target}: {exc.strerror}", "choose another path"
        ) from None
    if not empty:
        raise _output_error(
            f"{target} is a directory that is not empty: writing the rootfs there would "
            "delete what it holds",
            "choose a new path, or add --force to replace a directory oci2disk made",
        )


def sweep_leftovers(directory: Path) -> list[Path]:
    """Remove the temporary outputs and workspaces of runs that were killed (SIGKILL).

    Only names made by a process that no longer exists are touched: a run going on at
    the same time keeps its files. Returns what was removed, after logging it.
    """
    removed: list[Path] = []
    for folder, pattern in ((directory, _PART), (temp_base(), _WORKSPACE)):
        try:
            names = os.listdir(folder)
        except OSError:
            continue
        for name in names:
            match = pattern.match(name)
            if match is None or _alive(int(match.group(1))):
                continue
            path = folder / name
            _remove_tree(path)
            if not os.path.lexists(path):
                removed.append(path)
    if removed:
        log.warning(
            "removed the leftovers of an interrupted oci2disk run: %s",
            ", ".join(os.fspath(p) for p in removed),
        )
    return removed


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's process
    return True


def _remove_tree(path: Path) -> None:
    """Remove a tree even where its modes forbid writing (an extracted rootfs has such dirs)."""
    if not path.is_dir() or path.is_symlink():
        path.unlink(missing_ok=True)
        return
    with contextlib.suppress(OSError):
        os.chmod(path, 0o700)
    for dirpath, dirnames, _ in os.walk(path):
        for name in dirnames:
            child = os.path.join(dirpath, name)
            if not os.path.islink(child):
                with contextlib.suppress(OSError):
                    os.chmod(child, 0o700)
    shutil.rmtree(path, ignore_errors=True)
