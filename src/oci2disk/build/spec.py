"""What a builder is asked to build, and the contract every builder keeps.

Host tools: none.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from oci2disk.oci.layout import OciImage


@dataclass(frozen=True)
class BuildSpec:
    dockerfile: Path | None  # absolute; None when the recipe names an image instead
    context: Path
    image: str | None = None
    target: str | None = None
    platform: str | None = None
    network: str = "host"
    args: Mapping[str, str] = field(default_factory=dict)


class BuilderKind(enum.Enum):
    DOCKER = "docker"
    BUILDAH = "buildah"


class Builder(Protocol):
    """One way of building a Dockerfile into an OCI image layout."""

    @property
    def kind(self) -> BuilderKind: ...

    def available(self) -> bool:
        """Whether this builder can run here (an engine answers, the tool is installed)."""
        ...

    def build(
        self, spec: BuildSpec, tag: str, *, on_line: Callable[[str], None] | None = None
    ) -> str:
        """Build ``spec`` as ``tag``; return the image id."""
        ...

    def export(self, tag: str, image_id: str, layout: Path) -> OciImage:
        """The built image as an OCI layout at ``layout``."""
        ...

    def source(self, tag: str) -> str:
        """The image reference the built image has (recorded in the manifest)."""
        ...
