"""The pipeline, step by step: recipe -> build -> OCI layout -> flatten -> convert -> verify/boot.

Each public function here is one user-facing command, callable from Python. It returns
typed values (:class:`RunResult` holds the :class:`~oci2disk.manifest.RunManifest`);
printing them is the command line's job.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass, replace
from pathlib import Path

from oci2disk import artifact_cache, build, manifest, recipe, settings
from oci2disk import convert as conv
from oci2disk.boot import boot_artifact as boot_artifact
from oci2disk.convert import Format
from oci2disk.errors import ConvertError, ImageError
from oci2disk.oci import cache
from oci2disk.oci.add import Addition
from oci2disk.oci.layout import OciImage, Platform
from oci2disk.oci.transports import check_platform
from oci2disk.progress import SILENT, Progress
from oci2disk.recipe import Recipe
from oci2disk.refs import parse_ref
from oci2disk.rootfs.flat import FlatRootfs
from oci2disk.rootfs.flatten import flatten
from oci2disk.sources import open_image
from oci2disk.verify import VerifyReport
from oci2disk.verify import verify_artifact as verify_artifact
from oci2disk.workspace import (
    Workspace,
    check_directory_target,
    check_file_target,
    missing_directory,
    sweep_leftovers,
)

log = logging.getLogger("oci2disk")

DEFAULT_NAME = "disk"  # base name of the outputs when convert writes several

__all__ = [
    "RunResult",
    "VerifyReport",
    "boot_artifact",
    "build_recipe",
    "convert_image",
    "convert_ref",
    "verify_artifact",
]


@dataclass(frozen=True)
class RunResult:
    manifest_path: Path
    manifest: manifest.RunManifest
    result: conv.ConvertResult


@contextmanager
def flattened(
    image: OciImage, ws: Workspace, progress: Progress, source_date_epoch: int | None
) -> Iterator[FlatRootfs]:
    with progress.step(f"reading {len(image.layers)} layer(s) of {image.digest[:19]}"):
        rootfs = flatten(image, ws.subdir("flatten"), source_date_epoch=source_date_epoch)
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
    reopen: Callable[[], OciImage] | None = None,
) -> conv.ConvertResult:
    """Flatten ``image`` once and write every output from it; with a cache active,
    outputs stored for the same image and options are copied instead.

    An image opened from the cache with :func:`cache.deferred_checks` has its layers
    checked here, when they are about to be read; ``reopen`` opens it again (from its
    source) when one of them is damaged.
    """
    check_outputs(outputs, options)
    store = cache.active()
    if store is not None and artifact_cache.cacheable(outputs):
        key = artifact_cache.key(image, outputs, options)
        reused = artifact_cache.reuse(store, key, outputs)
        if reused is not None:
            progress.message(f"    outputs unchanged: re-used from the cache ({key[:12]})")
            return reused
    if store is not None and not store.checked(image):
        if reopen is None:
            raise ImageError(
                "a layer of the image in the cache was damaged (it is removed now)",
                hint="run the command again: the image is read afresh from its source",
            )
        with progress.step("reading the image again (a cached layer was damaged)"):
            image = reopen()
    if store is None or not artifact_cache.cacheable(outputs):
        with flattened(image, ws, progress, options.source_date_epoch) as rootfs:
            return conv.convert(image, rootfs, outputs, options, ws, progress)
    # Each output is copied into the cache while it is hashed, on the other core.
    with artifact_cache.Staging(store) as staging:
        with flattened(image, ws, progress, options.source_date_epoch) as rootfs:
            result = conv.convert(
                image, rootfs, outputs, options, ws, progress, written=staging.add
            )
        artifact_cache.store(store, key, outputs, result, staging)
    return result


def check_outputs(outputs: Mapping[Format, Path], options: conv.ConvertOptions) -> None:
    """Refuse outputs that would destroy what is there; remove a killed run's leftovers."""
    for fmt, path in outputs.items():
        _check_output_dir(path)
        if fmt.plugin.directory:
            check_directory_target(path, replace=options.replace and _made_here(path))
        elif fmt is not Format.KERNEL:  # the kernel's -o may name a directory
            check_file_target(path)
    for folder in {path.parent for path in outputs.values()}:
        sweep_leftovers(folder)


