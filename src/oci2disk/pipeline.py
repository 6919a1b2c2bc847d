"""The pipeline, step by step: recipe -> build -> OCI layout -> flatten -> convert -> verify/boot.

Each public function here is one user-facing command, callable from Python.
"""

from __future__ import annotations

import logging
import os
import re
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, BinaryIO

from oci2disk import convert as conv
from oci2disk import manifest, recipe
from oci2disk.errors import BootError, BuildError, ConvertError, UsageError, VerifyError
from oci2disk.oci.layout import OciImage, Platform
from oci2disk.oci.source import open_image
from oci2disk.oci.transports import check_platform
from oci2disk.progress import SILENT, Progress
from oci2disk.recipe import Format, Recipe
from oci2disk.refs import ImageRef, parse_ref
from oci2disk.rootfs.flat import FlatRootfs
from oci2disk.rootfs.flatten import flatten
from oci2disk.workspace import Workspace

log = logging.getLogger("oci2disk")


@dataclass(frozen=True)
class RunResult:
    manifest_path: Path
    manifest: dict[str, Any]
    result: conv.ConvertResult


def source_date_epoch() -> int | None:
    value = os.environ.get("SOURCE_DATE_EPOCH")
    if not value:
        return None
    try:
        return int(value)
    except ValueError:
        raise ConvertError(
            f"SOURCE_DATE_EPOCH={value!r} is not a whole number of seconds"
        ) from None


@contextmanager
def flattened(image: OciImage, ws: Workspace, progress: Progress) -> Iterator[FlatRootfs]:
    with progress.step(f"reading {len(image.layers)} layer(s) of {image.digest[:19]}"):
        rootfs = flatten(image, ws.subdir("flatten"), source_date_epoch=source_date_epoch())
    with rootfs:
        s = rootfs.stats
        progress.message(
            f"    rootfs: {s.entries} entries, {s.data_bytes / (1 << 20):.0f} MiB of file data"
        )
        yield rootfs


def convert_image(
    image: OciImage,
    outputs: dict[Format, Path],
    options: conv.ConvertOptions,
    ws: Workspace,
    progress: Progress,
) -> conv.ConvertResult:
    for path in outputs.values():
        _check_output_dir(path)
    with flattened(image, ws, progress) as rootfs:
        result = conv.convert(image, rootfs, outputs, options, ws, progress)
    for warning in result.warnings:
        progress.message(f"warning: {warning}")
    return result


def _check_output_dir(path: Path) -> None:
    if not path.parent.is_dir():
        raise ConvertError(
            f"output directory {path.parent} does not exist",
            hint=f"create it (mkdir -p {path.parent}) or choose another output path",
        )


def options_json(options: conv.ConvertOptions) -> dict[str, Any]:
    d = options.disk
    return {
        "table": d.table.value,
        "fs": d.fs.value,
        "size": "auto" if d.size is None else d.size,
        "label": d.label,
        "fstab": d.fstab.value,
        "compression": options.compression.value,
        "source_date_epoch": options.source_date_epoch,
        "initramfs": {
            "init": options.initramfs.init,
            "compression": options.initramfs.compression.value,
            "level": options.initramfs.level,
        },
        "tar": {"compression": options.tar.compression.value, "level": options.tar.level},
        "kernel": {"version": options.kernel.version, "vmlinux": options.kernel.vmlinux},
    }


def convert_ref(
    source: str,
    fmt: Format,
    output: Path,
    options: conv.ConvertOptions,
    *,
    platform: Platform | None = None,
    progress: Progress = SILENT,
) -> RunResult:
    """``oci2disk convert``: an existing image to one artifact plus its manifest."""
    ref = parse_ref(source)
    output = output.absolute()
    _check_output_dir(output)
    conv.preflight([fmt])
    with Workspace() as ws:
        with progress.step(f"opening {ref}"):
            image = open_image(ref, ws.path, platform)
        result = convert_image(image, {fmt: output}, options, ws, progress)
    data = manifest.build_manifest(
        source=str(ref), image=image, result=result, options=options_json(options)
    )
    path = manifest.write_manifest(manifest.manifest_path(output.parent, output.name), data)
    return RunResult(path, data, result)


