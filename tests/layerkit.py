"""Hand-made OCI layouts for tests: layers written with tarfile, stored with LayoutWriter.

For example, a base layer and an upper zstd layer that deletes a file::

    make_image(path, [[file("etc/motd", b"hi")], Layer([whiteout("etc/motd")], compression="zstd")])
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import tarfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Literal

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
TarFormat = Literal[0, 1, 2]  # tarfile.USTAR_FORMAT, GNU_FORMAT, PAX_FORMAT
TAG = "test"
_MEDIA_TYPES = {"none": MT_OCI_LAYER, "gzip": MT_OCI_LAYER_GZIP, "zstd": MT_OCI_LAYER_ZSTD}


@dataclass(frozen=True)
class Member:
    """One tar member of a hand-made layer; ``raw`` holds its ready bytes if tarfile
    cannot write it (sparse files)."""

    info: tarfile.TarInfo
    data: bytes = b""
    raw: bytes | None = None


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
    xattrs: Mapping[str, bytes] | None = None,
) -> Member:
    """A hard link; its own header metadata is what a careless writer might put there."""
    info = _info(name, tarfile.LNKTYPE, mode=mode, uid=uid, gid=gid, mtime=mtime, xattrs=xattrs)
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


def _pad(data: bytes) -> bytes:
    return data + bytes(-len(data) % tarfile.BLOCKSIZE)


def member_bytes(member: Member, format: TarFormat = tarfile.PAX_FORMAT) -> bytes:
    if member.raw is not None:
        return member.raw
    header = member.info.tobuf(format, "utf-8", "surrogateescape")
    return header + (_pad(member.data) if member.info.isreg() else b"")


def tar_bytes(members: Sequence[Member], *, format: TarFormat = tarfile.PAX_FORMAT) -> bytes:
    """A tar archive as tarfile writes one (end marker, padded to a record)."""
    body = b"".join(member_bytes(m, format) for m in members) + bytes(2 * tarfile.BLOCKSIZE)
    return body + bytes(-len(body) % tarfile.RECORDSIZE)


# ---------------------------------------------------------------- sparse files

SPARSE_FORMATS = ("gnu", "pax0.0", "pax0.1", "pax1.0")


def sparse_file(
    name: str,
    size: int,
    segments: Sequence[tuple[int, bytes]],
    *,
    format: str = "pax1.0",
    mode: int = 0o644,
    mtime: int = MTIME,
) -> Member:
    """A sparse regular file of ``size`` bytes: data at the given offsets, zeros elsewhere.

    ``format`` is one of GNU tar's encodings: "gnu" (old GNU 'S' headers) or PAX
    "pax0.0", "pax0.1", "pax1.0" (``tar --sparse --sparse-version=...``).
    """
    for offset, d in segments:
        # GNU tar stores each segment in whole blocks, Go and Python store them back to
        # back: they agree (as on every archive GNU tar writes) when segments are aligned.
        aligned = len(d) % tarfile.BLOCKSIZE == 0 or offset + len(d) == size
        assert offset % tarfile.BLOCKSIZE == 0 and aligned, "segments must be block aligned"
    data = b"".join(d for _, d in segments)
    spans = [(offset, len(d)) for offset, d in segments]
    # GNU tar ends every map with the file's end (a zero-length segment).
    spans_with_end = [*spans, (size, 0)]
    info = _info(name, tarfile.REGTYPE, mode=mode, uid=0, gid=0, mtime=mtime, xattrs=None)
    if format == "gnu":
        return Member(info, raw=_gnu_sparse(info, size, spans_with_end, data))
    if format == "pax1.0":
        sparse_map = f"{len(spans_with_end)}\n".encode() + b"".join(
            f"{o}\n{n}\n".encode() for o, n in spans_with_end
        )
        body = _pad(sparse_map) + data
        info.name = f"GNUSparseFile.0/{name}"
        info.size = len(body)
        info.pax_headers = {
            "GNU.sparse.major": "1",
            "GNU.sparse.minor": "0",
            "GNU.sparse.name": name,
            "GNU.sparse.realsize": str(size),
        }
        return Member(info, raw=info.tobuf(tarfile.PAX_FORMAT) + _pad(body))
    info.size = len(data)
    if format == "pax0.1":
        info.pax_headers = {
            "GNU.sparse.size": str(size),
            "GNU.sparse.numblocks": str(len(spans_with_end)),
            "GNU.sparse.map": ",".join(f"{o},{n}" for o, n in spans_with_end),
        }
        return Member(info, raw=info.tobuf(tarfile.PAX_FORMAT) + _pad(data))
    assert format == "pax0.0", format
    records = [("GNU.sparse.size", str(size)), ("GNU.sparse.numblocks", str(len(spans_with_end)))]
    for offset, length in spans_with_end:
        records += [("GNU.sparse.offset", str(offset)), ("GNU.sparse.numbytes", str(length))]
    pax = b"".join(_pax_record(k, v) for k, v in records)
    xheader = tarfile.TarInfo(f"PaxHeaders.0/{name}")
    xheader.type = tarfile.XHDTYPE
    xheader.size = len(pax)
    xheader.mtime = mtime
    ustar = info.tobuf(tarfile.USTAR_FORMAT)
    return Member(info, raw=xheader.tobuf(tarfile.USTAR_FORMAT) + _pad(pax) + ustar + _pad(data))


def _pax_record(key: str, value: str) -> bytes:
    body = f" {key}={value}\n".encode()
    length = len(body) + 1
    while len(str(length)) + len(body) != length:
        length += 1
    return str(length).encode() + body


def _checksum(header: bytearray) -> None:
    header[148:156] = b" " * 8
    header[148:156] = b"%06o\0 " % sum(header)


def _gnu_sparse(
    info: tarfile.TarInfo, size: int, spans: list[tuple[int, int]], data: bytes
) -> bytes:
    """Old GNU sparse: type 'S', 4 map slots in the header, 21 in each extension block."""
    info.size = len(data)
    header = bytearray(info.tobuf(tarfile.GNU_FORMAT)[-tarfile.BLOCKSIZE :])
    header[156:157] = tarfile.GNUTYPE_SPARSE
    first, rest = spans[:4], spans[4:]
    for i, (offset, length) in enumerate(first):
        header[386 + 24 * i : 398 + 24 * i] = b"%011o\0" % offset
        header[398 + 24 * i : 410 + 24 * i] = b"%011o\0" % length
    header[482] = 1 if rest else 0
    header[483:495] = b"%011o\0" % size
    _checksum(header)
    blocks = [bytes(header)]
    while rest:
        block = bytearray(tarfile.BLOCKSIZE)
        chunk, rest = rest[:21], rest[21:]
        for i, (offset, length) in enumerate(chunk):
            block[24 * i : 24 * i + 12] = b"%011o\0" % offset
            block[24 * i + 12 : 24 * i + 24] = b"%011o\0" % length
        block[504] = 1 if rest else 0
        blocks.append(bytes(block))
    return b"".join(blocks) + _pad(data)


# ---------------------------------------------------------------- a bomb


def write_empty_files_layer(out: BinaryIO, dirs: int, files_per_dir: int) -> int:
    """Stream an uncompressed layer of ``dirs`` x ``files_per_dir`` empty files; return
    its size. Headers are stamped from a template: fast, and nothing is held in memory."""
    template = bytearray(tarfile.TarInfo("x").tobuf(tarfile.USTAR_FORMAT))
    template[100:108] = b"0000644\0"
    template[136:148] = b"%011o\0" % MTIME
    written = 0
    batch = bytearray()
    for d in range(dirs):
        for f in range(files_per_dir):
            header = bytearray(template)
            name = b"d%04d/f%06d" % (d, f)
            header[0:100] = name.ljust(100, b"\0")
            _checksum(header)
            batch += header
        out.write(batch)
        written += len(batch)
        batch.clear()
    end = bytes(2 * tarfile.BLOCKSIZE + (-(written + 1024) % tarfile.RECORDSIZE))
    out.write(end)
    return written + len(end)


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
    format: TarFormat = tarfile.PAX_FORMAT
    raw: bytes | None = None
    media_type: str | None = None  # instead of the OCI type for ``compression``

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
    architecture: str = "amd64",
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
            writer.add_bytes(
                compress(data, layer.compression),
                layer.media_type or _MEDIA_TYPES[layer.compression],
            )
        )
    config = {
        "architecture": architecture,
        "os": "linux",
        "rootfs": {"type": "layers", "diff_ids": list(diff_ids or computed)},
        "config": {},
    }
    writer.add_image(config, descriptors, tag)
    return open_layout(layout, tag)


def _config(diff_ids: Sequence[str], architecture: str = "amd64") -> dict[str, object]:
    return {
        "architecture": architecture,
        "os": "linux",
        "rootfs": {"type": "layers", "diff_ids": list(diff_ids)},
        "config": {},
    }


def write_docker_archive(
    path: Path,
    layers: Sequence[Layer | Sequence[Member]],
    *,
    tag: str = "oci2disk-test:latest",
    link_duplicates: bool = True,
) -> None:
    """Write what ``docker save`` writes (the legacy layout that ``docker load`` of
    Docker 20.10 reads): manifest.json, the config as <id>.json, <id>/layer.tar.

    Like ``docker save``, a layer that occurs again is written once and then as a
    symlink to the first copy (``link_duplicates``).
    """
    members: list[tuple[tarfile.TarInfo, bytes]] = []
    layer_names: list[str] = []
    diff_ids: list[str] = []
    first_copy: dict[bytes, str] = {}
    for spec in layers:
        layer = spec if isinstance(spec, Layer) else Layer(spec)
        data = layer.tar()
        diff_id = hashlib.sha256(data).hexdigest()
        diff_ids.append("sha256:" + diff_id)
        blob = compress(data, layer.compression)
        name = f"{hashlib.sha256(blob + str(len(layer_names)).encode()).hexdigest()}/layer.tar"
        layer_names.append(name)
        directory_info = tarfile.TarInfo(name.split("/")[0])
        directory_info.type = tarfile.DIRTYPE
        directory_info.mode = 0o755
        members.append((directory_info, b""))
        info = tarfile.TarInfo(name)
        if link_duplicates and blob in first_copy:
            info.type = tarfile.SYMTYPE
            info.linkname = f"../{first_copy[blob]}"
            members.append((info, b""))
            continue
        first_copy.setdefault(blob, name)
        info.size = len(blob)
        members.append((info, blob))
    config = json.dumps(_config(diff_ids)).encode()
    config_name = hashlib.sha256(config).hexdigest() + ".json"
    manifest = [{"Config": config_name, "RepoTags": [tag], "Layers": layer_names}]
    for name, data in ((config_name, config), ("manifest.json", json.dumps(manifest).encode())):
        info = tarfile.TarInfo(name)
        info.size = len(data)
        members.append((info, data))
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tar:
        for info, data in members:
            info.mtime = MTIME
            tar.addfile(info, io.BytesIO(data) if info.isreg() else None)
