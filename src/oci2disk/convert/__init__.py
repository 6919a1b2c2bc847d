"""The conversion stage: one flattened rootfs in, every requested artifact out.

Each output format is a converter in ``REGISTRY``; a new format is one module and one
registry line. Disk formats share a single raw disk, built once. The converters of one
run read the same flattened rootfs and run at the same time (one thread each, up to
``ConvertOptions.jobs``); the qcow2/vmdk/... converters wait for the raw disk. When one
fails, the others stop at their next write and no output is left behind.
"""

from __future__ import annotations

import errno
import hashlib
import logging
import os
import re
import threading
from collections.abc import Iterable, Mapping
from concurrent.futures import FIRST_EXCEPTION, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field, replace
from datetime import datetime
from pathlib import Path
from typing import BinaryIO, Protocol, cast

from oci2disk import run
from oci2disk.convert import compress, cpio, directory, disk, iso, kernel, qemu, squashfs, tar
from oci2disk.errors import ConvertError
from oci2disk.flatten import ExtraFile, FlatRootfs
from oci2disk.oci.layout import OciImage
from oci2disk.progress import SILENT, Progress
from oci2disk.recipe import (
    DISK_FORMATS,
    ArchiveCompression,
    Compression,
    DiskSpec,
    Format,
    InitramfsSpec,
    KernelSpec,
    Recipe,
    Table,
    TarSpec,
)
from oci2disk.workspace import AtomicDirectory, AtomicOutput, Workspace

log = logging.getLogger("oci2disk.convert")


@dataclass(frozen=True)
class Artifact:
    path: Path
    format: Format
    size: int
    sha256: str


@dataclass(frozen=True)
class ConvertOptions:
    disk: DiskSpec = field(default_factory=DiskSpec)
    compression: Compression = Compression.NONE  # qcow2
    source_date_epoch: int | None = None
    initramfs: InitramfsSpec = field(default_factory=InitramfsSpec)
    tar: TarSpec = field(default_factory=TarSpec)
    kernel: KernelSpec = field(default_factory=KernelSpec)
    jobs: int | None = None  # converters running at once; None: one per core, at least 2
    squashfs: squashfs.SquashfsSpec = field(default_factory=squashfs.SquashfsSpec)
    iso: iso.IsoSpec = field(default_factory=iso.IsoSpec)

    @classmethod
    def from_recipe(cls, rcp: Recipe, source_date_epoch: int | None = None) -> ConvertOptions:
        return cls(
            disk=rcp.disk,
            compression=rcp.outputs.compression,
            source_date_epoch=source_date_epoch,
            initramfs=rcp.initramfs,
            tar=rcp.tar,
            kernel=rcp.kernel,
        )


@dataclass(frozen=True)
class ConvertResult:
    artifacts: tuple[Artifact, ...]
    fs: disk.FsIdentity | None
    layout: disk.DiskLayout | None
    generated: tuple[str, ...]
    warnings: tuple[str, ...] = ()  # what an output could not keep (a dir made without root)


class _Stopped(Exception):
    """A converter stopped because another one failed (or the run was interrupted)."""