def _made_here(path: Path) -> bool:
    """Whether a run of oci2disk made the directory ``path`` (a manifest beside it lists it)."""
    if not path.is_dir() or not any(path.iterdir()) or manifest.find_for_artifact(path):
        return True
    raise ConvertError(
        f"{path} is a directory that oci2disk did not make (no manifest beside it lists "
        "it): --force replaces only the directories oci2disk wrote",
        hint="choose a new path, or empty the directory yourself",
    )


def _check_output_dir(path: Path) -> None:
    if not path.parent.is_dir():
        raise missing_directory(path.parent)


def convert_ref(
    source: str,
    fmt: Format | Sequence[Format],
    output: Path,
    options: conv.ConvertOptions,
    *,
    platform: Platform | None = None,
    progress: Progress = SILENT,
    additions: Sequence[Addition] = (),
) -> RunResult:
    """``oci2disk convert``: an existing image to one artifact plus its manifest.

    With several formats, ``output`` is a directory (made when missing) that gets each
    output under its default name (``disk.qcow2``, ``disk.cgz``, ``disk.rootfs/``...) and
    ``disk.manifest.json``, as ``build`` writes them. SOURCE_DATE_EPOCH is read once, here,
    unless ``options`` carries it already.
    """
    if options.source_date_epoch is None:
        options = replace(options, source_date_epoch=settings.source_date_epoch())
    ref = parse_ref(source)
    output = output.absolute()
    formats = [fmt] if isinstance(fmt, Format) else list(dict.fromkeys(fmt))
    if len(formats) == 1:
        outputs = {formats[0]: output}
        where = manifest.manifest_path(output.parent, output.name)
    else:
        _check_output_dir(output)
        output.mkdir(exist_ok=True)
        outputs = conv.default_outputs(output, DEFAULT_NAME, tuple(formats), options)
        where = manifest.manifest_path(output, DEFAULT_NAME)
    check_outputs(outputs, options)
    conv.preflight(formats)
    with Workspace() as ws:
        # Outputs stored for this image need none of its layers: they are checked only
        # when they are read (convert_image), and then read again if one is damaged.
        with progress.step(f"opening {ref}"), deferred(not additions):
            image = open_image(ref, ws.path, platform)
        image = with_additions(image, additions, ws, progress)
        result = convert_image(
            image, outputs, options, ws, progress, lambda: open_image(ref, ws.path, platform)
        )
    made = manifest.from_run(source=str(ref), image=image, result=result, options=options)
    path = manifest.write(where, made)
    return RunResult(path, made, result)


