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
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from oci2disk import convert as conv
from oci2disk import manifest, recipe
from oci2disk.errors import BootError, ConvertError, Oci2DiskError, VerifyError
from oci2disk.flatten import FlatRootfs, flatten
from oci2disk.oci.layout import OciImage, Platform
from oci2disk.oci.source import open_image
from oci2disk.progress import SILENT, Progress
from oci2disk.recipe import Format, Recipe
from oci2disk.refs import ImageRef, parse_ref
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
        return conv.convert(image, rootfs, outputs, options, ws, progress)


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
    builder: str = "docker",
    progress: Progress = SILENT,
    on_build_line: Callable[[str], None] | None = None,
) -> RunResult:
    """``oci2disk build``: build the recipe's image, then write every output it names."""
    rcp = recipe.load(recipe_dir)
    if build_args:
        from dataclasses import replace

        rcp = replace(rcp, build=replace(rcp.build, args={**rcp.build.args, **build_args}))
    outdir = (outdir or Path("out") / rcp.name).absolute()
    outdir.mkdir(parents=True, exist_ok=True)
    wanted = formats or rcp.outputs.formats
    conv.preflight(wanted)
    options = conv.ConvertOptions(
        disk=rcp.disk, compression=rcp.outputs.compression, source_date_epoch=source_date_epoch()
    )
    with Workspace() as ws:
        image, source = build_image(rcp, builder, ws, progress, on_build_line)
        outputs = conv.default_outputs(outdir, rcp.outputs.name, wanted)
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
    if builder != "docker":
        raise Oci2DiskError(f"builder {builder!r} is not available", hint="use --builder docker")
    from oci2disk.build import docker

    tag = f"oci2disk-recipe/{_tag_name(rcp.name)}:latest"
    with progress.step(f"docker build {rcp.path.name} -> {tag}"):
        docker.build(rcp.build, tag, on_line=on_line)
    with progress.step("exporting the image as an OCI layout"):
        image = docker.save_to_layout(tag, ws.path / "image")
    return image, f"docker-daemon:{tag}"


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
    """``oci2disk verify``: the ext filesystem in ``artifact`` against the flattened source."""
    from oci2disk import extfs, verify

    if not artifact.is_file():
        raise VerifyError(f"{artifact}: no such file")
    known = manifest.find_for_artifact(artifact)
    ignored = ("lost+found", *(known.generated if known else ()), *ignore)
    ref: ImageRef = parse_ref(source)
    with Workspace() as ws:
        raw = artifact
        if _qemu_format(artifact) not in ("raw", None):
            raw = ws.path / "artifact.raw"
            with progress.step(f"reading {artifact.name} with qemu-img"):
                from oci2disk import run

                run.run(["qemu-img", "convert", "-O", "raw", str(artifact), str(raw)])
        with progress.step(f"opening {ref}"):
            image = open_image(ref, ws.path, platform)
        with flattened(image, ws, progress) as rootfs, extfs.open_filesystem(raw, partition) as fs:
            with progress.step("e2fsck -fn"):
                verify.fsck(raw, fs.offset)
            with progress.step("comparing every path"):
                expected = list(_records_from_rootfs(rootfs, verify.records_from_tar))
                actual = list(verify.records_from_extfs(fs))
                diffs = verify.compare(expected, actual, ignore=ignored)
    return VerifyReport(tuple(diffs), ignored, len(expected))


def _qemu_format(path: Path) -> str | None:
    with path.open("rb") as f:
        magic = f.read(8)
    if magic.startswith(b"QFI\xfb"):
        return "qcow2"
    if magic.startswith(b"KDMV") or magic.startswith(b"conectix") or magic.startswith(b"vhdxfile"):
        return "other"
    if magic.startswith(b"<<< "):
        return "vdi"
    return None


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
        spec = boot.BootSpec(
            disk=artifact,
            kernel=kernel,
            initrd=initrd,
            append=boot.kernel_cmdline(root, append),
            disk_format=boot.image_format(artifact),
            memory_mb=memory_mb,
        )
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
    from oci2disk import extfs, run

    known = manifest.find_for_artifact(artifact)
    if known is not None and known.filesystem_uuid:
        return known.filesystem_uuid
    raw = artifact
    if _qemu_format(artifact) not in ("raw", None):
        raw = ws.path / "disk.raw"
        run.run(["qemu-img", "convert", "-O", "raw", str(artifact), str(raw)])
    with extfs.open_filesystem(raw) as fs:
        return fs.uuid
