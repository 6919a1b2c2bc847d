"""The ``iso`` output: a bootable hybrid ISO that runs the image all in memory.

The image's kernel boots with the whole rootfs as its initramfs (the ``cgz`` output's
newc cpio), from a CD or a USB stick, on BIOS and UEFI machines: GRUB for i386-pc
(El Torito, and an MBR for USB sticks) and x86_64-efi (an EFI system partition image),
as ``grub-mkrescue`` lays them out. All of it runs rootless: grub-mkrescue builds the
EFI image with mtools and the ISO with xorriso. With ``SOURCE_DATE_EPOCH`` xorriso
stamps every date and the volume UUID from it.

Host tools: grub-mkrescue (grub-common), GRUB modules (grub-pc-bin,
grub-efi-amd64-bin), xorriso (xorriso), mformat and mcopy (mtools).
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING

from oci2disk import run
from oci2disk.arch import Arch
from oci2disk.convert.cpio import write_cgz
from oci2disk.convert.options import InitramfsSpec, IsoSpec
from oci2disk.convert.plugin import OutputFormat, Tool, named
from oci2disk.errors import ConvertError
from oci2disk.rootfs import kernels
from oci2disk.rootfs.model import Tree

if TYPE_CHECKING:
    from oci2disk.convert.job import Job

log = logging.getLogger("oci2disk.convert.iso")

for _tool, _package in (
    ("grub-mkrescue", "grub-common"),
    ("xorriso", "xorriso"),
    ("mformat", "mtools"),
):
    run.DEBIAN_PACKAGES.setdefault(_tool, _package)

GRUB_LIB = Path("/usr/lib/grub")
# GRUB platforms a hybrid x86-64 ISO carries, with the Debian package of each.
GRUB_PLATFORMS = {"i386-pc": "grub-pc-bin", "x86_64-efi": "grub-efi-amd64-bin"}
ISO_BLOCK = 2048
SECTOR = 512


def grub_cfg(spec: IsoSpec, title: str) -> str:
    """GRUB's menu on the serial console and the screen; one entry: the image in RAM."""
    serial_unit = spec.console.removeprefix("ttyS").partition(",")[0]
    speed = spec.console.partition(",")[2] or "115200"
    args = " ".join(a for a in ("console=tty0", f"console={spec.console}", spec.append) if a)
    return (
        f"serial --unit={serial_unit} --speed={speed}\n"
        "terminal_input console serial\n"
        "terminal_output console serial\n"
        f"set timeout={spec.timeout}\n"
        "set default=0\n"
        f'menuentry "{title} (in memory)" {{\n'
        f"    linux /boot/vmlinuz {args}\n"
        "    initrd /boot/initrd.img\n"
        "}\n"
    )


def check_grub() -> None:
    """Every GRUB platform the hybrid ISO needs is installed (else: which package)."""
    run.which("grub-mkrescue")
    run.which("xorriso")
    run.which("mformat")
    for platform, package in GRUB_PLATFORMS.items():
        if not (GRUB_LIB / platform / "modinfo.sh").exists():
            raise ConvertError(
                f"GRUB for {platform} is not installed ({GRUB_LIB / platform} is missing)",
                hint=f"install {package} (the modules only; it does not touch the host's boot)",
            )


def write_iso(
    kernel: Path,
    initrd: Path,
    out: Path,
    spec: IsoSpec | None = None,
    *,
    title: str = "oci2disk",
    source_date_epoch: int | None = None,
    workdir: Path | None = None,
) -> None:
    """Write the hybrid ISO booting ``kernel`` with ``initrd`` to ``out`` (atomically)."""
    spec = spec or IsoSpec()
    check_grub()
    staging = Path(tempfile.mkdtemp(prefix="iso-", dir=workdir))
    tmp = out.with_name(f".{out.name}.part")
    try:
        boot = staging / "boot"
        (boot / "grub").mkdir(parents=True)
        # Hard links when on one filesystem: the kernel and initrd are not copied.
        _link_or_copy(kernel, boot / "vmlinuz")
        _link_or_copy(initrd, boot / "initrd.img")
        (boot / "grub" / "grub.cfg").write_text(grub_cfg(spec, title))
        env = {"LC_ALL": "C", "MTOOLS_SKIP_CHECK": "1"}
        if source_date_epoch is not None:
            env["SOURCE_DATE_EPOCH"] = str(source_date_epoch)
        argv = [
            "grub-mkrescue",
            "--output",
            os.fspath(tmp),
            # Just what the menu needs: smaller core images, fewer moving parts.
            "--install-modules=linux normal serial terminal iso9660 part_msdos part_gpt "
            "all_video gzio configfile echo test search",
            "--locales=",
            "--fonts=",
            "--themes=",
            os.fspath(staging),
            "--",
            "-volid",
            spec.volume_id,
            *_date_options(source_date_epoch),
        ]
        run.run(argv, env=env, what="grub-mkrescue could not make the ISO")
        if source_date_epoch is not None:
            pin_efi_serial(tmp, source_date_epoch)
        os.replace(tmp, out)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _date_options(source_date_epoch: int | None) -> list[str]:
    """xorriso's mkisofs options that pin every date to ``SOURCE_DATE_EPOCH``.

    The staged GRUB files are new on each run: without these their dates (and the
    volume's) would differ between two runs of the same image.
    """
    if source_date_epoch is None:
        return []
    stamp = time.strftime("%Y%m%d%H%M%S00", time.gmtime(source_date_epoch))
    at = f"={source_date_epoch}"
    return [
        *("-volume_date", "c", at, "-volume_date", "m", at, "-volume_date", "f", at),
        *("-volume_date", "uuid", stamp, "-volume_date", "all_file_dates", at),
        *("-boot_image", "any", "gpt_disk_guid=volume_date_uuid"),
    ]


