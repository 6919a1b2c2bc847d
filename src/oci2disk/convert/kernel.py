"""The kernel and initrd of the image, and the uncompressed vmlinux some simulators need.

Which kernel: :mod:`oci2disk.rootfs.kernels` (the finder ``boot`` uses too).

``vmlinux`` is found as the kernel's scripts/extract-vmlinux finds it: the compressed
payload starts at a known magic (gzip, xz, zstd, lzma, lz4, bzip2); each candidate is
decompressed and the first that gives an ELF file wins. An x86 bzImage says where its
payload is, so that is tried first.

Host tools: lz4 (only for an lz4-compressed kernel).
"""

from __future__ import annotations

import bz2
import io
import logging
import lzma
import struct
import subprocess
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import zstandard

from oci2disk import run
from oci2disk.bytestreams import CHUNK
from oci2disk.compression import DECOMPRESS_ERRORS, Compression
from oci2disk.convert.options import ConvertOptions
from oci2disk.convert.plugin import OutputFormat
from oci2disk.errors import ConvertError, ImageError
from oci2disk.rootfs import Entry, Tree
from oci2disk.rootfs import kernels as kernel_finder
from oci2disk.rootfs.kernels import KernelFiles

log = logging.getLogger("oci2disk.kernel")

ELF_MAGIC = b"\x7fELF"
HEAD_BYTES = 4096  # of a payload, to tell an ELF file or an arm64/riscv64 Image

if TYPE_CHECKING:
    from oci2disk.convert.job import Job


