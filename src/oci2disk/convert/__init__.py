"""The conversion stage: one flattened rootfs in, every requested artifact out.

Each output format is a plugin (:mod:`.plugin`) listed once in :class:`Format`
(:mod:`.formats`). Disk formats share a single raw disk, built once. The converters of
one run read the same flattened rootfs and run at the same time (one thread each, up
to ``ConvertOptions.jobs``); the qcow2/vmdk/... converters wait for the raw disk. When
one fails, the others stop at their next write and no output is left behind.

Host tools: those of the formats asked for, checked by :func:`preflight`.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import FIRST_EXCEPTION, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path

from oci2disk import run
from oci2disk.bytestreams import sha256_file
from oci2disk.convert import bootable, disk
from oci2disk.convert.formats import Format
from oci2disk.convert.job import Job, Stopped
from oci2disk.convert.options import ConvertOptions, Firmware
from oci2disk.oci.layout import OciImage
from oci2disk.progress import SILENT, Progress
from oci2disk.rootfs.flat import FlatRootfs
from oci2disk.workspace import AtomicDirectory, AtomicOutput, Workspace

__all__ = [
    "REGISTRY",
    "Artifact",
    "ConvertOptions",
    "ConvertResult",
    "Firmware",
    "Format",
    "Job",
    "convert",
    "default_outputs",
    "output_name",
    "preflight",
]

log = logging.getLogger("oci2disk.convert")

# Every format by each name users may write for it ("vhd" too).
REGISTRY: dict[str, Format] = {
    name: fmt for fmt in Format for name in (fmt.plugin.name, *fmt.plugin.aliases)
}


@dataclass(frozen=True)
class Artifact:
    path: Path
    format: Format
    size: int
    sha256: str


@dataclass(frozen=True)
class ConvertResult:
    artifacts: tuple[Artifact, ...]
    fs: disk.FsIdentity | None
    layout: disk.DiskLayout | None
    generated: tuple[str, ...]
    warnings: tuple[str, ...] = ()  # what an output could not keep (a dir made without root)
    identity: tuple[str, ...] = ()  # machine-id, SSH host keys ... taken out of the outputs
    noise: tuple[str, ...] = ()  # logs and caches of the build's clock (SOURCE_DATE_EPOCH)
    bootloader: bootable.Installed | None = None  # what the disk boots with on its own


def preflight(formats: Iterable[Format]) -> None:
    """Fail fast, naming the Debian package, when a needed host tool is missing."""
    for fmt in formats:
        for tool in fmt.plugin.tools:
            run.which(tool.program, package=tool.package)
        if fmt.plugin.preflight is not None:
            fmt.plugin.preflight()


def convert(
    image: OciImage,
    rootfs: FlatRootfs,
    outputs: Mapping[Format, Path],
    options: ConvertOptions,
    workspace: Workspace,
    progress: Progress = SILENT,
    *,
    written: Callable[[Path], None] | None = None,
) -> ConvertResult:
    """Write every requested output; all or nothing (temp names, renamed at the end).

    ``written`` is told of each finished output file (its temporary name) before it
    is hashed: the cache copies it meanwhile.
    """
    preflight(outputs)
    job = Job(image, rootfs, options, workspace, progress)
    job.written = written
    pending: dict[Format, AtomicOutput | AtomicDirectory] = {}
    artifacts: list[Artifact] = []
    try:
        for fmt, path in outputs.items():
            if fmt is Format.KERNEL and path.is_dir():
                path = path / "vmlinuz"
            job.targets[fmt.plugin] = path
            plugin = fmt.plugin
            pending[fmt] = (
                AtomicDirectory(path, replace=options.replace)
                if plugin.directory
                else AtomicOutput(path)
            )
            if plugin.raw:
                job.raw_target = pending[fmt].tmp
        # the raw disk first, so that it starts at once; the converters that wait for it last
        order = sorted(pending, key=lambda f: (not f.plugin.raw, f.plugin.from_raw))
        _run(job, [(fmt, pending[fmt].tmp) for fmt in order])
        for fmt in order:
            for output in [pending[fmt], *job.siblings.get(fmt.plugin, [])]:
                digest = job.digests[output.tmp]
                path = output.commit()
                size = job.rootfs.stats.data_bytes if path.is_dir() else path.stat().st_size
                artifacts.append(Artifact(path, fmt, size, digest))
    finally:
        for output in [*pending.values(), *(o for s in job.siblings.values() for o in s)]:
            output.discard()
    edited = any(fmt not in (Format.TAR, Format.KERNEL) for fmt in outputs)
    carried = any(fmt.plugin.disk for fmt in outputs) or (
        options.disk.fstab_all_outputs and any(fmt is Format.TAR for fmt in outputs)
    )
    return ConvertResult(
        artifacts=tuple(artifacts),
        fs=job.identity if job.layout is not None else None,
        layout=job.layout,
        generated=(*(e.path for e in job.generated if carried), *job.added),
        warnings=tuple(job.warnings),
        identity=job.identity_edits.paths if edited else (),
        noise=job.noise_edits.paths if edited else (),
        bootloader=job.installed,
    )


def _task(job: Job, fmt: Format, tmp: Path) -> None:
    """One converter, then the sha256 of what it wrote (while it is in the page cache)."""
    fmt.plugin.write(job, tmp)
    for path in [tmp, *(s.tmp for s in job.siblings.get(fmt.plugin, []))]:
        if path not in job.digests:
            if job.written is not None:
                job.written(path)
            job.digests[path] = sha256_file(path)


def _run(job: Job, tasks: list[tuple[Format, Path]]) -> None:
    """Run the converters, several at once; raise the first real failure."""
    workers = min(len(tasks), job.options.jobs or max(2, len(os.sched_getaffinity(0))))
    if workers <= 1:
        for fmt, tmp in tasks:
            _task(job, fmt, tmp)
        return
    futures: list[Future[None]] = []
    with ThreadPoolExecutor(workers, thread_name_prefix="oci2disk-convert") as pool:
        try:
            futures = [pool.submit(_task, job, fmt, tmp) for fmt, tmp in tasks]
            wait(futures, return_when=FIRST_EXCEPTION)
        finally:
            # A failure (or Ctrl-C) stops the others at their next write.
            if not all(f.done() and f.exception() is None for f in futures):
                job.stop.set()
                pool.shutdown(wait=True, cancel_futures=True)
    failures = [exc for f in futures if not f.cancelled() and (exc := f.exception()) is not None]
    if failures:
        # The first real failure, not the "stopped because another failed" that followed.
        raise next((e for e in failures if not isinstance(e, Stopped)), failures[0])


def default_outputs(
    outdir: Path,
    name: str,
    formats: tuple[Format, ...],
    options: ConvertOptions | None = None,
) -> dict[Format, Path]:
    """Where ``oci2disk build`` writes each output: NAME.raw, NAME.cgz, vmlinuz ..."""
    return {fmt: outdir / output_name(fmt, name, options) for fmt in formats}


def output_name(fmt: Format, name: str, options: ConvertOptions | None = None) -> str:
    return fmt.plugin.output_name(name, options or ConvertOptions())
