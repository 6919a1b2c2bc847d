"""A workspace owns the temporary paths of one run and removes them even on failure."""

from __future__ import annotations

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
