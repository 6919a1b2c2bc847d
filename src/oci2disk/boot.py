"""Boot an artifact under QEMU and watch its serial console.

``boot()`` starts QEMU with the disk attached read-only in effect (``snapshot=on``:
writes go to a temporary overlay, never to the artifact), a kernel and initrd given
directly (``-kernel``/``-initrd``, no bootloader needed), and the serial console on a
pipe. Every byte of the console goes to a log file; each line is matched against the
expected regex. KVM is used only where a probe shows it really runs a guest; otherwise
TCG (as on CI runners without KVM, and on nested hosts where ``/dev/kvm`` exists but
hangs).

``kernel_from_disk()`` takes the kernel and initrd out of the image's ``/boot`` without
mounting anything: it reads the partition table itself and uses ``debugfs`` on the file.

Host tools: qemu-system-x86_64 (qemu-system-aarch64 for arm64 guests), qemu-img, debugfs.
"""

from __future__ import annotations

import codecs
import functools
import logging
import os
import platform
import re
import select
import struct
import subprocess
import tempfile
import time
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from oci2disk import run
from oci2disk.convert import qemu
from oci2disk.errors import BootError, Oci2DiskError

log = logging.getLogger("oci2disk.boot")

NO_KERNEL_HINT = (
    "install a kernel in the image (Debian/Ubuntu: add linux-image-amd64 and "
    "initramfs-tools to the Dockerfile's apt-get install), or pass --kernel and --initrd"
)


@dataclass(frozen=True)
class BootSpec:
    """What to boot. ``append`` is the whole kernel command line (see ``kernel_cmdline``)."""

    disk: Path | None
    kernel: Path
    initrd: Path | None
    append: str
    disk_format: str = "raw"
    memory_mb: int = 1024
    cpus: int = 2
    arch: str = "x86_64"
    extra_args: tuple[str, ...] = ()


@dataclass(frozen=True)
class BootResult:
    matched: bool
    log_path: Path
    seconds: float
    accel: str
    match_text: str


@dataclass(frozen=True)
class _Arch:
    qemu: str
    machine: str
    console: str
    kvm_host: str  # platform.machine() on which KVM can run this guest
    # -cpu under TCG. For aarch64, "max" with QEMU's own pointer-authentication
    # algorithm instead of QARMA, which TCG emulates several times slower.
    tcg_cpu: str = "max"


_ARCHES: dict[str, _Arch] = {
    "x86_64": _Arch("qemu-system-x86_64", "pc", "ttyS0", "x86_64"),
    "aarch64": _Arch(
        "qemu-system-aarch64", "virt", "ttyAMA0", "aarch64", tcg_cpu="max,pauth-impdef=on"
    ),
}
# Names a platform or `uname -m` may give an architecture, to the names above.
ARCH_ALIASES = {"amd64": "x86_64", "x86_64": "x86_64", "arm64": "aarch64", "aarch64": "aarch64"}


def _arch(name: str) -> _Arch:
    try:
        return _ARCHES[name]
    except KeyError:
        known = ", ".join(sorted(_ARCHES))
        raise BootError(f"cannot boot architecture {name!r}", hint=f"use one of: {known}") from None


def kernel_cmdline(root: str, extra: str = "", *, arch: str = "x86_64") -> str:
    """The command line ``oci2disk boot`` gives a kernel: serial console, ``root=... rw``.

    ``panic=-1`` makes a panicking kernel reboot at once, and with ``-no-reboot`` QEMU
    then exits, so a broken image fails fast with the panic in the log instead of
    waiting for the timeout.
    """
    parts = [f"console={_arch(arch).console}", f"root={root}", "rw", "panic=-1"]
    if extra:
        parts.append(extra)
    return " ".join(parts)


# Where each kernel image format says what it is (Linux boot protocols).
_ELF_MACHINES = {0x3E: "x86_64", 0xB7: "aarch64"}
_X86_BZIMAGE_MAGIC = (0x202, b"HdrS")
_ARM64_IMAGE_MAGIC = (0x38, b"ARM\x64")
_HEAD = 4096


def kernel_arch(kernel: Path) -> str:
    """The architecture a kernel image is for ("x86_64", "aarch64"), from its header.

    Knows x86 bzImages, arm64 Images (also gzip-compressed, as Debian's arm64 vmlinuz)
    and ELF vmlinux files.
    """
    with kernel.open("rb") as f:
        head = f.read(_HEAD)
        if head.startswith(b"\x1f\x8b"):
            f.seek(0)
            head = _gunzip_head(f.read(1 << 20))
    if head.startswith(b"\x7fELF") and len(head) >= 20:
        machine = struct.unpack_from("<H", head, 18)[0]
        if machine in _ELF_MACHINES:
            return _ELF_MACHINES[machine]
    for (offset, magic), arch in ((_X86_BZIMAGE_MAGIC, "x86_64"), (_ARM64_IMAGE_MAGIC, "aarch64")):
        if head[offset : offset + len(magic)] == magic:
            return arch
    raise BootError(
        f"cannot tell which architecture the kernel {os.fspath(kernel)} is for",
        hint="oci2disk boots x86_64 bzImages and arm64 Images (plain or gzip-compressed)",
    )


