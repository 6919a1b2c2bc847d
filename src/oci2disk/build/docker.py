"""Docker Engine builder: builds a recipe's Dockerfile with the engine's builder.

The build log streams through ``on_line``; the image leaves the engine as an OCI layout
(:func:`oci2disk.engine.save_to_layout`).

Host tools: a running dockerd (Debian package docker.io).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from oci2disk import engine
from oci2disk.build.spec import BuilderKind, BuildSpec
from oci2disk.errors import BuildError, Oci2DiskError
from oci2disk.oci.layout import OciImage

log = logging.getLogger("oci2disk.build")

STEP_RE = re.compile(r"^Step \d+/\d+ : ")
TAIL = 20


def build(spec: BuildSpec, tag: str, *, on_line: Callable[[str], None] | None = None) -> str:
    """Build ``spec`` into the engine as ``tag``; return the image id.

    On failure the error names the failing step and carries the log tail.
    """
    assert spec.dockerfile is not None
    api = engine.client()
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
        raise BuildError(f"docker build could not run: {engine.short(exc)}") from None


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


class DockerBuilder:
    kind = BuilderKind.DOCKER

    def available(self) -> bool:
        return engine.engine_available()

    def build(
        self, spec: BuildSpec, tag: str, *, on_line: Callable[[str], None] | None = None
    ) -> str:
        return build(spec, tag, on_line=on_line)

    def export(self, tag: str, image_id: str, layout: Path) -> OciImage:
        return engine.save_to_layout(tag, layout)

    def source(self, tag: str) -> str:
        return f"docker-daemon:{tag}"


BUILDER = DockerBuilder()