def write_kernel(
    rootfs: Tree,
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


def _copy_out(rootfs: Tree, entry: Entry, out: Path) -> None:
    with rootfs.open(entry.path) as src, out.open("wb") as dst:
        while chunk := src.read(CHUNK):
            dst.write(chunk)


# ---------------------------------------------------------------- vmlinux


# scripts/extract-vmlinux's magics, in its order (lzo is left out: no kernel of a
# distribution uses it).
_CODECS = (
    Compression.GZIP,
    Compression.XZ,
    Compression.BZIP2,
    Compression.LZMA,
    Compression.LZ4,
    Compression.ZSTD,
)


def extract_vmlinux(vmlinuz: bytes, workdir: Path) -> bytes | bytearray:
    """The ELF kernel inside a compressed kernel image (or the image, if it is ELF)."""
    if vmlinuz.startswith(ELF_MAGIC):
        return vmlinuz
    tried: list[str] = []
    kind = _non_elf_kind(vmlinuz)
    for codec, start in _candidates(vmlinuz):
        tried.append(f"{codec.label}@{start}")
        elf = _decompress(codec, vmlinuz[start:], workdir)
        if elf is not None and elf.startswith(ELF_MAGIC):
            log.info("vmlinux: %s payload at byte %d, %d bytes", codec.label, start, len(elf))
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


def _non_elf_kind(data: bytes | bytearray) -> str | None:
    """Kernel images with no ELF file inside: the arm64 and riscv64 Image (headers in
    the kernel's Documentation/arch/*/booting.rst) and EFI zboot (an Image, compressed)."""
    if data[:2] == b"MZ" and data[4:8] == b"zimg":
        return "an EFI zboot image (a compressed arm64/riscv64 Image)"
    if data[0x38:0x3C] == b"ARM\x64":
        return "an arm64 Image"
    if data[0x38:0x3C] == b"RSC\x05":
        return "a riscv64 Image"
    return None


def _candidates(data: bytes) -> Iterator[tuple[Compression, int]]:
    """(codec, offset) pairs: the bzImage's own payload first, then every magic found."""
    seen: set[int] = set()
    payload = _bzimage_payload(data)
    if payload is not None:
        for codec in _CODECS:
            if data.startswith(codec.magic, payload):
                seen.add(payload)
                yield codec, payload
    for codec in _CODECS:
        # gzip's magic plus the deflate method byte, as extract-vmlinux looks for it
        magic = codec.magic + b"\x08" if codec is Compression.GZIP else codec.magic
        start = data.find(magic)
        while start >= 0:
            if start not in seen:
                yield codec, start
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


# Far more than any kernel: a small crafted payload that inflates to gigabytes stops here.
VMLINUX_MAX = 256 << 20


def _decompress(codec: Compression, data: bytes, workdir: Path) -> bytes | bytearray | None:
    """The payload decompressed: only its head (enough to tell what it is) when it is no
    ELF file, else at most VMLINUX_MAX bytes, so that no payload takes more memory than a
    kernel would."""
    try:
        if codec is Compression.LZ4:
            return _unlz4(data, workdir)
        head = _inflate(codec, data, HEAD_BYTES)
        if not head.startswith(ELF_MAGIC):
            return head  # not the vmlinux; the caller may still tell what it is
        elf = _inflate(codec, data, VMLINUX_MAX + 1)
    except DECOMPRESS_ERRORS:
        return None
    if len(elf) > VMLINUX_MAX:
        raise ConvertError(
            f"the kernel image's {codec.label} payload decompresses to more than "
            f"{VMLINUX_MAX >> 20} MiB: that is no kernel",
            hint="check the image's /boot; drop --vmlinux (vmlinux = true) to skip this",
        )
    return elf


def _inflate(codec: Compression, data: bytes, limit: int) -> bytearray:
    """At most ``limit`` bytes of ``data`` decompressed, whatever it would inflate to.

    Chunk by chunk into one growing buffer (grown in place, never copied whole), so a
    payload costs about ``limit`` bytes of memory at most.
    """
    out = bytearray()
    if codec is Compression.GZIP:
        inflater = zlib.decompressobj(wbits=31)
        tail = data
        while len(out) < limit and not inflater.eof:
            chunk = inflater.decompress(tail, min(CHUNK, limit - len(out)))
            tail = inflater.unconsumed_tail
            if not chunk:
                break
            out += chunk
        return out
    if codec in (Compression.XZ, Compression.LZMA, Compression.BZIP2):
        form = lzma.FORMAT_XZ if codec is Compression.XZ else lzma.FORMAT_ALONE
        decoder: lzma.LZMADecompressor | bz2.BZ2Decompressor = (
            bz2.BZ2Decompressor()
            if codec is Compression.BZIP2
            else lzma.LZMADecompressor(format=form)
        )
        pending = data
        while len(out) < limit and not decoder.eof:
            chunk = decoder.decompress(pending, max_length=min(CHUNK, limit - len(out)))
            pending = b""
            if not chunk and decoder.needs_input:
                break
            out += chunk
        return out
    if codec is Compression.ZSTD:
        reader = zstandard.ZstdDecompressor().stream_reader(io.BytesIO(data))
        while len(out) < limit:
            try:
                piece = reader.read(min(CHUNK, limit - len(out)))
            except zstandard.ZstdError:
                if not out:
                    raise
                break  # the data after the frame (a kernel image goes on)
            if not piece:
                break
            out += piece
        return out
    return bytearray(codec.decompress_bytes(data)[:limit])


def _unlz4(data: bytes, workdir: Path) -> bytes | None:
    # The kernel's lz4 payload is followed by other data, which lz4 reports as an error
    # after it wrote the kernel: its exit status is not what tells success here.
    # Read as a stream and capped like the other codecs: lz4 stops when its pipe closes.
    source = workdir / "payload.lz4"
    source.write_bytes(data)
    try:
        proc = run.start(
            ["lz4", "-dc", str(source)], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL
        )
        assert proc.stdout is not None
        try:
            out = proc.stdout.read(VMLINUX_MAX + 1)
        finally:
            proc.stdout.close()
            proc.kill()
            proc.wait()
    finally:
        source.unlink(missing_ok=True)
    if len(out) > VMLINUX_MAX:
        raise ConvertError(
            f"the kernel image's lz4 payload decompresses to more than "
            f"{VMLINUX_MAX >> 20} MiB: that is no kernel",
            hint="check the image's /boot; drop --vmlinux (vmlinux = true) to skip this",
        )
    return out or None


# ------------------------------------------------------------------ the kernel format


def write(job: Job, out: Path) -> None:
    spec = job.options.kernel
    try:
        chosen = kernel_finder.choose(job.rootfs, spec.version)
    except ImageError as exc:  # the image lacks what this output is made of
        raise ConvertError(exc.message, hint=exc.hint) from None
    where = job.targets[KERNEL].parent
    initrd = job.sibling(KERNEL, where / "initrd.img") if chosen.initrd else None
    if chosen.initrd is None:
        job.warn(f"the image has no initrd for kernel {chosen.version}; wrote the kernel only")
    vmlinux = job.sibling(KERNEL, where / "vmlinux") if spec.vmlinux else None
    with job.progress.step(f"writing kernel {chosen.version}"):
        write_kernel(
            job.rootfs,
            chosen,
            out,
            initrd=initrd,
            vmlinux=vmlinux,
            workdir=job.workspace.subdir("kernel"),
        )


def kernel_name(base: str, options: ConvertOptions) -> str:
    return "vmlinuz"  # initrd.img and vmlinux go beside it


KERNEL = OutputFormat(
    name="kernel",
    summary="vmlinuz and initrd.img from the image's /boot (and vmlinux with --vmlinux)",
    write=write,
    output_name=kernel_name,
)