def _gunzip_head(data: bytes) -> bytes:
    try:
        return zlib.decompressobj(wbits=31).decompress(data, _HEAD)
    except zlib.error:
        return b""


def arch_name(name: str) -> str:
    """``amd64``/``arm64`` (platforms) or ``x86_64``/``aarch64`` to a bootable arch name."""
    return ARCH_ALIASES.get(name, name)


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
    if platform.machine() != "x86_64":
        log.debug("kvm probe: host is %s, the probe only knows x86_64", platform.machine())
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
            _stop(proc)
    if proc.returncode == _PROBE_EXIT_STATUS:
        log.debug("kvm probe: KVM works")
        return True
    log.info(
        "KVM is not usable (probe exit code %d): %s; using TCG",
        proc.returncode,
        run.tail(stderr.decode("utf-8", "replace"), 3),
    )
    return False


# --- booting --------------------------------------------------------------------------

_ANSI = re.compile(r"\x1b(?:\[[0-9;?]*[ -/]*[@-~]|[@-Z\\-_])")
_STOP_GRACE = 5.0
_MAX_LINE = 64 * 1024
_PROMPT_QUIET = 0.2


def _qemu_argv(spec: BootSpec, accel: str) -> list[str]:
    arch = _arch(spec.arch)
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
        "-kernel", os.fspath(spec.kernel),
        "-append", spec.append,
    ]  # fmt: skip
    if spec.initrd is not None:
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
) -> BootResult:
    """Boot ``spec`` and wait until a console line matches the regex ``expect``.

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

    arch = _arch(spec.arch)
    accel = "kvm" if platform.machine() == arch.kvm_host and kvm_usable() else "tcg"
    argv = _qemu_argv(spec, accel)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    log.info("booting %s with %s (log: %s)", spec.disk or spec.kernel, accel, log_path)
    started = time.monotonic()
    with log_path.open("wb") as log_file:
        proc = run.start(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        try:
            match, exited = _watch(proc, pattern, started + timeout, log_file, on_line)
        finally:
            _stop(proc)
    seconds = time.monotonic() - started
    if match is None and exited:
        raise _early_exit_error(argv, proc.returncode, log_path, expect)
    if match is None:
        log.info("no console line matched %r within %.0f s", expect, timeout)
        return BootResult(False, log_path, seconds, accel, "")
    log.info("console matched %r after %.1f s", match, seconds)
    return BootResult(True, log_path, seconds, accel, match)


def _watch(
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


def _stop(proc: subprocess.Popen[bytes]) -> None:
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

_SECTOR = 512
_EXT_MAGIC_OFFSET = 1024 + 0x38
_EXT_MAGIC = 0xEF53
_MBR_PROTECTIVE = 0xEE
_MBR_EXTENDED = frozenset({0x05, 0x0F, 0x85})


@dataclass(frozen=True)
class _BootFile:
    name: str
    size: int


def kernel_from_disk(disk: Path, workdir: Path) -> tuple[Path, Path | None, str]:
    """Copy the newest kernel and its initrd out of the image's /boot into ``workdir``.

    Returns ``(kernel, initrd or None, root)`` where ``root`` is ``UUID=<fs uuid>`` for
    the kernel command line. The image may be raw (MBR, GPT or a bare ext filesystem)
    or any format ``qemu-img`` reads (qcow2, vmdk ...), which is first converted to a
    temporary raw file in ``workdir``. Nothing is mounted.
    """
    if not disk.is_file():
        raise BootError(f"disk image {os.fspath(disk)} does not exist")
    workdir.mkdir(parents=True, exist_ok=True)
    fmt = qemu.image_format(disk)
    if fmt == "raw":
        return _kernel_from_raw(disk, workdir)
    raw = workdir / "oci2disk-boot-disk.raw"
    log.info("converting %s (%s) to raw to read its /boot", disk, fmt)
    try:
        qemu.convert_to_raw(disk, raw)
        return _kernel_from_raw(raw, workdir)
    finally:
        raw.unlink(missing_ok=True)


def _kernel_from_raw(raw: Path, workdir: Path) -> tuple[Path, Path | None, str]:
    offsets = list(_ext_offsets(raw))
    if not offsets:
        raise BootError(
            f"{os.fspath(raw)} holds no ext2/3/4 filesystem (looked at the partitions and "
            "at offset 0)",
            hint="boot reads the kernel from an ext filesystem; pass --kernel and --initrd",
        )
    for offset in offsets:
        device = f"{os.fspath(raw)}?offset={offset}"
        files = _list_boot(device)
        kernel = _newest_kernel(files)
        if kernel is None:
            log.debug("no kernel in /boot of the filesystem at offset %d", offset)
            continue
        initrd = _matching_initrd(kernel.name, files)
        kernel_path = _dump(device, kernel, workdir)
        initrd_path = None if initrd is None else _dump(device, initrd, workdir)
        root = f"UUID={_fs_uuid(device)}"
        log.info(
            "kernel %s, initrd %s, root=%s", kernel.name, initrd.name if initrd else None, root
        )
        return kernel_path, initrd_path, root
    raise BootError(
        f"the image {os.fspath(raw)} has no kernel: no /boot/vmlinuz-* in its filesystem",
        hint=NO_KERNEL_HINT,
    )


def _ext_offsets(raw: Path) -> Iterator[int]:
    """Byte offsets of ext filesystems: partitions in table order, else offset 0."""
    with raw.open("rb") as f:

        def read(offset: int, size: int) -> bytes:
            f.seek(offset)
            return f.read(size)

        def is_ext(offset: int) -> bool:
            magic = read(offset + _EXT_MAGIC_OFFSET, 2)
            return len(magic) == 2 and struct.unpack("<H", magic)[0] == _EXT_MAGIC

        mbr = read(0, _SECTOR)
        if len(mbr) == _SECTOR and mbr[510:512] == b"\x55\xaa":
            entries = [struct.unpack_from("<B3xBxxxII", mbr, 0x1BE + 16 * i) for i in range(4)]
            if any(ptype == _MBR_PROTECTIVE for _, ptype, _, _ in entries):
                starts = _gpt_starts(read)
            else:
                starts = [
                    lba * _SECTOR
                    for _, ptype, lba, count in entries
                    if ptype != 0 and count != 0 and ptype not in _MBR_EXTENDED
                ]
            found = [start for start in starts if is_ext(start)]
            if found:
                yield from found
                return
        if is_ext(0):
            yield 0


def _gpt_starts(read: Callable[[int, int], bytes]) -> list[int]:
    for sector in (512, 4096):
        header = read(sector, 92)
        if header[:8] != b"EFI PART":
            continue
        entries_lba, count, entry_size = struct.unpack_from("<QII", header, 72)
        if not 128 <= entry_size <= 4096 or count > 1024:
            raise BootError("the GPT header is malformed (entry size or count out of range)")
        table = read(entries_lba * sector, count * entry_size)
        starts = []
        for i in range(count):
            entry = table[i * entry_size : (i + 1) * entry_size]
            if len(entry) < 48 or entry[:16] == bytes(16):
                continue
            starts.append(struct.unpack_from("<Q", entry, 32)[0] * sector)
        return starts
    raise BootError("the disk has a protective MBR but no GPT header at LBA 1")


def _debugfs(device: str, request: str) -> str:
    proc = run.run(["debugfs", "-R", request, device], what=f"debugfs {request!r} on {device}")
    return proc.stdout.decode("utf-8", "replace")


def _list_boot(device: str) -> list[_BootFile]:
    # `ls -p` prints /inode/mode/uid/gid/name/size/ per entry; a missing /boot prints
    # nothing on stdout (the error goes to stderr, exit code 0).
    files = []
    for line in _debugfs(device, "ls -p /boot").splitlines():
        fields = line.split("/")
        if len(fields) < 7 or not fields[2].isdigit():
            continue
        mode = int(fields[2], 8)
        name = "/".join(fields[5:-2])
        if mode & 0o170000 == 0o100000 and fields[-2].isdigit():
            files.append(_BootFile(name, int(fields[-2])))
    return files


def _version_key(text: str) -> tuple[tuple[int, int | str], ...]:
    """Sort key like `sort -V`: digit runs compare as numbers."""
    return tuple(
        (0, int(part)) if part.isdigit() else (1, part) for part in re.findall(r"\d+|\D+", text)
    )


def _newest_kernel(files: list[_BootFile]) -> _BootFile | None:
    kernels = [f for f in files if f.name.startswith("vmlinuz-") and f.size > 0]
    if not kernels:
        return None
    return max(kernels, key=lambda f: _version_key(f.name.removeprefix("vmlinuz-")))


def _matching_initrd(kernel_name: str, files: list[_BootFile]) -> _BootFile | None:
    version = kernel_name.removeprefix("vmlinuz-")
    by_name = {f.name: f for f in files}
    # Debian/Ubuntu, Fedora/Arch (dracut, mkinitcpio), SUSE.
    for candidate in (f"initrd.img-{version}", f"initramfs-{version}.img", f"initrd-{version}"):
        if candidate in by_name:
            return by_name[candidate]
    return None


def _dump(device: str, item: _BootFile, workdir: Path) -> Path:
    out = workdir / item.name
    tmp = workdir / f".{item.name}.tmp"
    tmp.unlink(missing_ok=True)
    _debugfs(device, f'dump "/boot/{item.name}" "{os.fspath(tmp)}"')
    if not tmp.is_file() or tmp.stat().st_size != item.size:
        tmp.unlink(missing_ok=True)
        raise BootError(
            f"could not copy /boot/{item.name} out of {device} with debugfs",
            hint=f"check that {workdir} is writable and has room for {item.size} bytes",
        )
    tmp.replace(out)
    return out


def _fs_uuid(device: str) -> str:
    for line in _debugfs(device, "stats -h").splitlines():
        if line.startswith("Filesystem UUID:"):
            uuid = line.partition(":")[2].strip()
            if uuid and uuid != "<none>":
                return uuid
    raise BootError(f"the filesystem at {device} has no UUID to pass as root=")
