"""The Docker Engine, through docker-py: one client for building, saving and importing.

``build/docker.py`` builds with it; ``oci/`` reads ``docker-daemon:`` images and pulls
with it when skopeo is missing. Images leave the engine as ``docker save`` streams read
into an OCI layout (every blob hashed).

Host tools: a running dockerd (Debian package docker.io).
"""

from __future__ import annotations

import io
import os
import re
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from oci2disk.errors import BuildError, ImageError, Oci2DiskError
from oci2disk.oci.layout import OciImage, layout_from_docker_archive

DOCKER_HINT = "start the engine (`dockerd &`, or ./setup.sh which starts it), or check DOCKER_HOST"


def client() -> Any:
    """A low-level docker-py client for the engine from the environment."""
    try:
        import docker
        import docker.errors
    except ImportError:  # pragma: no cover - it is a dependency
        raise Oci2DiskError(
            "the docker Python package is missing", hint="pip install docker"
        ) from None
    try:
        api = docker.APIClient(base_url=_base_url(), version="auto", timeout=600)
        api.ping()
    except Exception as exc:
        raise BuildError(f"no Docker Engine answers ({short(exc)})", hint=DOCKER_HINT) from None
    return api


def _base_url() -> str:
    return os.environ.get("DOCKER_HOST", "unix:///var/run/docker.sock")


def short(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[-1] if text else type(exc).__name__


def engine_available() -> bool:
    try:
        client()
    except Oci2DiskError:
        return False
    return True


class _ChunkReader(io.RawIOBase):
    """A file object over an iterator of byte chunks (docker-py's save stream)."""

    def __init__(self, chunks: Iterator[bytes]) -> None:
        self._chunks = chunks
        self._buf = b""

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        while not self._buf:
            try:
                self._buf = next(self._chunks)
            except StopIteration:
                return 0
        n = min(len(buffer), len(self._buf))
        buffer[:n] = self._buf[:n]
        self._buf = self._buf[n:]
        return n


def save_to_layout(name: str, layout: Path, tag: str | None = None) -> OciImage:
    """Export an engine image as an OCI layout (``docker save`` streamed, digests computed)."""
    api = client()
    try:
        api.inspect_image(name)
    except Exception:
        raise ImageError(
            f"the Docker Engine has no image {name!r}",
            hint="build or load it first (`docker images` lists what the engine has)",
        ) from None
    try:
        chunks = api.get_image(name, chunk_size=1 << 20)
        stream = io.BufferedReader(_ChunkReader(iter(chunks)), buffer_size=1 << 20)
        return layout_from_docker_archive(stream, layout, tag)
    except Oci2DiskError:
        raise
    except Exception as exc:
        raise ImageError(f"docker save of {name} failed: {short(exc)}") from None


def import_rootfs(tar_path: Path, name: str, tag: str, *, changes: Iterable[str] = ()) -> str:
    """``docker import`` a flat rootfs tarball as image ``name:tag``; return its id."""
    api = client()
    try:
        result = api.import_image_from_file(
            str(tar_path), repository=name, tag=tag, changes=list(changes)
        )
    except Exception as exc:
        raise ImageError(f"docker import of {tar_path} failed: {short(exc)}") from None
    text = result if isinstance(result, str) else str(result)
    match = re.search(r"sha256:[0-9a-f]{64}", text)
    if not match:
        raise ImageError(f"docker import of {tar_path} gave no image id: {text[-300:]}")
    return match.group(0)
