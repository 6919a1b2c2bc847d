"""The small JSON manifest every run writes beside its outputs."""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from oci2disk import __version__
from oci2disk.convert import ConvertResult
from oci2disk.convert.disk import root_partuuid
from oci2disk.oci.layout import OciImage

SUFFIX = ".manifest.json"


def manifest_path(directory: Path, name: str) -> Path:
    return directory / f"{name}{SUFFIX}"


def build_manifest(
    *,
    source: str,
    image: OciImage,
    result: ConvertResult,
    options: dict[str, Any],
    recipe: str | None = None,
) -> dict[str, Any]:
    data: dict[str, Any] = {
        "oci2disk": __version__,
        "source": {
            "ref": source,
            "digest": image.digest,
            "config_digest": image.config_descriptor.digest,
            "platform": str(image.config.platform),
        },
        "artifacts": [
            {
                "path": os.fspath(a.path),
                "format": a.format.value,
                "size": a.size,
                "sha256": a.sha256,
            }
            for a in result.artifacts
        ],
        "generated": list(result.generated),
        "warnings": list(result.warnings),
        "options": options,
    }
    if recipe is not None:
        data["recipe"] = recipe
    if result.fs is not None and result.layout is not None:
        data["filesystem"] = {
            "type": result.fs.fs.value,
            "uuid": result.fs.uuid,
            "label": result.fs.label,
            "offset": result.layout.fs_offset,
            "size": result.layout.fs_bytes,
            "table": result.layout.table.value,
        }
        data["root_partition"] = result.layout.root_partition
        # root=PARTUUID=... works without an initramfs, whatever the kernel names the disk
        data["root_partuuid"] = root_partuuid(result.layout, result.fs)
    return data


def write_manifest(path: Path, data: dict[str, Any]) -> Path:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".part")
    with os.fdopen(fd, "w") as f:
        json.dump(data, f, indent=2, sort_keys=True)
        f.write("\n")
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)
    return path


@dataclass(frozen=True)
class KnownManifest:
    path: Path
    generated: tuple[str, ...]
    root_partition: int | None
    filesystem_uuid: str | None


def find_for_artifact(artifact: Path) -> KnownManifest | None:
    """The manifest that lists ``artifact``, if one lies beside it."""
    artifact = artifact.resolve()
    for candidate in sorted(artifact.parent.glob(f"*{SUFFIX}")):
        try:
            data = json.loads(candidate.read_text())
        except (OSError, ValueError):
            continue
        paths = {Path(a.get("path", "")).resolve() for a in data.get("artifacts", [])}
        if artifact in paths:
            return KnownManifest(
                candidate,
                tuple(data.get("generated", [])),
                data.get("root_partition"),
                (data.get("filesystem") or {}).get("uuid"),
            )
    return None
