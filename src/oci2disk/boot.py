"""Boot an artifact under QEMU and watch its serial console.

:func:`boot` starts QEMU with the disk attached read-only in effect (``snapshot=on``:
writes go to a temporary overlay, never to the artifact), a kernel and initrd given
directly (``-kernel``/``-initrd``, no bootloader needed), and the serial console on a
pipe. Every byte of the console goes to a log file; each line is matched against the
expected regex. KVM is used only where a probe shows it really runs a guest; otherwise
TCG (as on CI runners without KVM, and on nested hosts where ``/dev/kvm`` exists but
hangs). :func:`choose_accel` decides once, and what is shown is what is used.

:func:`kernel_from_disk` takes the kernel and initrd out of the image without mounting
anything: the partition table and the ext filesystem are read in Python
(:mod:`oci2disk.diskimage`), and the kernel is picked by the same finder as
``-f kernel`` (:mod:`oci2disk.rootfs.kernels`).

Host tools: qemu-system-x86_64 (qemu-system-aarch64 for arm64 guests), qemu-img.
"""

from __future__ import annotations

import codecs
import enum
import functools
import logging
import os
import re
import select
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from oci2disk import manifest, run
from oci2disk.arch import Arch
from oci2disk.compression import Compression
from oci2disk.diskimage import bootfiles, extfs, qemuimg
from oci2disk.errors import BootError, ImageError, Oci2DiskError
from oci2disk.progress import SILENT, Progress
from oci2disk.rootfs import Entry, kernels
from oci2disk.workspace import Workspace

log = logging.getLogger("oci2disk.boot")

NO_KERNEL_HINT = (
    "install a kernel in the image (Debian/Ubuntu: add linux-image-amd64 and "
    "initramfs-tools to the Dockerfile's apt-get install), or pass --kernel and --initrd"
)


class Firmware(enum.Enum):
    """How a disk with its own bootloader is started: QEMU's SeaBIOS, or UEFI (OVMF on
    x86-64, AAVMF on arm64)."""

    BIOS = "bios"
    UEFI = "uefi"


# UEFI firmware images QEMU boots with -bios, per architecture, and their Debian packages.
UEFI_FIRMWARE: dict[Arch, tuple[Path, str]] = {
    Arch.X86_64: (Path("/usr/share/ovmf/OVMF.fd"), "ovmf"),
    Arch.AARCH64: (Path("/usr/share/qemu-efi-aarch64/QEMU_EFI.fd"), "qemu-efi-aarch64"),
}


def uefi_firmware(arch: Arch) -> Path:
    found = UEFI_FIRMWARE.get(arch)
    if found is None:
        raise BootError(f"no UEFI firmware for {arch.uname} guests here")
    path, package = found
    if not path.is_file():
        raise BootError(
            f"the UEFI firmware {os.fspath(path)} is missing",
            hint=f"install {package} (Debian package {package}), or run ./setup.sh",
        )
    return path


@dataclass(frozen=True)
class BootSpec:
    """What to boot. ``append`` is the whole kernel command line (see ``kernel_cmdline``).

    Without ``kernel``, the firmware (``firmware``; SeaBIOS when None) starts the
    bootloader on the disk, and ``append`` is not used."""

    disk: Path | None
    kernel: Path | None
    initrd: Path | None
    append: str
    disk_format: str = "raw"
    memory_mb: int = 1024
    cpus: int = 2
    arch: Arch = Arch.X86_64
    extra_args: tuple[str, ...] = ()
    firmware: Firmware | None = None


@dataclass(frozen=True)
class BootResult:
    matched: bool
    log_path: Path
    seconds: float
    accel: str
    match_text: str


@dataclass(frozen=True)
class Accel:
    """How QEMU runs the guest: ``name`` is its ``-accel`` ("kvm" or "tcg"), ``reason``
    what the user is told ("KVM", "TCG (no working KVM)", "TCG (a foreign architecture)")."""

    name: str
    reason: str


def _bootable(arch: Arch) -> Arch:
    if not arch.can_boot():
        known = ", ".join(a.uname for a in Arch if a.can_boot())
        raise BootError(f"cannot boot architecture {arch.uname!r}", hint=f"use one of: {known}")
    return arch