class Job:
    """State shared by the converters of one run: the rootfs and the one raw disk."""

    def __init__(
        self,
        image: OciImage,
        rootfs: FlatRootfs,
        options: ConvertOptions,
        workspace: Workspace,
        progress: Progress,
    ) -> None:
        self.image = image
        self.rootfs = rootfs
        self.options = options
        self.workspace = workspace
        self.progress = progress
        spec = options.disk
        self.identity = disk.FsIdentity(
            uuid=spec.uuid or disk.derive_uuid(image.digest, spec.fs.value, spec.label),
            label=spec.label,
            fs=spec.fs,
        )
        self.extra: list[ExtraFile] = disk.generated_files(rootfs, self.identity, spec.fstab)
        self.layout: disk.DiskLayout | None = None
        self._raw: Path | None = None
        self._raw_lock = threading.Lock()
        self._raw_failed = False
        self.raw_target: Path | None = None  # where the raw disk goes when it is an output
        self.targets: dict[Format, Path] = {}  # each output's final path
        self.stop = threading.Event()  # set when a converter fails: the others give up
        self._lock = threading.Lock()
        self.siblings: dict[Format, list[AtomicOutput]] = {}  # more files of one output
        self.added: list[str] = []  # paths a converter added to its output (cgz: init)
        self.warnings: list[str] = []
        self.digests: dict[Path, str] = {}  # sha256 of each temp output (a dir's: its tree)

    @property
    def timestamp(self) -> int:
        """Filesystem creation time: SOURCE_DATE_EPOCH, else when the image was created."""
        if self.options.source_date_epoch is not None:
            return max(self.options.source_date_epoch, 1)
        return max(_epoch(self.image.config.created), 1)  # 0 means "now" to e2fsprogs

    def build_fs(self, path: Path, spec: DiskSpec) -> disk.DiskLayout:
        layout = disk.plan_layout(self.rootfs.stats, spec)
        with path.open("r+b") as f:
            f.truncate(layout.disk_bytes)
        if layout.table is not Table.NONE:
            disk.write_partition_table(path, layout, self.identity)
        label = f"mke2fs -d ({self.identity.fs.value}, {disk.human(layout.fs_bytes)})"
        with self.progress.step(f"writing {label} into {path.name}"):
            disk.write_filesystem(
                self.rootfs,
                path,
                layout,
                self.identity,
                extra=self.extra,
                timestamp=self.timestamp,
                wrap=lambda sink: self.stream(sink, "rootfs stream"),
            )
            disk.apply_extra_xattrs(self.rootfs, path, layout, self.workspace.subdir("xattrs"))
        return layout

    def raw_disk(self) -> Path:
        """The raw disk, built once; into its output file when raw is requested."""
        with self._raw_lock:  # the first converter to ask builds it; the others wait
            if self._raw_failed:
                raise _Stopped()
            if self._raw is None:
                path = self.raw_target or self.workspace.path / "disk.raw"
                path.touch()
                try:
                    self.layout = self.build_fs(path, self.options.disk)
                except BaseException:
                    self._raw_failed = True
                    raise
                self._raw = path
            return self._raw

    def check(self) -> None:
        """Raise if another converter failed, so that this one stops early."""
        if self.stop.is_set():
            raise _Stopped()

    def stream(self, sink: BinaryIO, label: str) -> BinaryIO:
        """``sink`` reporting progress, and stopping when another converter failed."""
        return self.progress.counting(cast(BinaryIO, _Guarded(sink, self)), label)

    def sibling(self, fmt: Format, target: Path) -> Path:
        """A further file of ``fmt``'s output (e.g. initrd.img beside vmlinuz); its temp path."""
        output = AtomicOutput(target)
        with self._lock:
            self.siblings.setdefault(fmt, []).append(output)
        return output.tmp

    def note_added(self, paths: Iterable[str]) -> None:
        """Paths a converter added to its output (listed in the manifest as generated)."""
        with self._lock:
            self.added += paths

    def warn(self, text: str) -> None:
        log.warning("%s", text)
        with self._lock:
            self.warnings.append(text)


class _Guarded:
    """A binary sink that raises once the job is told to stop."""

    def __init__(self, sink: BinaryIO, job: Job) -> None:
        self._sink = sink
        self._job = job

    def write(self, data: bytes) -> int:
        self._job.check()
        return self._sink.write(data)

    def flush(self) -> None:
        self._sink.flush()

    def __getattr__(self, name: str) -> object:
        return getattr(self._sink, name)


class Converter(Protocol):
    def __call__(self, job: Job, out: Path) -> None: ...


def write_raw(job: Job, out: Path) -> None:
    assert job.raw_disk() == out, "the raw output is built in place"


def write_fs(job: Job, out: Path) -> None:
    layout = job.build_fs(out, replace(job.options.disk, table=Table.NONE))
    if job.layout is None:
        job.layout = layout


def qemu_converter(fmt: Format) -> Converter:
    def convert(job: Job, out: Path) -> None:
        raw = job.raw_disk()
        with job.progress.step(f"qemu-img convert to {fmt.value}"):
            qemu.convert(raw, fmt, out, job.options.compression)

    return convert


def write_tar(job: Job, out: Path) -> None:
    spec = job.options.tar
    how = compress.describe(spec.compression, spec.level)
    with job.progress.step(f"writing the rootfs tar (compression: {how})"):
        tar.write_tar(
            job.rootfs, out, spec, extra=job.extra, wrap=lambda s: job.stream(s, "rootfs tar")
        )


def write_cgz(job: Job, out: Path) -> None:
    spec = job.options.initramfs
    how = compress.describe(spec.compression, spec.level)
    with job.progress.step(f"writing the initramfs cpio (compression: {how})"):
        stats = cpio.write_cgz(
            job.rootfs,
            out,
            spec,
            mtime=job.timestamp,
            wrap=lambda s: job.stream(s, "initramfs cpio"),
        )
    job.note_added(stats.added)


