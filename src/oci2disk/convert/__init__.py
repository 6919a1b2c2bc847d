"""The conversion stage: one flattened rootfs in, every requested artifact out.

Each output format is a converter in ``REGISTRY``; a new format is one module and one
registry line. Disk formats share a single raw disk, built once.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from datetime import datetime
from pathlib import Path
from typing import Protocol

from oci2disk import run
from oci2disk.convert import disk, qemu
from oci2disk.errors import ConvertError
from oci2disk.flatten import ExtraFile, FlatRootfs
from oci2disk.oci.layout import OciImage
from oci2disk.progress import SILENT, Progress
from oci2disk.recipe import DISK_FORMATS, Compression, DiskSpec, Format, Table
from oci2disk.workspace import AtomicOutput, Workspace


@dataclass(frozen=True)
class Artifact:
    path: Path
    format: Format
    size: int
    sha256: str


@dataclass(frozen=True)
class ConvertOptions:
    disk: DiskSpec = field(default_factory=DiskSpec)
    compression: Compression = Compression.NONE
    source_date_epoch: int | None = None


@dataclass(frozen=True)
class ConvertResult:
    artifacts: tuple[Artifact, ...]
    fs: disk.FsIdentity | None
    layout: disk.DiskLayout | None
    generated: tuple[str, ...]


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
        self.raw_target: Path | None = None  # where the raw disk goes when it is an output

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
                wrap=lambda sink: self.progress.counting(sink, "rootfs stream"),
            )
            disk.apply_extra_xattrs(self.rootfs, path, layout, self.workspace.subdir("xattrs"))
        return layout

    def raw_disk(self) -> Path:
        """The raw disk, built once; into its output file when raw is requested."""
        if self._raw is None:
            path = self.raw_target or self.workspace.path / "disk.raw"
            path.touch()
            self.layout = self.build_fs(path, self.options.disk)
            self._raw = path
        return self._raw


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
    with job.progress.step("writing the rootfs tar"), out.open("wb") as f:
        job.rootfs.write_tar(job.progress.counting(f, "rootfs tar"), extra=job.extra)


REGISTRY: dict[Format, Converter] = {
    Format.RAW: write_raw,
    Format.FS: write_fs,
    Format.QCOW2: qemu_converter(Format.QCOW2),
    Format.VMDK: qemu_converter(Format.VMDK),
    Format.VHDX: qemu_converter(Format.VHDX),
    Format.VPC: qemu_converter(Format.VPC),
    Format.VDI: qemu_converter(Format.VDI),
    Format.TAR: write_tar,
}


_DISK_TOOLS = ("mke2fs", "debugfs", "sfdisk")
# Host programs each format needs, checked before any work starts.
REQUIRES: dict[Format, tuple[str, ...]] = {
    Format.RAW: _DISK_TOOLS,
    Format.FS: ("mke2fs", "debugfs"),
    Format.TAR: (),
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
    pending = {fmt: AtomicOutput(path) for fmt, path in outputs.items()}
    job = Job(image, rootfs, options, workspace, progress)
    try:
        if Format.RAW in pending:
            job.raw_target = pending[Format.RAW].tmp
        # raw first, so the other disk formats convert from the finished raw file
        order = sorted(pending, key=lambda f: (f is not Format.RAW, f not in DISK_FORMATS))
        for fmt in order:
            REGISTRY[fmt](job, pending[fmt].tmp)
        artifacts = []
        for fmt in order:
            path = pending[fmt].commit()
            artifacts.append(Artifact(path, fmt, path.stat().st_size, sha256_file(path)))
    finally:
        for output in pending.values():
            output.discard()
    return ConvertResult(
        artifacts=tuple(artifacts),
        fs=job.identity if job.layout is not None else None,
        layout=job.layout,
        generated=tuple(e.path for e in job.extra) if job.layout or Format.TAR in outputs else (),
    )


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


def default_outputs(directory: Path, name: str, formats: tuple[Format, ...]) -> dict[Format, Path]:
    return {fmt: directory / f"{name}.{fmt.suffix}" for fmt in formats}


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