def pin_efi_serial(iso: Path, serial: int) -> None:
    """Set the volume serial of the ISO's EFI image (mformat draws a random one).

    The rest of the ISO is pinned by xorriso; this is the one byte range that changes
    between two runs. The EFI image is the UEFI El Torito entry; ISO 9660 has no
    checksum over file data, so the four bytes are patched in place.
    """
    report = run.run(
        ["xorriso", "-indev", os.fspath(iso), "-report_el_torito", "plain"],
        what="xorriso could not read the ISO's boot catalog",
    ).stdout.decode("utf-8", "replace")
    for line in report.splitlines():
        fields = line.split()
        if line.startswith("El Torito boot img") and "UEFI" in fields:
            lba = int(fields[-1])
            break
    else:
        raise ConvertError(f"{iso}: grub-mkrescue wrote no UEFI boot image")
    with iso.open("r+b") as handle:
        handle.seek(lba * ISO_BLOCK)
        boot = handle.read(SECTOR)
        if boot[0x52:0x57] == b"FAT32":
            offset = 0x43
        elif boot[0x36:0x39] == b"FAT":
            offset = 0x27
        else:
            raise ConvertError(f"{iso}: the UEFI boot image is not a FAT filesystem")
        handle.seek(lba * ISO_BLOCK + offset)
        handle.write((serial & 0xFFFFFFFF).to_bytes(4, "little"))


def _link_or_copy(source: Path, dest: Path) -> None:
    try:
        os.link(source, dest)
    except OSError:
        shutil.copyfile(source, dest)


def write_iso_from_rootfs(
    rootfs: Tree,
    out: Path,
    spec: IsoSpec | None = None,
    *,
    initramfs: InitramfsSpec | None = None,
    kernel_version: str | None = None,
    workdir: Path,
    mtime: int = 0,
    source_date_epoch: int | None = None,
) -> kernels.KernelFiles:
    """The image's newest kernel (or ``kernel_version``) booting the image as a cgz.

    ``initramfs`` is the cgz output's spec (``init``, compression). The kernel must be
    an x86-64 one: the ISO carries GRUB for PC BIOS and x86-64 UEFI only.
    """
    chosen = kernels.choose(rootfs, kernel_version)
    workdir.mkdir(parents=True, exist_ok=True)
    kernel_path = workdir / "vmlinuz"
    with rootfs.open(chosen.kernel.path) as source, kernel_path.open("wb") as dest:
        shutil.copyfileobj(source, dest, 1 << 20)
    with kernel_path.open("rb") as head:
        arch = kernels.kernel_arch(head.read(kernels.HEAD_BYTES))
    if arch is not Arch.X86_64:
        raise ConvertError(
            f"the image's kernel {chosen.version} is for {arch.oci}; the iso output boots "
            "x86-64 kernels only (GRUB for PC BIOS and x86-64 UEFI)",
            hint="use the kernel and cgz outputs and your platform's boot loader",
        )
    initrd = workdir / "initrd.img"
    write_cgz(rootfs, initrd, initramfs or InitramfsSpec(), mtime=mtime)
    write_iso(
        kernel_path,
        initrd,
        out,
        spec,
        title=f"Linux {chosen.version}",
        source_date_epoch=source_date_epoch,
        workdir=workdir,
    )
    kernel_path.unlink()
    initrd.unlink()
    return chosen


# ------------------------------------------------------------------ the iso format


def write(job: Job, out: Path) -> None:
    with job.progress.step("writing the bootable ISO (the kernel, the rootfs as initramfs)"):
        write_iso_from_rootfs(
            job.rootfs,
            out,
            job.options.iso,
            initramfs=job.options.initramfs,
            kernel_version=job.options.kernel.version,
            workdir=job.workspace.subdir("iso"),
            mtime=job.timestamp,
            source_date_epoch=job.options.source_date_epoch,
        )


ISO = OutputFormat(
    name="iso",
    summary="a hybrid BIOS+UEFI ISO booting the image all in memory (--iso-append)",
    write=write,
    output_name=named("iso"),
    tools=(
        Tool("grub-mkrescue", "grub-common"),
        Tool("xorriso", "xorriso"),
        Tool("mformat", "mtools"),
    ),
    preflight=check_grub,
)
