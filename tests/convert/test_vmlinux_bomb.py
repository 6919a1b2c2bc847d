"""--vmlinux on a crafted kernel: a small payload that inflates to gigabytes is refused
after a bounded amount of memory, not decompressed whole."""

from __future__ import annotations

import lzma
import resource
import subprocess
import zlib
from pathlib import Path

import pytest

from oci2disk.convert.kernel import VMLINUX_MAX, extract_vmlinux
from oci2disk.errors import ConvertError

ELF_HEAD = b"\x7fELF\x02\x01\x01" + b"\0" * 57


def bomb(codec: str, size: int) -> bytes:
    """ELF_HEAD then ``size`` zero bytes, compressed: a few hundred KiB."""
    if codec == "lz4":  # the kernel's legacy lz4 frames, made by the lz4 tool
        raw = ELF_HEAD + bytes(size)
        return subprocess.run(
            ["lz4", "-l", "-c", "-9"], input=raw, capture_output=True, check=True
        ).stdout
    packer: zlib._Compress | lzma.LZMACompressor
    if codec == "gzip":
        packer = zlib.compressobj(9, zlib.DEFLATED, 31)
    else:
        packer = lzma.LZMACompressor(format=lzma.FORMAT_XZ)
    parts = [packer.compress(ELF_HEAD)]
    zeros = bytes(16 << 20)
    for _ in range(size // len(zeros)):
        parts.append(packer.compress(zeros))
    parts.append(packer.flush())
    return b"".join(parts)


@pytest.mark.parametrize("codec", ["gzip", "xz", "lz4"])
def test_a_payload_larger_than_any_kernel_is_refused(tmp_path: Path, codec: str) -> None:
    payload = bomb(codec, VMLINUX_MAX + (64 << 20))
    assert len(payload) < (4 << 20 if codec != "lz4" else 8 << 20)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with pytest.raises(ConvertError, match="no kernel"):
        extract_vmlinux(b"\0" * 512 + payload, tmp_path)
    grown = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) << 10
    assert grown < 2 * VMLINUX_MAX  # bounded: never the whole inflated payload
