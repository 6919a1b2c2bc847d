"""Finished outputs re-used from the cache: the same image and options give the same files.

The key is the sha256 of (image digest, every output's format and name, the conversion
options, oci2disk's version); outputs are deterministic in exactly those, so a run
whose key is stored copies the stored files (a copy-on-write clone where the
filesystem allows) instead of flattening and converting again.

Host tools: none.
"""

from __future__ import annotations

import dataclasses
import enum
import functools
import hashlib
import json
import logging
import os
import tempfile
import threading
from collections.abc import Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

from oci2disk import __version__
from oci2disk.convert import Artifact, ConvertResult, Format
from oci2disk.convert.disk import DiskLayout, FsIdentity
from oci2disk.convert.options import ConvertOptions, FsType, Table
from oci2disk.oci.cache import Cache, clone_file
from oci2disk.oci.layout import OciImage

log = logging.getLogger("oci2disk.cache")


def _canonical(value: object) -> object:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _canonical(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, enum.Enum):
        return value.name
    if isinstance(value, Mapping):
        return {str(k): _canonical(v) for k, v in sorted(value.items())}
    if isinstance(value, list | tuple | frozenset | set):
        items = [_canonical(v) for v in value]
        return sorted(items, key=repr) if isinstance(value, frozenset | set) else items
    if value is None or isinstance(value, bool | int | float | str):
        return value
    return repr(value)


def _base(outputs: Mapping[Format, Path]) -> Path:
    return Path(os.path.commonpath([os.fspath(p.parent) for p in outputs.values()]))


@functools.cache
def code_fingerprint() -> str:
    """sha256 over oci2disk's own source files: a changed converter (an edited checkout,
    an upgrade that kept the version string) never re-uses outputs made by other code."""
    package = Path(__file__).resolve().parent
    digest = hashlib.sha256()
    for path in sorted(package.rglob("*.py")):
        digest.update(path.relative_to(package).as_posix().encode() + b"\0")
        digest.update(path.read_bytes())
    return digest.hexdigest()


def key(image: OciImage, outputs: Mapping[Format, Path], options: ConvertOptions) -> str:
    base = _base(outputs)
    data = {
        "image": image.digest,
        "outputs": sorted([fmt.name, os.path.relpath(p, base)] for fmt, p in outputs.items()),
        # how many converters run at once changes no output
        "options": _canonical(dataclasses.replace(options, jobs=None)),
        "oci2disk": __version__,
        "code": code_fingerprint(),
    }
    text = json.dumps(data, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


class Staging:
    """Copies of finished outputs made into the cache while the run goes on (while
    they are hashed), taken by :func:`store`; what is not taken is removed."""

    def __init__(self, cache: Cache) -> None:
        self.cache = cache
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="oci2disk-stage")
        self._folder: Path | None = None
        self._copies: dict[tuple[int, int], Future[Path]] = {}
        self._lock = threading.Lock()  # converters finish on threads of their own

    def __enter__(self) -> Staging:
        return self

    def __exit__(self, *exc: object) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)
        if self._folder is not None:
            self.cache.discard_staging(self._folder)

    def add(self, path: Path) -> None:
        """Start copying ``path`` (a finished output under its temporary name)."""
        st = path.stat()
        with self._lock:
            if self._folder is None:
                self._folder = self.cache.staging_folder()
            target = self._folder / str(len(self._copies))
            self._copies[(st.st_dev, st.st_ino)] = self._pool.submit(_clone, path, target)

    def take(self, path: Path) -> Path | None:
        """The copy of ``path`` (renamed since, the same file), or None."""
        st = path.stat()
        with self._lock:
            future = self._copies.pop((st.st_dev, st.st_ino), None)
        if future is None:
            return None
        try:
            return future.result()
        except OSError as exc:
            log.debug("cache: staging %s failed (%s)", path, exc)
            return None


def _clone(source: Path, target: Path) -> Path:
    clone_file(source, target)
    return target


def store(
    cache: Cache,
    entry_key: str,
    outputs: Mapping[Format, Path],
    result: ConvertResult,
    staging: Staging | None = None,
) -> None:
    base = _base(outputs)
    files: dict[str, tuple[Path, str]] = {}
    artifacts = []
    for n, a in enumerate(result.artifacts):
        name = f"{n}-{a.path.name}"
        files[name] = (a.path, a.sha256)
        artifacts.append(
            {
                "file": name,
                "path": os.path.relpath(a.path, base),
                "format": a.format.name,
                "size": a.size,
                "sha256": a.sha256,
            }
        )
    meta: dict[str, Any] = {
        "artifacts": artifacts,
        "fs": None if result.fs is None else _canonical(result.fs),
        "layout": None if result.layout is None else _canonical(result.layout),
        "generated": list(result.generated),
        "warnings": list(result.warnings),
        "identity": list(result.identity),
        "noise": list(result.noise),
    }
    try:
        cache.store_artifacts(entry_key, files, meta, staging.take if staging else None)
    except OSError as exc:  # a full disk costs the next run its shortcut, not this run
        log.warning("cache: outputs not stored (%s)", exc)
        return
    cache.remember_placed(entry_key, [a.path for a in result.artifacts])


def reuse(cache: Cache, entry_key: str, outputs: Mapping[Format, Path]) -> ConvertResult | None:
    """The stored result under ``entry_key``, its files copied to ``outputs``; None
    when nothing (usable) is stored."""
    entry = cache.artifacts_for(entry_key)
    if entry is None:
        return None
    base = _base(outputs)
    meta = entry.meta
    try:
        artifacts = tuple(
            Artifact(base / a["path"], Format[a["format"]], int(a["size"]), str(a["sha256"]))
            for a in meta["artifacts"]
        )
        fs = meta["fs"]
        layout = meta["layout"]
        result = ConvertResult(
            artifacts=artifacts,
            fs=None if fs is None else FsIdentity(fs["uuid"], fs["label"], FsType[fs["fs"]]),
            layout=None
            if layout is None
            else DiskLayout(
                Table[layout["table"]],
                int(layout["disk_bytes"]),
                int(layout["fs_offset"]),
                int(layout["fs_bytes"]),
                int(layout["partition"]),
            ),
            generated=tuple(meta["generated"]),
            warnings=tuple(meta["warnings"]),
            identity=tuple(meta["identity"]),
            noise=tuple(meta["noise"]),  # an entry from before: a miss
        )
        sources = [entry.file(a["file"]) for a in meta["artifacts"]]
    except (KeyError, TypeError, ValueError):
        return None
    copied = []
    for source, artifact in zip(sources, artifacts, strict=True):
        # A no-op rebuild finds the previous outputs where it would copy them again.
        if not cache.untouched(entry_key, artifact.path):
            _copy_out(source, artifact.path)
            copied.append(artifact.path)
    cache.remember_placed(entry_key, copied)
    return result


def _copy_out(source: Path, target: Path) -> None:
    """Copy a stored file to ``target`` atomically (a temp name beside it, renamed)."""
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".part")
    os.close(fd)
    os.unlink(tmp)
    try:
        clone_file(source, Path(tmp))
        os.chmod(tmp, 0o644)
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def cacheable(outputs: Mapping[Format, Path]) -> bool:
    """Outputs that are single files (a dir output, or a kernel written into a
    folder the user names, are not stored)."""
    return bool(outputs) and not any(
        fmt.plugin.directory or fmt is Format.KERNEL for fmt in outputs
    )