def build_recipe(
    recipe_dir: Path,
    *,
    outdir: Path | None = None,
    formats: tuple[Format, ...] | None = None,
    build_args: dict[str, str] | None = None,
    builder: str = build.AUTO,
    platform: str | None = None,
    progress: Progress = SILENT,
    on_build_line: Callable[[str], None] | None = None,
    jobs: int | None = None,
    source_date_epoch: int | None = None,
    additions: Sequence[Addition] = (),
    firmware: tuple[conv.Firmware, ...] | None = None,
    cmdline: str | None = None,
    force: bool = False,
    keep_identity: bool = False,
) -> RunResult:
    """``oci2disk build``: build the recipe's image, then write every output it names.

    ``firmware`` and ``cmdline`` (--firmware, --cmdline) override the recipe's [boot].

    ``builder`` is "docker", "buildah" or "auto" (the Docker Engine when one answers,
    else buildah); ``platform`` (OS/ARCH) overrides the recipe's build.platform.
    SOURCE_DATE_EPOCH is read once, here, unless ``source_date_epoch`` is given.
    """
    if source_date_epoch is None:
        source_date_epoch = settings.source_date_epoch()
    rcp = recipe.load(recipe_dir)
    if build_args:
        rcp = replace(rcp, build=replace(rcp.build, args={**rcp.build.args, **build_args}))
    if source_date_epoch is not None and "SOURCE_DATE_EPOCH" not in rcp.build.args:
        # A Dockerfile that declares ARG SOURCE_DATE_EPOCH gets it: initramfs-tools, dpkg
        # and most build tools then date what they make by it, not by the clock.
        sde = {"SOURCE_DATE_EPOCH": str(source_date_epoch)}
        rcp = replace(rcp, build=replace(rcp.build, args={**rcp.build.args, **sde}))
    if platform:
        rcp = replace(rcp, build=replace(rcp.build, platform=str(Platform.parse(platform))))
    if firmware is not None:
        rcp = replace(rcp, boot=replace(rcp.boot, firmware=firmware))
    if cmdline is not None:
        rcp = replace(rcp, boot=replace(rcp.boot, cmdline=cmdline))
    outdir = (outdir or Path("out") / rcp.name).absolute()
    outdir.mkdir(parents=True, exist_ok=True)
    wanted = formats or rcp.outputs.formats
    conv.preflight(wanted)
    options = replace(
        conv.ConvertOptions.from_recipe(rcp, source_date_epoch), jobs=jobs, replace=force
    )
    if keep_identity:
        options = replace(options, keep_identity=True)
    with Workspace() as ws:
        with deferred(not additions):  # as in convert_ref
            image, source = build_image(rcp, builder, ws, progress, on_build_line)
        image = with_additions(image, additions, ws, progress)
        outputs = conv.default_outputs(outdir, rcp.outputs.name, wanted, options)
        result = convert_image(
            image,
            outputs,
            options,
            ws,
            progress,
            lambda: build_image(rcp, builder, ws, progress, on_build_line)[0],
        )
    made = manifest.from_run(
        source=source, image=image, result=result, options=options, recipe=rcp.path
    )
    path = manifest.write(manifest.manifest_path(outdir, rcp.outputs.name), made)
    return RunResult(path, made, result)


def deferred(when: bool) -> AbstractContextManager[None]:
    """:func:`cache.deferred_checks` when ``when`` (an image with additions is copied
    at once, and so read: its layers are checked then)."""
    return cache.deferred_checks() if when else nullcontext()


def build_image(
    rcp: Recipe,
    builder: str,
    ws: Workspace,
    progress: Progress,
    on_line: Callable[[str], None] | None,
) -> tuple[OciImage, str]:
    """The recipe's image as an OCI layout, and the reference it has (for the manifest)."""
    platform = Platform.parse(rcp.build.platform) if rcp.build.platform else None
    if rcp.build.image:
        ref = parse_ref(rcp.build.image)
        with progress.step(f"opening {ref}"):
            return open_image(ref, ws.path, platform), str(ref)
    tag = f"oci2disk-recipe/{_tag_name(rcp.name)}:latest"
    chosen = build.select(builder)
    name = chosen.kind.value
    with progress.step(f"{name} build {rcp.path.name} -> {tag}"):
        image_id = chosen.build(rcp.build, tag, on_line=on_line)
    with progress.step(f"exporting the image from {name} as an OCI layout"):
        image = chosen.export(tag, image_id, ws.path / "image")
    source = chosen.source(tag)
    return check_platform(image, platform, source), source


def with_additions(
    image: OciImage, additions: Sequence[Addition], ws: Workspace, progress: Progress
) -> OciImage:
    """``--add``: host files as extra layers on a copy of the image (umoci insert)."""
    if not additions:
        return image
    from oci2disk.oci.add import add_files

    with progress.step(f"adding {len(additions)} path(s) to the image as new layers"):
        return add_files(image, additions, ws.subdir("added"))


def _tag_name(name: str) -> str:
    return re.sub(r"[^a-z0-9._-]+", "-", name.lower()).strip("-.") or "recipe"