def write_dir(job: Job, out: Path) -> None:
    with job.progress.step(f"extracting the rootfs into {job.targets[Format.DIR].name}/"):
        report = directory.extract(job.rootfs, out, check=job.check)
    for line in report.summary():
        job.warn(f"{job.targets[Format.DIR]}: {line}")
    job.digests[out] = report.digest


def write_kernel(job: Job, out: Path) -> None:
    spec = job.options.kernel
    chosen = kernel.choose(job.rootfs, spec)
    where = job.targets[Format.KERNEL].parent
    initrd = job.sibling(Format.KERNEL, where / "initrd.img") if chosen.initrd else None
    if chosen.initrd is None:
        job.warn(f"the image has no initrd for kernel {chosen.version}; wrote the kernel only")
    vmlinux = job.sibling(Format.KERNEL, where / "vmlinux") if spec.vmlinux else None
    with job.progress.step(f"writing kernel {chosen.version}"):
        kernel.write_kernel(
            job.rootfs,
            chosen,
            out,
            initrd=initrd,
            vmlinux=vmlinux,
            workdir=job.workspace.subdir("kernel"),
        )


def write_squashfs(job: Job, out: Path) -> None:
    spec = job.options.squashfs
    with job.progress.step(f"writing the squashfs image ({spec.compressor.value})"):
        squashfs.write_squashfs(
            lambda sink: job.rootfs.write_tar(job.stream(sink, "squashfs"), extra=job.extra),
            out,
            spec,
            source_date_epoch=job.options.source_date_epoch,
            jobs=job.options.jobs,
        )


def write_iso(job: Job, out: Path) -> None:
    with job.progress.step("writing the bootable ISO (kernel + the rootfs as initramfs)"):
        iso.write_iso_from_rootfs(
            job.rootfs,
            out,
            job.options.iso,
            initramfs=job.options.initramfs,
            kernel_version=job.options.kernel.version,
            workdir=job.workspace.subdir("iso"),
            mtime=job.timestamp,
            source_date_epoch=job.options.source_date_epoch,
        )


REGISTRY: dict[Format, Converter] = {
    Format.RAW: write_raw,
    Format.FS: write_fs,
    Format.QCOW2: qemu_converter(Format.QCOW2),
    Format.VMDK: qemu_converter(Format.VMDK),
    Format.VHDX: qemu_converter(Format.VHDX),
    Format.VPC: qemu_converter(Format.VPC),
    Format.VDI: qemu_converter(Format.VDI),
    Format.TAR: write_tar,
    Format.CGZ: write_cgz,
    Format.DIR: write_dir,
    Format.KERNEL: write_kernel,
    Format.SQUASHFS: write_squashfs,
    Format.ISO: write_iso,
}


_DISK_TOOLS = ("mke2fs", "debugfs", "sfdisk")
# Host programs each format needs, checked before any work starts.
REQUIRES: dict[Format, tuple[str, ...]] = {
    Format.RAW: _DISK_TOOLS,
    Format.FS: ("mke2fs", "debugfs"),
    Format.TAR: (),
    Format.CGZ: (),
    Format.DIR: (),
    Format.KERNEL: (),
    Format.SQUASHFS: ("tar2sqfs",),
    Format.ISO: ("grub-mkrescue", "xorriso", "mformat"),
    **{fmt: (*_DISK_TOOLS, "qemu-img") for fmt in qemu.QEMU_FORMAT},
}


def preflight(formats: Iterable[Format]) -> None:
    """Fail fast, naming the Debian package, when a needed host tool is missing."""
    for fmt in formats:
        for tool in REQUIRES[fmt]:
            run.which(tool)
        if "mke2fs" in REQUIRES[fmt]:
            disk.require_mke2fs()


