"""Hand-made OCI layouts for tests: layers written with tarfile, stored with LayoutWriter.

For example, a base layer and an upper zstd layer that deletes a file::

    make_image(path, [[file("etc/motd", b"hi")], Layer([whiteout("etc/motd")], compression="zstd")])
"""

from __future__ import annotations

import gzip
import hashlib
import io
import tarfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import zstandard

from oci2disk.oci.layout import (
    MT_OCI_LAYER,
    MT_OCI_LAYER_GZIP,
    MT_OCI_LAYER_ZSTD,
    LayoutWriter,
    OciImage,
    open_layout,
)

MTIME = 1_700_000_000
TAG = "test"
_MEDIA_TYPES = {"none": MT_OCI_LAYER, "gzip": MT_OCI_LAYER_GZIP, "zstd": MT_OCI_LAYER_ZSTD}


@dataclass(frozen=True)
class Member:
    """One tar member of a hand-made layer."""

    info: tarfile.TarInfo
    data: bytes = b""


def _info(
    name: str,
    type_: bytes,
    *,
    mode: int,
    uid: int,
    gid: int,
    mtime: float,
    xattrs: Mapping[str, bytes] | None,
) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = type_
    info.mode = mode
    info.uid = uid
    info.gid = gid
    info.uname = "root" if uid == 0 else "user"
    info.gname = "root" if gid == 0 else "user"
    info.mtime = mtime
    if xattrs:
        info.pax_headers = {
            "SCHILY.xattr." + key: value.decode("utf-8", "surrogateescape")
            for key, value in xattrs.items()
        }
    return info


def file(
    name: str,
    data: bytes = b"",
    *,
    mode: int = 0o644,
    uid: int = 0,
    gid: int = 0,
    mtime: float = MTIME,
    xattrs: Mapping[str, bytes] | None = None,
) -> Member:
    info = _info(name, tarfile.REGTYPE, mode=mode, uid=uid, gid=gid, mtime=mtime, xattrs=xattrs)
    info.size = len(data)
    return Member(info, data)


def directory(
    name: str,
    *,
    mode: int = 0o755,
    uid: int = 0,
    gid: int = 0,
    mtime: float = MTIME,
    xattrs: Mapping[str, bytes] | None = None,
) -> Member:
    info = _info(name, tarfile.DIRTYPE, mode=mode, uid=uid, gid=gid, mtime=mtime, xattrs=xattrs)
    return Member(info)


def symlink(name: str, target: str, *, uid: int = 0, gid: int = 0, mtime: float = MTIME) -> Member:
    info = _info(name, tarfile.SYMTYPE, mode=0o777, uid=uid, gid=gid, mtime=mtime, xattrs=None)
    info.linkname = target
    return Member(info)


def hardlink(
    name: str,
    target: str,
    *,
    mode: int = 0o644,
    uid: int = 0,
    gid: int = 0,
    mtime: float = MTIME,
) -> Member:
    """A hard link; its own header metadata is what a careless writer might put there."""
    info = _info(name, tarfile.LNKTYPE, mode=mode, uid=uid, gid=gid, mtime=mtime, xattrs=None)
    info.linkname = target
    return Member(info)


def device(name: str, major: int, minor: int, *, block: bool = False, mode: int = 0o600) -> Member:
    type_ = tarfile.BLKTYPE if block else tarfile.CHRTYPE
    info = _info(name, type_, mode=mode, uid=0, gid=0, mtime=MTIME, xattrs=None)
    info.devmajor = major
    info.devminor = minor
    return Member(info)


def fifo(name: str, *, mode: int = 0o644) -> Member:
    return Member(_info(name, tarfile.FIFOTYPE, mode=mode, uid=0, gid=0, mtime=MTIME, xattrs=None))


def whiteout(path: str) -> Member:
    """Docker/OCI whiteout: hides ``path`` (and all below it) of the lower layers."""
    parent, _, base = path.rpartition("/")
    return file(f"{parent}/.wh.{base}" if parent else f".wh.{base}")


def opaque(dirpath: str) -> Member:
    """Opaque whiteout: hides everything the lower layers have below ``dirpath``."""
    return file(f"{dirpath}/.wh..wh..opq")


def tar_bytes(members: Sequence[Member], *, format: int = tarfile.PAX_FORMAT) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(
        fileobj=buf, mode="w", format=format, encoding="utf-8", errors="surrogateescape"
    ) as tar:
        for member in members:
            tar.addfile(member.info, io.BytesIO(member.data) if member.info.isreg() else None)
    return buf.getvalue()


def go_style_modes(data: bytes) -> bytes:
    """Rewrite each ustar header's mode field with file-type bits, as Go's archive/tar does."""
    type_bits = {
        tarfile.REGTYPE: 0o100000,
        tarfile.AREGTYPE: 0o100000,
        tarfile.LNKTYPE: 0o100000,
        tarfile.DIRTYPE: 0o040000,
        tarfile.SYMTYPE: 0o120000,
        tarfile.CHRTYPE: 0o020000,
        tarfile.BLKTYPE: 0o060000,
        tarfile.FIFOTYPE: 0o010000,
    }
    out = bytearray(data)
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tar:
        for info in tar.getmembers():
            pos = info.offset
            while bytes(out[pos + 156 : pos + 157]) in (
                b"x",
                b"g",
                b"L",
                b"K",
            ):  # extension headers
                size = int(out[pos + 124 : pos + 136].strip(b"\0 ") or b"0", 8)
                pos += 512 + -(-size // 512) * 512
            mode = info.mode | type_bits.get(info.type, 0)
            out[pos + 100 : pos + 108] = b"%07o\0" % mode
            out[pos + 148 : pos + 156] = b" " * 8
            out[pos + 148 : pos + 156] = b"%06o\0 " % sum(out[pos : pos + 512])
    return bytes(out)


@dataclass(frozen=True)
class Layer:
    """One layer: members (or a ready uncompressed tar in ``raw``) and its compression."""

    members: Sequence[Member] = ()
    compression: str = "none"  # none | gzip | zstd
    format: int = tarfile.PAX_FORMAT
    raw: bytes | None = None

    def tar(self) -> bytes:
        return self.raw if self.raw is not None else tar_bytes(self.members, format=self.format)


def compress(data: bytes, compression: str) -> bytes:
    if compression == "gzip":
        return gzip.compress(data, mtime=0)
    if compression == "zstd":
        return zstandard.ZstdCompressor().compress(data)
    assert compression == "none", compression
    return data


def make_image(
    layout: Path,
    layers: Sequence[Layer | Sequence[Member]],
    *,
    diff_ids: Sequence[str] | None = None,
    tag: str = TAG,
) -> OciImage:
    """Write an OCI layout holding one image made of ``layers`` (bottom first)."""
    writer = LayoutWriter(layout)
    descriptors = []
    computed = []
    for spec in layers:
        layer = spec if isinstance(spec, Layer) else Layer(spec)
        data = layer.tar()
        computed.append("sha256:" + hashlib.sha256(data).hexdigest())
        descriptors.append(
            writer.add_bytes(compress(data, layer.compression), _MEDIA_TYPES[layer.compression])
        )
    config = {
        "architecture": "amd64",
        "os": "linux",
        "rootfs": {"type": "layers", "diff_ids": list(diff_ids or computed)},
        "config": {},
    }
    writer.add_image(config, descriptors, tag)
    return open_layout(layout, tag)
