"""The state the converters of one run share: the rootfs, the options, the one raw disk.

Host tools: those of :mod:`oci2disk.convert.disk`, for the raw disk.
"""

from __future__ import annotations

import contextvars
import logging
import re
import threading
import time
from collections.abc import Callable, Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO, cast

from oci2disk.arch import Arch
from oci2disk.bytestreams import HashingWriter
from oci2disk.convert import bootable, disk
from oci2disk.convert.options import ConvertOptions, DiskSpec, Table
from oci2disk.oci.layout import OciImage
from oci2disk.progress import Progress
from oci2disk.rootfs import ExtraFile
from oci2disk.rootfs.flat import FlatRootfs
from oci2disk.rootfs.identity import IdentityEdits, identity_edits
from oci2disk.rootfs.noise import build_noise
from oci2disk.workspace import AtomicOutput, Workspace

if TYPE_CHECKING:
    from oci2disk.convert.plugin import OutputFormat

log = logging.getLogger("oci2disk.convert")


class Stopped(Exception):
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
        # The tar output is the image as it is; the others are machines' disks, which
        # must not share the image's machine-id, SSH host keys and random seed.
        self.plain_rootfs = rootfs
        self.identity_edits = IdentityEdits() if options.keep_identity else identity_edits(rootfs)
        # A reproducible build asked for: the logs and caches that record the build's
        # clock are neutralised too.
        self.noise_edits = (
            build_noise(rootfs) if options.source_date_epoch is not None else IdentityEdits()
        )
        edits = self.identity_edits + self.noise_edits
        if edits:
            rootfs = rootfs.edited(files=edits.files, dirs=edits.dirs, remove=edits.remove)
        self.rootfs = rootfs
        self.options = options
        self.workspace = workspace
        self.progress = progress
        spec = options.disk
        # What every derived id (UUIDs, the ESP's serial, qemu-img's ids) comes from.
        self.seed = uuid_source(image, self.plain_rootfs, options)
        self.identity = disk.FsIdentity(
            uuid=spec.uuid or disk.derive_uuid(self.seed, spec.fs.value, spec.label),
            label=spec.label,
            fs=spec.fs,
        )
        # The files oci2disk writes into disks (/etc/fstab), and into the other outputs
        # only when asked (fstab_all_outputs): their fstab names a filesystem that a tar,
        # cgz or directory does not have.
        self.generated: list[ExtraFile] = disk.generated_files(rootfs, self.identity, spec.fstab)
        # Decided before any output exists, so that a firmware the image cannot boot
        # with fails with nothing written.
        self.arch = Arch.lookup(image.config.architecture)
        self.boot = bootable.plan(rootfs, self.arch, spec, options.boot)
        self.installed: bootable.Installed | None = None
        self._plain = self.generated  # for a bare filesystem: no ESP, no bootloader
        if self.boot is not None:
            table = bootable.table_for(self.boot, spec)
            esp = bootable.fstab_line(self.seed) if self.boot.uefi else ""
            self.generated = [
                *disk.generated_files(rootfs, self.identity, spec.fstab, esp),
                *bootable.rootfs_files(self.boot, self.identity.uuid, table, spec.fstab),
                *bootable.guest_grub_files(self.boot, rootfs),
            ]
        self.layout: disk.DiskLayout | None = None
        self._raw: Path | None = None
        self._raw_lock = threading.Lock()
        self._raw_failed = False
        self.raw_target: Path | None = None  # where the raw disk goes when it is an output
        self.targets: dict[OutputFormat, Path] = {}  # each output's final path
        self.stop = threading.Event()  # set when a converter fails: the others give up
        self._lock = threading.Lock()
        self.siblings: dict[OutputFormat, list[AtomicOutput]] = {}  # more files of one output
        self.added: list[str] = []  # paths a converter added to its output (cgz: init)
        self.warnings: list[str] = []
        self.digests: dict[Path, str] = {}  # sha256 of each temp output (a dir's: its tree)
        self.written: Callable[[Path], None] | None = None  # told of each finished file

    def extra_for(self, disk_output: bool) -> list[ExtraFile]:
        """The generated files an output carries: all of them in a disk, else when asked."""
        if disk_output or self.options.disk.fstab_all_outputs:
            return self.generated
        return []

    def dirs_for(self, disk_output: bool) -> list[str]:
        """The directories a disk with bootloaders gets: grub.cfg's, and the ESP's mount
        point (the image may have them already)."""
        if self.boot is None or not disk_output:
            return []
        return [bootable.GRUB_DIR, *([bootable.ESP_MOUNT] if self.boot.uefi else [])]

    @property
    def timestamp(self) -> int:
        """Filesystem creation time: SOURCE_DATE_EPOCH, else when the image was created."""
        if self.options.source_date_epoch is not None:
            return max(self.options.source_date_epoch, 1)
        return max(_epoch(self.image.config.created), 1)  # 0 means "now" to e2fsprogs

    def build_fs(self, path: Path, spec: DiskSpec) -> disk.DiskLayout:
        layout = disk.plan_layout(self.rootfs.stats, spec, self.boot)
        with path.open("r+b") as f:
            f.truncate(layout.disk_bytes)
        if layout.table is not Table.NONE:
            disk.write_partition_table(path, layout, self.identity, self.arch)
        root, extra = self.rootfs, self._plain
        if layout.boot is not None:
            extra = self.generated
            root = root.edited(dirs=self.dirs_for(disk_output=True))
        label = f"mke2fs -d ({self.identity.fs.value}, {disk.human(layout.fs_bytes)})"
        # GRUB goes into parts of the file mke2fs never writes (sector 0, the BIOS boot
        # partition, the ESP) and reads the flattened tree, not the new filesystem: it
        # is installed while mke2fs runs, on the other core.
        with ThreadPoolExecutor(1, thread_name_prefix="grub") as pool:
            grub: Future[bootable.Installed] | None = None
            if layout.boot is not None and self.boot is not None:
                grub = pool.submit(contextvars.copy_context().run, self._grub, path, layout)
            with self.progress.step(f"writing {label} into {path.name}"):
                disk.write_filesystem(
                    root,
                    path,
                    layout,
                    self.identity,
                    extra=extra,
                    timestamp=self.timestamp,
                    wrap=lambda sink: self.stream(sink, "rootfs stream"),
                )
                disk.apply_extra_xattrs(self.rootfs, path, layout, self.workspace.subdir("xattrs"))
            if grub is not None:
                self.installed = grub.result()
        return layout

    def _grub(self, path: Path, layout: disk.DiskLayout) -> bootable.Installed:
        assert self.boot is not None
        start = time.monotonic()
        installed = disk.install_bootloaders(
            self.boot,
            self.rootfs,
            path,
            layout,
            self.identity,
            seed=self.seed,
            epoch=self.timestamp,
            workdir=self.workspace.subdir("bootloader"),
        )
        self.progress.message(
            f"    GRUB for {self.boot.names()} installed into {path.name} beside mke2fs "
            f"in {time.monotonic() - start:.1f} s"
        )
        return installed
        return layout

    def raw_disk(self) -> Path:
        """The raw disk, built once; into its output file when raw is requested."""
        with self._raw_lock:  # the first converter to ask builds it; the others wait
            if self._raw_failed:
                raise Stopped()
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
            raise Stopped()

    def stream(self, sink: BinaryIO, label: str) -> BinaryIO:
        """``sink`` reporting progress, and stopping when another converter failed."""
        return self.progress.counting(cast(BinaryIO, _Guarded(sink, self)), label)

    def sibling(self, fmt: OutputFormat, target: Path) -> Path:
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
        """Record what an output could not keep; the command line shows it once."""
        log.debug("warning: %s", text)
        with self._lock:
            self.warnings.append(text)


def uuid_source(image: OciImage, rootfs: FlatRootfs, options: ConvertOptions) -> str:
    """What the filesystem's UUID (and the partitions', the hash seed) derive from.

    The image config's digest (the image ID: its layers' diff_ids and config), which
    every transport keeps while manifests differ with how layers were compressed, so
    ``docker save`` and ``skopeo copy`` of one image give one disk. With SOURCE_DATE_EPOCH
    set, the digest of the rootfs's canonical stream instead (file times clamped to it):
    two from-scratch builds of one Dockerfile hold the same files but have different
    image IDs (their layers record when each file was written), and a reproducible build
    must give them the same disk.
    """
    if options.source_date_epoch is None:
        return image.config_descriptor.digest
    sink = HashingWriter(_Null())
    rootfs.write_tar(cast(BinaryIO, sink))
    return "rootfs:" + sink.sha.hexdigest()


class _Null:
    def write(self, data: bytes) -> int:
        return len(data)

    def flush(self) -> None:
        pass


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
