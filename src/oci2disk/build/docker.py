"""Docker Engine backend, through docker-py.

Builds a recipe's Dockerfile with the engine's builder, streams the build log, and
exports images as OCI layouts (``docker save`` read as a stream, every blob hashed).
Host tools: a running dockerd (Debian package docker.io).
"""

from __future__ import annotations

import io
import logging
import re
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

from oci2disk.errors import BuildError, ImageError, Oci2DiskError
from oci2disk.oci.layout import OciImage, layout_from_docker_archive
from oci2disk.recipe import BuildSpec

log = logging.getLogger("oci2disk.build")

STEP_RE = re.compile(r"^Step \d+/\d+ : ")
TAIL = 20


def client() -> Any:
    """A low-level docker-py client for the engine DOCKER_HOST names (local by default)."""
    from oci2disk.engines import connect

    return connect()


def _short(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[-1] if text else type(exc).__name__


def engine_available() -> bool:
    try:
        client()
    except Oci2DiskError:
        return False
    return True


def build(spec: BuildSpec, tag: str, *, on_line: Callable[[str], None] | None = None) -> str:
    """Build ``spec`` into the engine as ``tag``; return the image id.

    On failure the error names the failing step and carries the log tail.
    """
    assert spec.dockerfile is not None
    api = client()
    try:
        dockerfile = str(spec.dockerfile.relative_to(spec.context))
    except ValueError:
        dockerfile = str(spec.dockerfile)  # docker-py adds an outside Dockerfile to the context
    kwargs: dict[str, Any] = {
        "path": str(spec.context),
        "dockerfile": dockerfile,
        "tag": tag,
        "buildargs": dict(spec.args),
        "rm": True,
        "forcerm": True,
        "decode": True,
        "pull": False,
    }
    if spec.target:
        kwargs["target"] = spec.target
    if spec.platform:
        kwargs["platform"] = spec.platform
    if spec.network != "default":
        kwargs["network_mode"] = spec.network
    try:
        events = api.build(**kwargs)
        return _follow_build(events, on_line)
    except Oci2DiskError:
        raise
    except Exception as exc:
        raise BuildError(f"docker build could not run: {_short(exc)}") from None


def _follow_build(events: Iterable[dict[str, Any]], on_line: Callable[[str], None] | None) -> str:
    lines: list[str] = []
    step = ""
    image_id = ""
    for event in events:
        if "stream" in event:
            for line in str(event["stream"]).splitlines():
                if not line.strip():
                    continue
                if STEP_RE.match(line):
                    step = line
                lines.append(line)
                del lines[:-200]
                if on_line:
                    on_line(line)
                match = re.match(r"^Successfully built ([0-9a-f]+)", line)
                if match:
                    image_id = match.group(1)
        elif "aux" in event and isinstance(event["aux"], dict) and "ID" in event["aux"]:
            image_id = str(event["aux"]["ID"])
        elif "error" in event:
            error = str(event.get("error", "")).strip()
            tail = "\n".join(lines[-TAIL:])
            where = f"failed at {step}" if step else "failed"
            raise BuildError(
                f"docker build {where}\n{tail}\n{error}",
                hint="fix the failing Dockerfile step; run with -v to see the whole build log",
            )
    if not image_id:
        raise BuildError(
            "docker build ended without producing an image:\n" + "\n".join(lines[-TAIL:])
        )
    return image_id


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
        raise ImageError(f"docker save of {name} failed: {_short(exc)}") from None


def import_rootfs(tar_path: Path, name: str, tag: str, *, changes: Iterable[str] = ()) -> str:
    """``docker import`` a flat rootfs tarball as image ``name:tag``; return its id."""
    api = client()
    try:
        result = api.import_image_from_file(
            str(tar_path), repository=name, tag=tag, changes=list(changes)
        )
    except Exception as exc:
        raise ImageError(f"docker import of {tar_path} failed: {_short(exc)}") from None
    text = result if isinstance(result, str) else str(result)
    match = re.search(r"sha256:[0-9a-f]{64}", text)
    if not match:
        raise ImageError(f"docker import of {tar_path} gave no image id: {text[-300:]}")
    return match.group(0)