def build_recipe(
    recipe_dir: Path,
    *,
    outdir: Path | None = None,
    formats: tuple[Format, ...] | None = None,
    build_args: dict[str, str] | None = None,
    builder: str = "auto",
    platform: str | None = None,
    progress: Progress = SILENT,
    on_build_line: Callable[[str], None] | None = None,
    jobs: int | None = None,
) -> RunResult:
    """``oci2disk build``: build the recipe's image, then write every output it names.

    ``builder`` is "docker", "buildah" or "auto" (the Docker Engine when one answers,
    else buildah); ``platform`` (OS/ARCH) overrides the recipe's build.platform.
    """
    rcp = recipe.load(recipe_dir)
    if build_args:
        rcp = replace(rcp, build=replace(rcp.build, args={**rcp.build.args, **build_args}))
    if platform:
        rcp = replace(rcp, build=replace(rcp.build, platform=str(Platform.parse(platform))))
    outdir = (outdir or Path("out") / rcp.name).absolute()
    outdir.mkdir(parents=True, exist_ok=True)
    wanted = formats or rcp.outputs.formats
    conv.preflight(wanted)
    options = replace(conv.ConvertOptions.from_recipe(rcp, source_date_epoch()), jobs=jobs)
    with Workspace() as ws:
        image, source = build_image(rcp, builder, ws, progress, on_build_line)
        outputs = conv.default_outputs(outdir, rcp.outputs.name, wanted, options)
        result = convert_image(image, outputs, options, ws, progress)
    data = manifest.build_manifest(
        source=source,
        image=image,
        result=result,
        options=options_json(options),
        recipe=os.fspath(rcp.path),
    )
    path = manifest.write_manifest(manifest.manifest_path(outdir, rcp.outputs.name), data)
    return RunResult(path, data, result)


def build_image(
    rcp: Recipe,
    builder: str,
    ws: Workspace,
    progress: Progress,
    on_line: Callable[[str], None] | None,
) -> tuple[OciImage, str]:
    platform = Platform.parse(rcp.build.platform) if rcp.build.platform else None
    if rcp.build.image:
        ref = parse_ref(rcp.build.image)
        with progress.step(f"opening {ref}"):
            return open_image(ref, ws.path, platform), str(ref)
    tag = f"oci2disk-recipe/{_tag_name(rcp.name)}:latest"
    if select_builder(builder) == "buildah":
        from oci2disk.build import buildah

        with progress.step(f"buildah build {rcp.path.name} -> {tag}"):
            image_id = buildah.build(rcp.build, tag, on_line=on_line)
        with progress.step("copying the image out of containers-storage as an OCI layout"):
            image = buildah.export(image_id, ws.path / "image")
        source = f"containers-storage:localhost/{tag}"
        return check_platform(image, platform, source), source
    from oci2disk.build import docker

    with progress.step(f"docker build {rcp.path.name} -> {tag}"):
        docker.build(rcp.build, tag, on_line=on_line)
    with progress.step("exporting the image as an OCI layout"):
        image = docker.save_to_layout(tag, ws.path / "image")
    return check_platform(image, platform, f"docker-daemon:{tag}"), f"docker-daemon:{tag}"


BUILDERS = ("auto", "docker", "buildah")


def select_builder(builder: str) -> str:
    """Resolve ``builder``: "auto" is "docker" when an engine answers, else "buildah"."""
    from oci2disk.build import buildah, docker

    if builder not in BUILDERS:
        raise UsageError(f"unknown builder {builder!r}", hint=f"use one of: {', '.join(BUILDERS)}")
    if builder != "auto":
        return builder
    if docker.engine_available():
        return "docker"
    if buildah.available():
        log.info("no Docker Engine answers; building with buildah")
        return "buildah"
    raise BuildError(
        "no image builder: no Docker Engine answers and buildah is not installed",
        hint="start the Docker Engine (dockerd, or check DOCKER_HOST), "
        "or install buildah (Debian package buildah) for daemonless builds",
    )


def _tag_name(name: str) -> str:
    return re.sub(r"[^a-z0-9._-]+", "-", name.lower()).strip("-.") or "recipe"


# ---------------------------------------------------------------- verify


@dataclass(frozen=True)
class VerifyReport:
    differences: tuple[Any, ...]
    ignored: tuple[str, ...]
    checked: int

    @property
    def equal(self) -> bool:
        return not self.differences


def verify_artifact(
    artifact: Path,
    source: str,
    *,
    ignore: tuple[str, ...] = (),
    partition: int | None = None,
    platform: Platform | None = None,
    progress: Progress = SILENT,
) -> VerifyReport:
    """``oci2disk verify``: what ``artifact`` holds against the flattened source.

    The artifact may be a disk or filesystem image (its ext filesystem is read without
    mounting and checked with e2fsck), a cgz or other cpio, a rootfs tar, or a directory.
    """
    from oci2disk import verify

    if not artifact.exists():
        raise VerifyError(f"{artifact}: no such file or directory")
    known = manifest.find_for_artifact(artifact)
    ignored = (*(known.generated if known else ()), *ignore)
    kind = artifact_kind(artifact)
    if kind == "disk":
        ignored = ("lost+found", *ignored)
    ref: ImageRef = parse_ref(source)
    with Workspace() as ws:
        with progress.step(f"opening {ref}"):
            image = open_image(ref, ws.path, platform)
        with flattened(image, ws, progress) as rootfs:
            expected = list(_records_from_rootfs(rootfs, verify.records_from_tar))
        with progress.step(f"reading the {kind}"):
            actual = _artifact_records(kind, artifact, partition, ws, progress)
        if kind == "cpio":  # newc has no field for xattrs
            expected = [replace(r, xattrs=()) for r in expected]
        with progress.step("comparing every path"):
            diffs = verify.compare(expected, actual, ignore=ignored)
    return VerifyReport(tuple(diffs), ignored, len(expected))