def kernel_cmdline(root: str, extra: str = "", *, arch: Arch = Arch.X86_64) -> str:
    """The command line ``oci2disk boot`` gives a kernel: serial console, ``root=... rw``.

    ``panic=-1`` makes a panicking kernel reboot at once, and with ``-no-reboot`` QEMU
    then exits, so a broken image fails fast with the panic in the log instead of
    waiting for the timeout.
    """
    parts = [f"console={_bootable(arch).console}", f"root={root}", "rw", "panic=-1"]
    if extra:
        parts.append(extra)
    return " ".join(parts)


# A gzip-compressed kernel (Debian's arm64 vmlinuz) is read this far to find its header.
_GZIP_HEAD = 1 << 20


def kernel_arch(kernel: Path) -> Arch:
    """The architecture a kernel image is for, from its header.

    Knows x86 bzImages, arm64 and riscv64 Images (also gzip-compressed, as Debian's
    arm64 vmlinuz) and ELF vmlinux files.
    """
    with kernel.open("rb") as f:
        head = f.read(kernels.HEAD_BYTES)
        if head.startswith(Compression.GZIP.magic):
            f.seek(0)
            head = f.read(_GZIP_HEAD)
    try:
        return kernels.kernel_arch(head)
    except ImageError as exc:
        raise BootError(
            f"cannot tell which architecture the kernel {os.fspath(kernel)} is for",
            hint="oci2disk boots x86_64 bzImages and arm64 Images (plain or gzip-compressed)",
        ) from exc


# --- KVM probe ------------------------------------------------------------------------

# A 64 KiB firmware image that switches from real mode to protected mode to long mode
# and then writes 0x21 to an isa-debug-exit port, which makes QEMU exit with status
# (0x21 << 1) | 1 = 67. Opening /dev/kvm and creating a VM is not enough: on nested
# hosts KVM runs real-mode code and then hangs at the first mode switch, which is
# where every kernel goes. Assembled from (GNU as, linked at 0):
#   .code16: cli; mov $0xf000,%ax; mov %ax,%ds; lgdtl gdtr; set CR0.PE;
#            ljmpl $0x08,$(0xf0000+start32)
#   .code32: load data segments (0x10); identity-map 2 MiB with page tables at 0x1000;
#            set CR4.PAE, CR3, EFER.LME, CR0.PG; ljmp $0x18,$(0xf0000+start64)
#   .code64: mov $0x21,%al; out %al,$0xf4; 1: hlt; jmp 1b
#   gdt: null, code32 0x00cf9a000000ffff, data 0x00cf92000000ffff,
#        code64 0x00af9a000000ffff; gdtr at the end
#   reset vector (0xfff0): ljmp $0xf000,$start16
_PROBE_CODE = bytes.fromhex(
    "fab800f08ed8660f0116b0000f20c06683c8010f22c066ea1e000f00080066b810008ed88ec08ed0"
    "bf0010000031c0b9000c0000f3abc7050010000003200000c7050020000003300000c70500300000"
    "830000000f20e083c8200f22e0b8001000000f22d8b9800000c00f320d000100000f300f20c00d00"
    "0000800f22c0ea85000f001800b021e6f4f4ebfd8db400000000000000000000ffff0000009acf00"
    "ffff00000092cf00ffff0000009aaf001f0090000f00"
)
_PROBE_RESET = bytes.fromhex("ea000000f0")
_PROBE_EXIT_STATUS = 67
# A working KVM finishes the probe in well under a second, QEMU start-up included.
_PROBE_TIMEOUT = 3.0


def _probe_firmware() -> bytes:
    image = bytearray(0x10000)
    image[: len(_PROBE_CODE)] = _PROBE_CODE
    image[0xFFF0 : 0xFFF0 + len(_PROBE_RESET)] = _PROBE_RESET
    return bytes(image)


