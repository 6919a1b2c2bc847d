"""The builders: one module each, one registry line each, chosen by name or by what answers."""

from __future__ import annotations

import pytest

from oci2disk import build
from oci2disk.build import REGISTRY, BuilderKind
from oci2disk.errors import UsageError


def test_every_builder_kind_has_one_builder() -> None:
    assert set(REGISTRY) == set(BuilderKind)
    for kind, builder in REGISTRY.items():
        assert builder.kind is kind
        assert builder.source("oci2disk-recipe/x:latest").endswith("oci2disk-recipe/x:latest")
    assert build.CHOICES == ("auto", "docker", "buildah")


def test_a_builder_is_chosen_by_name() -> None:
    assert build.select("buildah") is REGISTRY[BuilderKind.BUILDAH]
    assert build.select("docker").kind is BuilderKind.DOCKER
    with pytest.raises(UsageError, match="unknown builder 'kaniko'"):
        build.select("kaniko")