def artifact_kind(path: Path) -> str:
    """ "dir", "cpio", "tar" or "disk" (any image qemu-img reads), by content."""
    from oci2disk.convert import compress

    if path.is_dir():
        return "dir"
    with compress.open_decompressed(path) as stream:
        head = stream.read(512)
    if head.startswith((b"070701", b"070702")):
        return "cpio"
    if head[257:262] == b"ustar":
        return "tar"
    return "disk"


def _artifact_records(
    kind: str, artifact: Path, partition: int | None, ws: Workspace, progress: Progress
) -> list[Any]:
    from oci2disk import extfs, verify
    from oci2disk.convert import compress, cpio, directory, qemu

    if kind == "dir":
        return list(directory.records_from_directory(artifact))
    if kind == "cpio":
        return cpio.read_records(artifact)
    if kind == "tar":
        with compress.open_decompressed(artifact) as stream:
            return list(verify.records_from_tar(stream))
    raw = artifact
    if qemu.image_format(artifact) != "raw":
        raw = ws.path / "artifact.raw"
        with progress.step(f"reading {artifact.name} with qemu-img"):
            qemu.convert_to_raw(artifact, raw)
    with extfs.open_filesystem(raw, partition) as fs:
        with progress.step("e2fsck -fn"):
            verify.fsck(raw, fs.offset)
        return list(verify.records_from_extfs(fs))


def _records_from_rootfs(
    rootfs: FlatRootfs, reader: Callable[[BinaryIO], Iterator[Any]]
) -> Iterator[Any]:
    """Feed the canonical tar through a pipe into ``reader`` (no temp copy of the rootfs)."""
    read_fd, write_fd = os.pipe()
    failure: list[BaseException] = []

    def produce() -> None:
        try:
            with os.fdopen(write_fd, "wb") as out:
                rootfs.write_tar(out)
        except BrokenPipeError:
            pass
        except BaseException as exc:  # re-raised in the reading thread
            failure.append(exc)

    thread = threading.Thread(target=produce, daemon=True)
    thread.start()
    with os.fdopen(read_fd, "rb") as stream:
        yield from reader(stream)
    thread.join()
    if failure:
        raise failure[0]


# ---------------------------------------------------------------- boot


def boot_artifact(
    artifact: Path,
    *,
    kernel: Path | None = None,
    initrd: Path | None = None,
    append: str = "",
    expect: str = "login:",
    timeout: float = 300.0,
    log_path: Path | None = None,
    memory_mb: int = 1024,
    progress: Progress = SILENT,
    echo: Callable[[str], None] | None = None,
) -> Any:
    """``oci2disk boot``: boot the disk under QEMU with the kernel from its own /boot."""
    from oci2disk import boot
    from oci2disk.convert import qemu

    if not artifact.is_file():
        raise BootError(f"{artifact}: no such disk image")
    log_path = log_path or artifact.with_name(artifact.name + ".boot.log")
    with Workspace() as ws:
        if kernel is None:
            with progress.step("copying the kernel and initrd out of the image's /boot"):
                kernel, found_initrd, root = boot.kernel_from_disk(artifact, ws.path)
            initrd = initrd or found_initrd
        else:
            root = f"UUID={_filesystem_uuid(artifact, ws)}"
        arch = boot.kernel_arch(kernel)  # an arm64 image boots under qemu-system-aarch64
        spec = boot.BootSpec(
            disk=artifact,
            kernel=kernel,
            initrd=initrd,
            append=boot.kernel_cmdline(root, append, arch=arch),
            disk_format=qemu.image_format(artifact),
            memory_mb=memory_mb,
            arch=arch,
        )
        accel = "TCG (a foreign architecture)"
        if arch == boot.arch_name(os.uname().machine):
            accel = "KVM" if boot.kvm_usable() else "TCG (no working KVM)"
        with progress.step(f"booting under QEMU, {accel}; waiting for {expect!r}"):
            return boot.boot(
                spec,
                expect=expect,
                timeout=timeout,
                log_path=log_path,
                on_line=echo or (lambda line: progress.update(line[:100])),
            )


def _filesystem_uuid(artifact: Path, ws: Workspace) -> str:
    from oci2disk import extfs
    from oci2disk.convert import qemu

    known = manifest.find_for_artifact(artifact)
    if known is not None and known.filesystem_uuid:
        return known.filesystem_uuid
    raw = artifact
    if qemu.image_format(artifact) != "raw":
        raw = ws.path / "disk.raw"
        qemu.convert_to_raw(artifact, raw)
    with extfs.open_filesystem(raw) as fs:
        return fs.uuid
