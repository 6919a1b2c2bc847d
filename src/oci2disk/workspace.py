"""A workspace owns the temporary paths of one run and removes them even on failure."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path
from types import TracebackType


class Workspace:
    def __init__(self, prefix: str = "oci2disk-") -> None:
        base = os.environ.get("OCI2DISK_TMPDIR") or None
        self.path = Path(tempfile.mkdtemp(prefix=prefix, dir=base))

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
        if not self.target.parent.is_dir():
            from oci2disk.errors import ConvertError

            raise ConvertError(
                f"output directory {self.target.parent} does not exist",
                hint=f"create it first (mkdir -p {self.target.parent}) or choose another -o",
            )
        fd, name = tempfile.mkstemp(
            dir=self.target.parent, prefix=f".{self.target.name}.", suffix=".part"
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

    An existing ``target`` directory is replaced as a whole on commit. If the run fails
    before ``commit()``, the temporary directory is removed.
    """

    def __init__(self, target: Path) -> None:
        self.target = Path(target)
        if not self.target.parent.is_dir():
            from oci2disk.errors import ConvertError

            raise ConvertError(
                f"output directory {self.target.parent} does not exist",
                hint=f"create it first (mkdir -p {self.target.parent}) or choose another -o",
            )
        if self.target.exists() and not self.target.is_dir():
            from oci2disk.errors import ConvertError

            raise ConvertError(
                f"{self.target} exists and is not a directory",
                hint="remove it or choose another output path",
            )
        self.tmp = Path(
            tempfile.mkdtemp(dir=self.target.parent, prefix=f".{self.target.name}.", suffix=".part")
        )
        self.committed = False

    def commit(self) -> Path:
        old = None
        if self.target.is_dir() and not self.target.is_symlink():
            old = Path(
                tempfile.mkdtemp(
                    dir=self.target.parent, prefix=f".{self.target.name}.", suffix=".old"
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
