"""The kernel and initrd of the image, and the uncompressed vmlinux some simulators need.

The kernel is looked for where distributions install it: ``/boot/vmlinuz-VERSION``
(Debian, Ubuntu, Fedora, Arch, Alpine) and ``/usr/lib/modules/VERSION/vmlinuz``
(Fedora, Arch). Its initrd is ``/boot/initrd.img-VERSION`` (Debian, Ubuntu),
``/boot/initramfs-VERSION.img`` (Fedora, Arch, Alpine) or ``/boot/initrd-VERSION``.
Several kernels: the newest version, unless the recipe names one.

``vmlinux`` is found as the kernel's scripts/extract-vmlinux finds it: the compressed
payload starts at a known magic (gzip, xz, zstd, lzma, lz4, bzip2); each candidate is
decompressed and the first that gives an ELF file wins. An x86 bzImage says where its
payload is, so that is tried first.

Host tools: lz4 (only for an lz4-compressed kernel).
"""

from __future__ import annotations

import bz2
import logging
import lzma
import re
import struct
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import zstandard

from oci2disk import run
from oci2disk.errors import ConvertError
from oci2disk.flatten import Entry, FlatRootfs, Kind
from oci2disk.recipe import KernelSpec

log = logging.getLogger("oci2disk.kernel")

CHUNK = 1 << 20
MAX_SYMLINKS = 40  # as Linux's path lookup
ELF_MAGIC = b"\x7fELF"
KERNEL_RE = re.compile(r"^(?:vmlinuz|vmlinux|bzImage|Image|zImage)-(.+)$")
INITRD_NAMES = ("initrd.img-{v}", "initramfs-{v}.img", "initrd-{v}", "initrd-{v}.img")


def follow(rootfs: FlatRootfs, path: str) -> Entry | None:
    """The entry at ``path`` in the image, following symlinks inside the image only."""
    todo = [part for part in path.split("/") if part]
    done: list[str] = []
    hops = 0
    while todo:
        part = todo.pop(0)
        if part == ".":
            continue
        if part == "..":
            if done:
                done.pop()
            continue
        entry = rootfs.lookup("/".join([*done, part]))
        if entry is None:
            return None
        if entry.kind is Kind.SYMLINK:
            hops += 1
            if hops > MAX_SYMLINKS:
                return None
            target = [p for p in entry.linkname.split("/") if p]
            if entry.linkname.startswith("/"):
                done = []
            todo = target + todo
            continue
        done.append(part)
    return rootfs.lookup("/".join(done) or ".")


@dataclass(frozen=True)
class KernelFiles:
    version: str
    kernel: Entry  # a regular file (symlinks already followed)
    initrd: Entry | None


def version_key(version: str) -> tuple[tuple[int, int | str], ...]:
    """Compare versions part by part, numbers as numbers: 6.1.0-50 is newer than 6.1.0-9."""
    return tuple(
        (0, int(part)) if part.isdigit() else (1, part)
        for part in re.findall(r"\d+|[^\d]+", version)
    )


def find_kernels(rootfs: FlatRootfs) -> dict[str, KernelFiles]:
    """Every kernel of the image by version, each with its initrd when there is one."""
    found: dict[str, KernelFiles] = {}
    for entry in rootfs.entries():
        parts = entry.path.split("/")
        version = None
        if len(parts) == 2 and parts[0] == "boot":
            match = KERNEL_RE.match(parts[1])
            version = match.group(1) if match else None
        elif (
            len(parts) in (4, 5)
            and parts[-1] == "vmlinuz"
            and parts[-3] == "modules"
            and "/".join(parts[:-3]) in ("lib", "usr/lib")
        ):
            version = parts[-2]
        if version is None or version in found:
            continue
        kernel = follow(rootfs, entry.path)
        if kernel is None or kernel.kind not in (Kind.FILE, Kind.HARDLINK) or not kernel.size:
            continue
        found[version] = KernelFiles(version, kernel, _initrd(rootfs, version))
    return found


