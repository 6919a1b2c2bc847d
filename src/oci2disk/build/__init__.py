"""Image builders: one module per backend, one registry line each.

Host tools: those of each builder (dockerd, or buildah and skopeo).
"""

from __future__ import annotations

import logging

from oci2disk.build import buildah, docker
from oci2disk.build.spec import Builder, BuilderKind, BuildSpec
from oci2disk.errors import BuildError, UsageError

__all__ = ["AUTO", "REGISTRY", "BuildSpec", "Builder", "BuilderKind", "select"]

log = logging.getLogger("oci2disk.build")

REGISTRY: dict[BuilderKind, Builder] = {
    BuilderKind.DOCKER: docker.BUILDER,
    BuilderKind.BUILDAH: buildah.BUILDER,
}
AUTO = "auto"  # the Docker Engine when one answers, else buildah
CHOICES = (AUTO, *(kind.value for kind in REGISTRY))


def select(name: str) -> Builder:
    """The builder called ``name``; "auto" is the first one available, in registry order."""
    if name != AUTO:
        try:
            return REGISTRY[BuilderKind(name)]
        except ValueError:
            raise UsageError(
                f"unknown builder {name!r}", hint=f"use one of: {', '.join(CHOICES)}"
            ) from None
    for builder in REGISTRY.values():
        if builder.available():
            if builder.kind is not BuilderKind.DOCKER:
                log.info("no Docker Engine answers; building with %s", builder.kind.value)
            return builder
    raise BuildError(
        "no image builder: no Docker Engine answers and buildah is not installed",
        hint="start the Docker Engine (dockerd, or check DOCKER_HOST), "
        "or install buildah (Debian package buildah) for daemonless builds",
    )