def convert(
    image: OciImage,
    rootfs: FlatRootfs,
    outputs: Mapping[Format, Path],
    options: ConvertOptions,
    workspace: Workspace,
    progress: Progress = SILENT,
) -> ConvertResult:
    """Write every requested output; all or nothing (temp names, renamed at the end)."""
    for fmt in outputs:
        if fmt not in REGISTRY:
            raise ConvertError(f"format {fmt.value} is not implemented yet")
    preflight(outputs)
    job = Job(image, rootfs, options, workspace, progress)
    pending: dict[Format, AtomicOutput | AtomicDirectory] = {}
    try:
        for fmt, path in outputs.items():
            if fmt is Format.KERNEL and path.is_dir():
                path = path / "vmlinuz"
            job.targets[fmt] = path
            pending[fmt] = AtomicDirectory(path) if fmt is Format.DIR else AtomicOutput(path)
        if Format.RAW in pending:
            job.raw_target = pending[Format.RAW].tmp
        # raw first, so that it starts at once; the converters that wait for it last
        order = sorted(pending, key=lambda f: (f is not Format.RAW, f in DISK_FORMATS))
        _run(job, [(fmt, pending[fmt].tmp) for fmt in order])
        artifacts = []
        for fmt in order:
            for output in [pending[fmt], *job.siblings.get(fmt, [])]:
                digest = job.digests[output.tmp]
                path = output.commit()
                size = job.rootfs.stats.data_bytes if path.is_dir() else path.stat().st_size
                artifacts.append(Artifact(path, fmt, size, digest))
    finally:
        for output in [*pending.values(), *(o for s in job.siblings.values() for o in s)]:
            output.discard()
    fstab_in = job.layout is not None or Format.TAR in outputs
    return ConvertResult(
        artifacts=tuple(artifacts),
        fs=job.identity if job.layout is not None else None,
        layout=job.layout,
        generated=(*(e.path for e in job.extra if fstab_in), *job.added),
        warnings=tuple(job.warnings),
    )


def _task(job: Job, fmt: Format, tmp: Path) -> None:
    """One converter, then the sha256 of what it wrote (while it is in the page cache)."""
    REGISTRY[fmt](job, tmp)
    for path in [tmp, *(s.tmp for s in job.siblings.get(fmt, []))]:
        if path not in job.digests:
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
        raise next((e for e in failures if not isinstance(e, _Stopped)), failures[0])


def sha256_file(path: Path) -> str:
    """sha256 of a file; holes of a sparse file are hashed from a zero buffer, not read.

    A raw disk is mostly holes (a 10 GiB image held 728 MiB of data); reading the
    holes through the page cache took most of the time of a large build.
    """
    h = hashlib.sha256()
    chunk = 1 << 22
    zeros = memoryview(bytes(chunk))
    with path.open("rb") as f:
        fd = f.fileno()
        size = os.fstat(fd).st_size
        position = 0
        while position < size:
            try:
                data_at = os.lseek(fd, position, os.SEEK_DATA)
            except OSError as exc:  # ENXIO: only a hole is left
                if exc.errno != errno.ENXIO:
                    raise
                data_at = size
            while position < data_at:  # a hole: zeros without reading
                n = min(chunk, data_at - position)
                h.update(zeros[:n])
                position += n
            if position >= size:
                break
            hole_at = os.lseek(fd, position, os.SEEK_HOLE)
            while position < hole_at:
                data = os.pread(fd, min(chunk, hole_at - position), position)
                if not data:
                    raise ConvertError(f"{path} changed while it was being hashed")
                h.update(data)
                position += len(data)
    return h.hexdigest()


def default_outputs(
    outdir: Path,
    name: str,
    formats: tuple[Format, ...],
    options: ConvertOptions | None = None,
) -> dict[Format, Path]:
    """Where ``oci2disk build`` writes each output: NAME.raw, NAME.cgz, vmlinuz ..."""
    return {fmt: outdir / output_name(fmt, name, options) for fmt in formats}


def output_name(fmt: Format, name: str, options: ConvertOptions | None = None) -> str:
    options = options or ConvertOptions()
    if fmt is Format.KERNEL:
        return "vmlinuz"  # initrd.img and vmlinux go beside it
    if fmt is Format.CGZ and options.initramfs.compression is not ArchiveCompression.GZIP:
        return f"{name}.cpio{compress.suffix(options.initramfs.compression)}"
    if fmt is Format.TAR:
        return f"{name}.tar{compress.suffix(options.tar.compression)}"
    return f"{name}.{fmt.suffix}"


def _epoch(rfc3339: str) -> int:
    if not rfc3339:
        return 1
    text = re.sub(r"(\.\d+)?(Z|[+-]\d\d:\d\d)?$", "", rfc3339)
    offset = rfc3339[len(text) :].lstrip(".0123456789")
    try:
        moment = datetime.fromisoformat(text + (offset.replace("Z", "+00:00") or "+00:00"))
    except ValueError:
        return 1
    return int(moment.timestamp())