def _initrd(rootfs: FlatRootfs, version: str) -> Entry | None:
    candidates = [f"boot/{name.format(v=version)}" for name in INITRD_NAMES]
    candidates += [f"usr/lib/modules/{version}/initrd", f"lib/modules/{version}/initrd"]
    for path in candidates:
        entry = follow(rootfs, path)
        if entry is not None and entry.kind in (Kind.FILE, Kind.HARDLINK) and entry.size:
            return entry
    return None


def choose(rootfs: FlatRootfs, spec: KernelSpec) -> KernelFiles:
    kernels = find_kernels(rootfs)
    if not kernels:
        raise ConvertError(
            "the image has no kernel (no /boot/vmlinuz-VERSION or "
            "/usr/lib/modules/VERSION/vmlinuz), so there is none to write",
            hint="install one in the Dockerfile (Debian: apt-get install linux-image-amd64), "
            "or drop kernel from the formats",
        )
    versions = sorted(kernels, key=version_key)
    if spec.version is not None:
        if spec.version not in kernels:
            raise ConvertError(
                f"the image has no kernel {spec.version}",
                hint=f"kernels in the image: {', '.join(versions)}; "
                "set [kernel] version in recipe.toml to one of them",
            )
        return kernels[spec.version]
    if len(versions) > 1:
        log.warning(
            "the image has %d kernels (%s); writing the newest, %s",
            len(versions),
            ", ".join(versions),
            versions[-1],
        )
    return kernels[versions[-1]]


def write_kernel(
    rootfs: FlatRootfs,
    chosen: KernelFiles,
    vmlinuz: Path,
    *,
    initrd: Path | None = None,
    vmlinux: Path | None = None,
    workdir: Path,
) -> None:
    """Copy the kernel (and its initrd, when ``initrd`` is given) out of the image;
    extract the ELF kernel into ``vmlinux`` when given."""
    log.info("kernel %s: /%s", chosen.version, chosen.kernel.path)
    _copy_out(rootfs, chosen.kernel, vmlinuz)
    if initrd is not None:
        if chosen.initrd is None:
            raise ConvertError(f"the image has no initrd for kernel {chosen.version}")
        _copy_out(rootfs, chosen.initrd, initrd)
    if vmlinux is not None:
        vmlinux.write_bytes(extract_vmlinux(vmlinuz.read_bytes(), workdir))


def _copy_out(rootfs: FlatRootfs, entry: Entry, out: Path) -> None:
    with rootfs.open(entry.path) as src, out.open("wb") as dst:
        while chunk := src.read(CHUNK):
            dst.write(chunk)


# ---------------------------------------------------------------- vmlinux


def _gunzip(data: bytes) -> bytes:
    return zlib.decompressobj(wbits=31).decompress(data)


def _unxz(data: bytes) -> bytes:
    return lzma.LZMADecompressor(format=lzma.FORMAT_XZ).decompress(data)


def _unlzma(data: bytes) -> bytes:
    return lzma.LZMADecompressor(format=lzma.FORMAT_ALONE).decompress(data)


def _bunzip2(data: bytes) -> bytes:
    return bz2.BZ2Decompressor().decompress(data)


def _unzstd(data: bytes) -> bytes:
    out = zstandard.ZstdDecompressor().decompressobj()
    return out.decompress(data)


# scripts/extract-vmlinux's magics, in its order (lzo is left out: no kernel of a
# distribution uses it).
_CODECS: tuple[tuple[str, bytes, Callable[[bytes], bytes] | None], ...] = (
    ("gzip", b"\x1f\x8b\x08", _gunzip),
    ("xz", b"\xfd7zXZ\x00", _unxz),
    ("bzip2", b"BZh", _bunzip2),
    ("lzma", b"\x5d\x00\x00\x00", _unlzma),
    ("lz4", b"\x02\x21\x4c\x18", None),  # the lz4 tool (legacy frames)
    ("zstd", b"\x28\xb5\x2f\xfd", _unzstd),
)
_ERRORS = (OSError, EOFError, ValueError, zlib.error, lzma.LZMAError, zstandard.ZstdError)


