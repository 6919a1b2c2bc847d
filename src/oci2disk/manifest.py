"""The run manifest: a typed value of what a run made, written beside its outputs as JSON."""

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
from oci2disk.convert.options import ConvertOptions
from oci2disk.oci.layout import OciImage
from oci2disk.settings import qcow2_name

SUFFIX = ".manifest.json"


def manifest_path(directory: Path, name: str) -> Path:
    return directory / f"{name}{SUFFIX}"


@dataclass(frozen=True)
class Source:
    ref: str
    digest: str
    config_digest: str
    platform: str


@dataclass(frozen=True)
class ArtifactEntry:
    path: Path
    format: str
    size: int
    sha256: str


@dataclass(frozen=True)
class Filesystem:
    type: str
    uuid: str
    label: str
    offset: int
    size: int
    table: str
    root_partition: int | None
    # root=PARTUUID=... works without an initramfs, whatever the kernel names the disk
    root_partuuid: str | None


@dataclass(frozen=True)
class Bootloader:
    """The bootloaders written into the disks (GRUB for BIOS and/or UEFI)."""

    firmware: tuple[str, ...]  # "bios", "uefi"
    bios_core: bool  # GRUB's core.img embedded for BIOS
    efi_loader: str | None  # the ESP's removable-media loader (/EFI/BOOT/BOOTX64.EFI)
    esp_uuid: str | None  # the ESP's FAT serial, as /etc/fstab names it
    grub_cfg: str  # the configuration in the root filesystem
    modules: tuple[tuple[str, str], ...]  # (GRUB target, "image" or "host")


@dataclass(frozen=True)
class RunManifest:
    """What a run made, from what, and how: written beside the outputs as JSON."""

    source: Source
    artifacts: tuple[ArtifactEntry, ...]
    generated: tuple[str, ...]
    warnings: tuple[str, ...]
    options: ConvertOptions
    recipe: Path | None = None
    filesystem: Filesystem | None = None
    # What was taken out so that each machine is its own (machine-id, SSH host keys ...)
    identity: tuple[str, ...] = ()
    # Logs and caches of the build's clock neutralised (SOURCE_DATE_EPOCH set)
    build_noise: tuple[str, ...] = ()
    bootloader: Bootloader | None = None
    version: str = __version__


def from_run(
    *,
    source: str,
    image: OciImage,
    result: ConvertResult,
    options: ConvertOptions,
    recipe: Path | None = None,
) -> RunManifest:
    filesystem = None
    if result.fs is not None and result.layout is not None:
        filesystem = Filesystem(
            type=result.fs.fs.value,
            uuid=result.fs.uuid,
            label=result.fs.label,
            offset=result.layout.fs_offset,
            size=result.layout.fs_bytes,
            table=result.layout.table.value,
            root_partition=result.layout.root_partition,
            root_partuuid=root_partuuid(result.layout, result.fs),
        )
    return RunManifest(
        source=Source(
            ref=source,
            digest=image.digest,
            config_digest=image.config_descriptor.digest,
            platform=str(image.config.platform),
        ),
        artifacts=tuple(
            ArtifactEntry(a.path, a.format.label, a.size, a.sha256) for a in result.artifacts
        ),
        generated=result.generated,
        warnings=result.warnings,
        options=options,
        recipe=recipe,
        filesystem=filesystem,
        identity=result.identity,
        build_noise=result.noise,
        bootloader=None
        if result.bootloader is None
        else Bootloader(
            firmware=result.bootloader.firmware,
            bios_core=result.bootloader.bios_core,
            efi_loader=result.bootloader.efi_loader,
            esp_uuid=result.bootloader.esp_uuid,
            grub_cfg=result.bootloader.grub_cfg,
            modules=result.bootloader.modules,
        ),
    )


def options_json(options: ConvertOptions) -> dict[str, Any]:
    d = options.disk
    return {
        "table": d.table.value,
        "fs": d.fs.value,
        "size": "auto" if d.size is None else d.size,
        "label": d.label,
        "fstab": d.fstab.value,
        "compression": qcow2_name(options.compression),
        "source_date_epoch": options.source_date_epoch,
        "initramfs": {
            "init": options.initramfs.init,
            "compression": options.initramfs.compression.label,
            "level": options.initramfs.level,
        },
        "tar": {"compression": options.tar.compression.label, "level": options.tar.level},
        "kernel": {"version": options.kernel.version, "vmlinux": options.kernel.vmlinux},
        "boot": {
            "firmware": "auto"
            if options.boot.firmware is None
            else [f.value for f in options.boot.firmware],
            "cmdline": options.boot.cmdline,
        },
    }


def to_json(manifest: RunManifest) -> dict[str, Any]:
    """The manifest as JSON data: the file beside the outputs and ``--json`` both."""
    data: dict[str, Any] = {
        "oci2disk": manifest.version,
        "source": {
            "ref": manifest.source.ref,
            "digest": manifest.source.digest,
            "config_digest": manifest.source.config_digest,
            "platform": manifest.source.platform,
        },
        "artifacts": [
            {"path": os.fspath(a.path), "format": a.format, "size": a.size, "sha256": a.sha256}
            for a in manifest.artifacts
        ],
        "generated": list(manifest.generated),
        "warnings": list(manifest.warnings),
        "identity": list(manifest.identity),
        "build_noise": list(manifest.build_noise),
        "options": options_json(manifest.options),
    }
    if manifest.recipe is not None:
        data["recipe"] = os.fspath(manifest.recipe)
    fs = manifest.filesystem
    if fs is not None:
        data["filesystem"] = {
            "type": fs.type,
            "uuid": fs.uuid,
            "label": fs.label,
            "offset": fs.offset,
            "size": fs.size,
            "table": fs.table,
        }
        data["root_partition"] = fs.root_partition
        data["root_partuuid"] = fs.root_partuuid
    boot = manifest.bootloader
    if boot is not None:
        data["bootloader"] = {
            "firmware": list(boot.firmware),
            "bios_core": boot.bios_core,
            "efi_loader": boot.efi_loader,
            "esp_uuid": boot.esp_uuid,
            "grub_cfg": boot.grub_cfg,
            "modules": {target: origin for target, origin in boot.modules},
        }
    return data


def write(path: Path, manifest: RunManifest) -> Path:
    """Write ``manifest`` as ``path`` atomically (a temp name beside it, then renamed)."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".part")
    with os.fdopen(fd, "w") as f:
        json.dump(to_json(manifest), f, indent=2, sort_keys=True)
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
