"""Make vmdk, vpc (VHD) and vdi images as reproducible as raw and qcow2.

qemu-img stamps each image it writes with random ids and the current time: the vmdk
descriptor's content id (``CID``), the VHD footer's UUID and time stamp, the VDI
header's creation and modification UUIDs. Nothing reads them for the disk's content,
so they are replaced here by values derived from a seed (the image digest and the
format) and ``SOURCE_DATE_EPOCH``: the same image gives the same bytes.

vhdx is not handled: its two headers and its log carry GUIDs that the format requires
to change on every write session (FileWriteGuid, DataWriteGuid, LogGuid), protected by
CRC-32C checksums, and a reader may replay or reject a log whose GUID does not match;
rewriting them would produce files that only look reproducible. Use raw, qcow2, vmdk,
vpc or vdi when the bytes must not change between runs (see docs/reproducible.md).

Host tools: none.
"""

from __future__ import annotations

import hashlib
import struct
import uuid
from pathlib import Path

VHD_EPOCH = 946684800  # 2000-01-01T00:00:00Z, where VHD time stamps start
VHD_FOOTER = 512
VDI_UUIDS = 0x188  # uuidCreate, then uuidModify (header version 1.1)
REPRODUCIBLE = ("vmdk", "vpc", "vdi")


def derived(seed: str, what: str) -> bytes:
    return hashlib.sha256(f"{seed}\0{what}".encode()).digest()[:16]


def normalize(path: Path, fmt: str, seed: str, epoch: int, final: str) -> None:
    """Replace the random ids and times qemu-img wrote into the image ``path``, and
    (vmdk) the temporary file name in its extent line by ``final``, its name to be."""
    if fmt == "vmdk":
        _vmdk(path, seed, final)
    elif fmt == "vpc":
        _vpc(path, seed, epoch)
    elif fmt == "vdi":
        _vdi(path, seed)


def _vmdk(path: Path, seed: str, final: str) -> None:
    with path.open("r+b") as f:
        head = bytearray(f.read(1 << 16))
        at = head.find(b"\nCID=")
        if at < 0:
            return
        at += len(b"\nCID=")
        cid = (int.from_bytes(derived(seed, "vmdk-cid")[:4], "big") | 1) % 0xFFFFFFFE
        head[at : at + 8] = f"{cid:08x}".encode()
        # The descriptor is text padded with NULs to its sectors: a shorter name keeps it
        # in place.
        old = f' "{path.name}"\n'.encode()
        new = f' "{final}"\n'.encode()
        start = head.find(old)
        end = head.find(b"\0", start)
        if start >= 0 and end > 0 and len(new) <= len(old):
            text = head[:start] + new + head[start + len(old) : end]
            head[:end] = text + b"\0" * (end - len(text))
        f.seek(0)
        f.write(head)


def _vpc(path: Path, seed: str, epoch: int) -> None:
    size = path.stat().st_size
    stamp = max(0, min(epoch - VHD_EPOCH, 0xFFFFFFFF))
    ident = uuid.UUID(bytes=derived(seed, "vhd-uuid"), version=4).bytes
    with path.open("r+b") as f:
        for at in {0, size - VHD_FOOTER}:  # a dynamic VHD has a copy at the start
            f.seek(at)
            footer = bytearray(f.read(VHD_FOOTER))
            if footer[:8] != b"conectix":
                continue
            struct.pack_into(">I", footer, 24, stamp)
            footer[68:84] = ident
            footer[64:68] = b"\0\0\0\0"
            struct.pack_into(">I", footer, 64, ~sum(footer) & 0xFFFFFFFF)
            f.seek(at)
            f.write(footer)


def _vdi(path: Path, seed: str) -> None:
    with path.open("r+b") as f:
        f.seek(0x40)
        if f.read(4) != b"\x7f\x10\xda\xbe":  # the VDI signature
            return
        f.seek(VDI_UUIDS)
        for what in ("vdi-create", "vdi-modify"):
            f.write(uuid.UUID(bytes=derived(seed, what), version=4).bytes_le)