def extract_vmlinux(vmlinuz: bytes, workdir: Path) -> bytes:
    """The ELF kernel inside a compressed kernel image (or the image, if it is ELF)."""
    if vmlinuz.startswith(ELF_MAGIC):
        return vmlinuz
    tried: list[str] = []
    kind = _non_elf_kind(vmlinuz)
    for name, start in _candidates(vmlinuz):
        tried.append(f"{name}@{start}")
        elf = _decompress(name, vmlinuz[start:], workdir)
        if elf is not None and elf.startswith(ELF_MAGIC):
            log.info("vmlinux: %s payload at byte %d, %d bytes", name, start, len(elf))
            return elf
        kind = kind or (_non_elf_kind(elf) if elf else None)
    if kind is not None:
        raise ConvertError(
            f"the kernel image is {kind}, which has no ELF kernel (vmlinux) inside: "
            "only x86 kernels carry one; gem5 loads ELF kernels only",
            hint="give gem5 a vmlinux from a kernel build (its top directory) or a kernel "
            "made for gem5 (gem5-resources' arm64-linux-kernel-*, riscv-linux-kernel-*), "
            "and drop vmlinux = true from [kernel]",
        )
    raise ConvertError(
        "cannot find the ELF kernel (vmlinux) inside the kernel image"
        + (f" (tried {', '.join(tried[:12])})" if tried else " (no compressed payload found)"),
        hint="the kernel may use a compression oci2disk does not read (lzo); "
        "drop vmlinux = true from [kernel]",
    )


def _non_elf_kind(data: bytes) -> str | None:
    """Kernel images with no ELF file inside: the arm64 and riscv64 Image (headers in
    the kernel's Documentation/arch/*/booting.rst) and EFI zboot (an Image, compressed)."""
    if data[:2] == b"MZ" and data[4:8] == b"zimg":
        return "an EFI zboot image (a compressed arm64/riscv64 Image)"
    if data[0x38:0x3C] == b"ARM\x64":
        return "an arm64 Image"
    if data[0x38:0x3C] == b"RSC\x05":
        return "a riscv64 Image"
    return None


def _candidates(data: bytes) -> Iterator[tuple[str, int]]:
    """(codec, offset) pairs: the bzImage's own payload first, then every magic found."""
    seen: set[int] = set()
    payload = _bzimage_payload(data)
    if payload is not None:
        for name, magic, _ in _CODECS:
            if data.startswith(magic, payload):
                seen.add(payload)
                yield name, payload
    for name, magic, _ in _CODECS:
        start = data.find(magic)
        while start >= 0:
            if start not in seen:
                yield name, start
            start = data.find(magic, start + 1)


def _bzimage_payload(data: bytes) -> int | None:
    """Where an x86 bzImage's compressed kernel starts (boot protocol 2.08 and later)."""
    if len(data) < 0x250 or data[0x202:0x206] != b"HdrS":
        return None
    (protocol,) = struct.unpack_from("<H", data, 0x206)
    if protocol < 0x208:
        return None
    setup_sectors = data[0x1F1] or 4
    offset, _length = struct.unpack_from("<II", data, 0x248)
    start = (setup_sectors + 1) * 512 + offset
    return start if start < len(data) else None


def _decompress(name: str, data: bytes, workdir: Path) -> bytes | None:
    decoder = next(fn for codec, _, fn in _CODECS if codec == name)
    try:
        if decoder is not None:
            return decoder(data)
        return _unlz4(data, workdir)
    except _ERRORS:
        return None


def _unlz4(data: bytes, workdir: Path) -> bytes | None:
    # The kernel's lz4 payload is followed by other data, which lz4 reports as an error
    # after it wrote the kernel: its exit status is not what tells success here.
    source = workdir / "payload.lz4"
    source.write_bytes(data)
    try:
        proc = run.run(["lz4", "-dc", str(source)], check=False)
    finally:
        source.unlink(missing_ok=True)
    return proc.stdout or None