@functools.cache
def kvm_usable() -> bool:
    """True if QEMU can run an x86_64 guest with KVM here (probed once per process)."""
    host = os.uname().machine
    if Arch.lookup(host) is not Arch.X86_64:
        log.debug("kvm probe: host is %s, the probe only knows x86_64", host)
        return False
    try:
        fd = os.open("/dev/kvm", os.O_RDWR | os.O_CLOEXEC)
    except OSError as exc:
        log.debug("kvm probe: cannot open /dev/kvm: %s", exc)
        return False
    os.close(fd)
    with tempfile.TemporaryDirectory(prefix="oci2disk-kvm-probe-") as tmp:
        firmware = Path(tmp, "probe.bin")
        firmware.write_bytes(_probe_firmware())
        argv = [
            "qemu-system-x86_64", "-accel", "kvm", "-machine", "pc", "-m", "16",
            "-nodefaults", "-display", "none", "-monitor", "none", "-serial", "none",
            "-no-reboot", "-bios", os.fspath(firmware),
            "-device", "isa-debug-exit,iobase=0xf4,iosize=0x01",
        ]  # fmt: skip
        try:
            proc = run.start(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        except Oci2DiskError as exc:
            log.debug("kvm probe: %s", exc)
            return False
        try:
            _, stderr = proc.communicate(timeout=_PROBE_TIMEOUT)
        except subprocess.TimeoutExpired:
            log.info("KVM does not run guests here (probe hung); using TCG")
            return False
        finally:
            stop(proc)
    if proc.returncode == _PROBE_EXIT_STATUS:
        log.debug("kvm probe: KVM works")
        return True
    log.info(
        "KVM is not usable (probe exit code %d): %s; using TCG",
        proc.returncode,
        run.tail(stderr.decode("utf-8", "replace"), 3),
    )
    return False


def choose_accel(arch: Arch) -> Accel:
    """KVM when the guest is of the host's architecture and KVM really runs guests here;
    else TCG. Decided once per boot: the caller shows ``reason`` and passes it on."""
    if arch is not Arch.lookup(os.uname().machine):
        return Accel("tcg", "TCG (a foreign architecture)")
    if kvm_usable():
        return Accel("kvm", "KVM")
    return Accel("tcg", "TCG (no working KVM)")


# --- booting --------------------------------------------------------------------------

_ANSI = re.compile(r"\x1b(?:\[[0-9;?]*[ -/]*[@-~]|[@-Z\\-_])")
_STOP_GRACE = 5.0
_MAX_LINE = 64 * 1024
_PROMPT_QUIET = 0.2


def qemu_argv(spec: BootSpec, accel: str) -> list[str]:
    """The QEMU command line that boots ``spec`` with ``-accel accel``."""
    arch = _bootable(spec.arch)
    argv = [
        arch.qemu,
        "-machine", arch.machine,
        "-accel", accel,
        "-cpu", "host" if accel == "kvm" else arch.tcg_cpu,
        "-m", str(spec.memory_mb),
        "-smp", str(spec.cpus),
        "-nodefaults", "-display", "none", "-monitor", "none",
        "-serial", "stdio",
        "-no-reboot",
    ]  # fmt: skip
    if spec.firmware is Firmware.UEFI:
        argv += ["-bios", os.fspath(uefi_firmware(arch))]
    if spec.kernel is not None:
        argv += ["-kernel", os.fspath(spec.kernel), "-append", spec.append]
    if spec.initrd is not None and spec.kernel is not None:
        argv += ["-initrd", os.fspath(spec.initrd)]
    if spec.disk is not None:
        # Commas in a -drive value are escaped by doubling them.
        file = os.fspath(spec.disk).replace(",", ",,")
        argv += ["-drive", f"file={file},format={spec.disk_format},if=virtio,snapshot=on"]
    if not any(arg in ("-nic", "-net", "-netdev") for arg in spec.extra_args):
        argv += ["-nic", "none"]
    argv += spec.extra_args
    return argv


def boot(
    spec: BootSpec,
    *,
    expect: str,
    timeout: float,
    log_path: Path,
    on_line: Callable[[str], None] | None = None,
    accel: Accel | None = None,
) -> BootResult:
    """Boot ``spec`` and wait until a console line matches the regex ``expect``.

    ``accel`` is the decision of :func:`choose_accel` (made here when not given).

    Each line of console output (escape sequences and carriage returns removed) is
    searched, and so is an unfinished last line once output pauses, so prompts such as
    ``login:`` match.
    Returns ``matched=False`` when ``timeout`` seconds pass first. QEMU is stopped before
    this returns or raises, also on KeyboardInterrupt. Raises ``BootError`` when QEMU
    exits before the match (a bad kernel, a kernel panic, a guest that powers off).
    """
    for path, what in ((spec.kernel, "kernel"), (spec.initrd, "initrd"), (spec.disk, "disk")):
        if path is not None and not path.is_file():
            raise BootError(f"{what} {os.fspath(path)} does not exist")
    try:
        pattern = re.compile(expect)
    except re.error as exc:
        raise BootError(f"expect {expect!r} is not a valid regular expression: {exc}") from None

    if accel is None:
        accel = choose_accel(spec.arch)
    argv = qemu_argv(spec, accel.name)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    log.info("booting %s with %s (log: %s)", spec.disk or spec.kernel, accel.reason, log_path)
    started = time.monotonic()
    with log_path.open("wb") as log_file:
        proc = run.start(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        try:
            match, exited = watch_console(proc, pattern, started + timeout, log_file, on_line)
        finally:
            stop(proc)
    seconds = time.monotonic() - started
    if match is None and exited:
        raise _early_exit_error(argv, proc.returncode, log_path, expect)
    if match is None:
        log.info("no console line matched %r within %.0f s", expect, timeout)
        return BootResult(False, log_path, seconds, accel.name, "")
    log.info("console matched %r after %.1f s", match, seconds)
    return BootResult(True, log_path, seconds, accel.name, match)


def watch_console(
    proc: subprocess.Popen[bytes],
    pattern: re.Pattern[str],
    deadline: float,
    log_file: IO[bytes],
    on_line: Callable[[str], None] | None,
) -> tuple[str | None, bool]:
    """Copy console output to the log until ``pattern`` matches, EOF or the deadline.

    Returns the matched text (or None) and whether QEMU closed the console (exited).
    Whole lines are searched as they arrive; the unfinished last line only once the
    console has been quiet for a moment (a prompt waiting for input), so that a
    pattern like ``ok \\d+`` is not matched against half a line.
    """
    assert proc.stdout is not None
    fd = proc.stdout.fileno()
    # Incremental: a UTF-8 sequence split across two reads still decodes.
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    partial = ""
    partial_searched = True
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            break
        wait = remaining if partial_searched else min(remaining, _PROMPT_QUIET)
        ready, _, _ = select.select([fd], [], [], wait)
        chunk = os.read(fd, 65536) if ready else b""
        if not ready or not chunk:
            if not partial_searched:
                partial_searched = True
                found = pattern.search(_clean(partial))
                if found:
                    if on_line is not None:
                        on_line(_clean(partial))
                    return found.group(0), False
            if ready:  # end of file: QEMU exited
                if partial and on_line is not None:
                    on_line(_clean(partial))
                return None, True
            continue
        log_file.write(chunk)
        log_file.flush()
        lines = (partial + decoder.decode(chunk)).split("\n")
        partial = lines.pop()
        if len(partial) > _MAX_LINE:
            # A guest that never ends its line: cut it, so matching stays linear.
            lines.append(partial)
            partial = ""
        partial_searched = not partial
        for raw in lines:
            line = _clean(raw)
            if on_line is not None:
                on_line(line)
            found = pattern.search(line)
            if found:
                return found.group(0), False
    if partial and on_line is not None:
        on_line(_clean(partial))
    return None, False


def _clean(line: str) -> str:
    return _ANSI.sub("", line).replace("\r", "")


def stop(proc: subprocess.Popen[bytes]) -> None:
    """Stop QEMU (SIGTERM, then SIGKILL) and reap it, so no process outlives the call."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=_STOP_GRACE)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    for stream in (proc.stdout, proc.stderr, proc.stdin):
        if stream is not None:
            stream.close()


def _early_exit_error(argv: list[str], returncode: int, log_path: Path, expect: str) -> BootError:
    text = log_path.read_bytes().decode("utf-8", "replace")
    log_tail = run.tail(_clean(text)) or "(the console printed nothing)"
    hint = "see the whole console log in " + os.fspath(log_path)
    if "Kernel panic" in text and "VFS: Unable to mount root" in text:
        hint = (
            "the kernel found no root filesystem: check root= in the kernel command line "
            "and that the initrd has the virtio_blk and filesystem modules; " + hint
        )
    elif "invalid kernel header" in text or "kernel too old" in text or "could not load" in text:
        hint = "the --kernel file is not a bootable kernel image (vmlinuz); " + hint
    return BootError(
        f"QEMU exited (code {returncode}) before the console showed {expect!r}: "
        f"{run.format_argv(argv)}\n{log_tail}",
        hint=hint,
    )


# --- kernel and initrd from the image -------------------------------------------------


def kernel_from_disk(
    disk: Path, workdir: Path, version: str | None = None
) -> tuple[Path, Path | None, str]:
    """Copy the image's kernel and its initrd into ``workdir``.

    The kernel is the one ``-f kernel`` takes from the same image: ``version`` when
    given, else the newest (:func:`oci2disk.rootfs.kernels.choose`). Returns
    ``(kernel, initrd or None, root)`` where ``root`` is ``UUID=<fs uuid>`` for the
    kernel command line. The image may be raw (MBR, GPT or a bare ext filesystem) or
    any format ``qemu-img`` reads (qcow2, vmdk ...), which is first converted to a
    temporary raw file in ``workdir``. Nothing is mounted.
    """
    if not disk.is_file():
        raise BootError(f"disk image {os.fspath(disk)} does not exist")
    workdir.mkdir(parents=True, exist_ok=True)
    fmt = qemuimg.image_format(disk)
    if fmt == qemuimg.RAW:
        return _kernel_from_raw(disk, workdir, version)
    raw = workdir / "oci2disk-boot-disk.raw"
    log.info("converting %s (%s) to raw to read its /boot", disk, fmt)
    try:
        qemuimg.convert_to_raw(disk, raw)
        return _kernel_from_raw(raw, workdir, version)
    finally:
        raw.unlink(missing_ok=True)


def _kernel_from_raw(
    raw: Path, workdir: Path, version: str | None
) -> tuple[Path, Path | None, str]:
    offsets = extfs.filesystem_offsets(raw)
    if not offsets:
        raise BootError(
            f"{os.fspath(raw)} holds no ext2/3/4 filesystem (looked at the partitions and "
            "at offset 0)",
            hint="boot reads the kernel from an ext filesystem; pass --kernel and --initrd",
        )
    for offset in offsets:
        with extfs.ExtFs(raw, offset) as fs:
            if not kernels.find_kernels(fs):
                log.debug("no kernel in the filesystem at offset %d", offset)
                continue
            try:
                found = kernels.choose(fs, version)
            except ImageError as exc:
                raise BootError(exc.message, hint=exc.hint) from exc
            kernel = _copy_out(fs, found.kernel, found.version, workdir)
            initrd = None
            if found.initrd is not None:
                initrd = _copy_out(fs, found.initrd, found.version, workdir)
            root = f"UUID={fs.uuid}"
            log.info("kernel %s, initrd %s, root=%s", found.kernel.path, initrd, root)
            return kernel, initrd, root
    raise BootError(
        f"the image {os.fspath(raw)} has no kernel: no /boot/vmlinuz-* or "
        "/usr/lib/modules/*/vmlinuz in its filesystem",
        hint=NO_KERNEL_HINT,
    )


def _copy_out(fs: extfs.ExtFs, entry: Entry, version: str, workdir: Path) -> Path:
    name = entry.path.rpartition("/")[2]
    if version not in name:  # /usr/lib/modules/V/vmlinuz
        name = f"{name}-{version}"
    out = workdir / name
    tmp = workdir / f".{name}.tmp"
    with fs.open(entry.path) as source, tmp.open("wb") as target:
        shutil.copyfileobj(source, target, 1 << 20)
    tmp.replace(out)
    return out


def firmware_boot(
    disk: Path, disk_format: str, asked: str | None, workdir: Path
) -> tuple[Firmware, Arch] | None:
    """The firmware that boots ``disk`` through its own bootloader, and the guest's
    architecture; None when the disk has no bootloader and none was asked for."""
    found = bootfiles.probe(disk, workdir, disk_format).found
    uefi = found.uefi_arch
    if asked is None:
        if found.bios:
            return Firmware.BIOS, Arch.X86_64
        arch = Arch.lookup(uefi) if uefi is not None else None
        return None if arch is None else (Firmware.UEFI, arch)
    if asked == Firmware.BIOS.value:
        if not found.bios:
            raise BootError(
                f"{os.fspath(disk)} has no bootloader for BIOS (no GRUB boot.img in its MBR)",
                hint="boot it with --firmware uefi, or with --firmware none (-kernel); "
                "convert with --firmware bios to give it one",
            )
        return Firmware.BIOS, Arch.X86_64
    if uefi is None:
        raise BootError(
            f"{os.fspath(disk)} has no bootloader for UEFI (no EFI system partition with "
            "/EFI/BOOT/BOOTX64.EFI or BOOTAA64.EFI)",
            hint="boot it with --firmware bios, or with --firmware none (-kernel); "
            "convert with --firmware uefi to give it one",
        )
    arch = Arch.lookup(uefi)
    assert arch is not None
    return Firmware.UEFI, arch


def filesystem_uuid(disk: Path, workdir: Path) -> str:
    """The UUID of the disk's root filesystem: from its manifest, else read from it."""
    known = manifest.find_for_artifact(disk)
    if known is not None and known.filesystem_uuid:
        return known.filesystem_uuid
    raw = disk
    if qemuimg.image_format(disk) != qemuimg.RAW:
        raw = workdir / "disk.raw"
        qemuimg.convert_to_raw(disk, raw)
    with extfs.open_filesystem(raw) as fs:
        return fs.uuid


# --- the boot command -----------------------------------------------------------------


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
    firmware: str | None = None,
) -> BootResult:
    """``oci2disk boot``: boot the disk under QEMU, and KVM when it works.

    A disk with its own bootloader is started by the firmware (``firmware`` "bios" or
    "uefi"; by default SeaBIOS when it has GRUB for BIOS, else UEFI). Otherwise, with
    ``kernel``, or ``firmware`` "none": with the kernel from its own /boot (or
    ``kernel``) given to QEMU, for the architecture the kernel is for."""
    if not artifact.is_file():
        raise BootError(f"{artifact}: no such disk image")
    log_path = log_path or artifact.with_name(artifact.name + ".boot.log")
    with Workspace() as ws:
        disk_format = qemuimg.image_format(artifact)
        through = None
        if firmware in ("bios", "uefi") and (kernel is not None or append):
            raise BootError(
                f"--firmware {firmware} starts the disk's own bootloader, which takes the "
                "kernel and its command line from the disk's grub.cfg: --kernel, --initrd "
                "and --append cannot apply",
                hint="leave out --firmware (or give --firmware none) to boot with -kernel",
            )
        # --append only reaches a kernel QEMU starts itself: it keeps the -kernel path.
        if kernel is None and firmware != "none" and not (append and firmware is None):
            through = firmware_boot(artifact, disk_format, firmware, ws.path)
        if through is not None:
            chosen, arch = through
            spec = BootSpec(
                disk=artifact,
                kernel=None,
                initrd=None,
                append="",
                disk_format=disk_format,
                memory_mb=memory_mb,
                arch=arch,
                firmware=chosen,
            )
            accel = choose_accel(arch)
            shown = "SeaBIOS" if chosen is Firmware.BIOS else "UEFI"
            with progress.step(
                f"booting through {shown} and the disk's bootloader under QEMU, "
                f"{accel.reason}; waiting for {expect!r}"
            ):
                return boot(
                    spec,
                    expect=expect,
                    timeout=timeout,
                    log_path=log_path,
                    on_line=echo or (lambda line: progress.update(line[:100])),
                    accel=accel,
                )
        if kernel is None:
            with progress.step("copying the kernel and initrd out of the image"):
                kernel, found_initrd, root = kernel_from_disk(artifact, ws.path)
            initrd = initrd or found_initrd
        else:
            root = f"UUID={filesystem_uuid(artifact, ws.path)}"
        arch = kernel_arch(kernel)  # an arm64 image boots under qemu-system-aarch64
        spec = BootSpec(
            disk=artifact,
            kernel=kernel,
            initrd=initrd,
            append=kernel_cmdline(root, append, arch=arch),
            disk_format=disk_format,
            memory_mb=memory_mb,
            arch=arch,
        )
        accel = choose_accel(arch)
        with progress.step(f"booting under QEMU, {accel.reason}; waiting for {expect!r}"):
            return boot(
                spec,
                expect=expect,
                timeout=timeout,
                log_path=log_path,
                on_line=echo or (lambda line: progress.update(line[:100])),
                accel=accel,
            )
