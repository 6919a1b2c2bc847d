"""The ``squashfs`` output: the rootfs as a read-only compressed squashfs image.

``tar2sqfs`` (squashfs-tools-ng) reads the canonical rootfs tar on its stdin, so the
image is made rootless with exact owners, modes, device numbers, hard links and xattrs.
It keeps the stream's mtimes (clamped to ``SOURCE_DATE_EPOCH``), sets the superblock
time from ``--defaults mtime=``, and orders its output whatever the number of jobs, so
the same rootfs and options give the same bytes. The kernel mounts it as a root
(``root=/dev/vda rootfstype=squashfs``) or as the lower layer of a live system.

Host tools: tar2sqfs (squashfs-tools-ng).
"""

from __future__ import annotations

import contextlib
import logging
import os
import subprocess
import threading
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO, cast

from oci2disk import run
from oci2disk.convert.options import SquashfsSpec
from oci2disk.convert.plugin import OutputFormat, Tool, named

if TYPE_CHECKING:
    from oci2disk.convert.job import Job

log = logging.getLogger("oci2disk.convert.squashfs")

run.DEBIAN_PACKAGES.setdefault("tar2sqfs", "squashfs-tools-ng")
run.DEBIAN_PACKAGES.setdefault("sqfs2tar", "squashfs-tools-ng")

TarWriter = Callable[[BinaryIO], object]


def tar2sqfs_argv(
    out: Path, spec: SquashfsSpec, *, source_date_epoch: int | None, jobs: int | None
) -> list[str]:
    mtime = source_date_epoch if source_date_epoch is not None else 0
    argv = [
        "tar2sqfs",
        "--quiet",
        "--force",
        "--no-skip",  # an entry it cannot store is an error, never a silent loss
        "--compressor",
        spec.compressor.value,
        "--block-size",
        str(spec.block_size),
        "--defaults",
        f"uid=0,gid=0,mode=0755,mtime={mtime}",
        "--num-jobs",
        str(jobs or os.cpu_count() or 1),
    ]
    if not spec.xattrs:
        argv.append("--no-xattr")
    return [*argv, os.fspath(out)]


def write_squashfs(
    write_tar: TarWriter,
    out: Path,
    spec: SquashfsSpec | None = None,
    *,
    source_date_epoch: int | None = None,
    jobs: int | None = None,
) -> None:
    """Write the squashfs image of the rootfs ``write_tar`` streams into ``out``.

    ``write_tar`` writes the canonical rootfs tar to the stream it is given, e.g.
    ``lambda sink: rootfs.write_tar(sink, extra=extra)``. ``out`` appears only when
    complete (a temporary name beside it is renamed).
    """
    spec = spec or SquashfsSpec()
    tmp = out.with_name(f".{out.name}.part")
    argv = tar2sqfs_argv(tmp, spec, source_date_epoch=source_date_epoch, jobs=jobs)
    proc = run.start(argv, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL)
    stdin, stderr = proc.stdin, proc.stderr
    assert stdin is not None and stderr is not None
    errors: list[bytes] = []

    def drain() -> None:
        errors.append(stderr.read())

    reader = threading.Thread(target=drain, daemon=True)
    reader.start()
    try:
        try:
            write_tar(cast(BinaryIO, stdin))
        except BrokenPipeError:
            pass  # tar2sqfs stopped early: its exit code and stderr say why
        finally:
            with contextlib.suppress(BrokenPipeError):
                stdin.close()
        code = proc.wait()
        reader.join()
        if code != 0:
            raise run.command_error(
                [str(a) for a in proc.args] if isinstance(proc.args, list) else argv,
                code,
                b"".join(errors),
                what="tar2sqfs could not make the squashfs image",
            )
        os.replace(tmp, out)
    except BaseException:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        tmp.unlink(missing_ok=True)
        raise


# ------------------------------------------------------------------ the squashfs format


def write(job: Job, out: Path) -> None:
    spec = job.options.squashfs
    with job.progress.step(f"writing the squashfs image ({spec.compressor.value})"):
        write_squashfs(
            lambda sink: job.rootfs.write_tar(
                job.stream(sink, "squashfs"), extra=job.extra_for(disk_output=False)
            ),
            out,
            spec,
            source_date_epoch=job.options.source_date_epoch,
            jobs=job.options.jobs,
        )


SQUASHFS = OutputFormat(
    name="squashfs",
    summary="the rootfs as a squashfs image (--squashfs-compressor, --squashfs-block-size)",
    write=write,
    output_name=named("squashfs"),
    tools=(Tool("tar2sqfs", "squashfs-tools-ng"),),
)
