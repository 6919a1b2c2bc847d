"""OCI image layout on disk: read index, manifest, config and blobs; verify digests.

Also writes layouts: from a ``docker save`` stream (the Docker Engine's export) and
from a single flat rootfs tarball (``oci2disk bootstrap``).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import gzip
import hashlib
import io
import json
import os
import shutil
import stat
import tarfile
import tempfile
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Protocol, cast

from oci2disk.arch import Arch
from oci2disk.bytestreams import CHUNK, ForwardReader, HashingCopier
from oci2disk.errors import ImageError

MT_OCI_INDEX = "application/vnd.oci.image.index.v1+json"
MT_OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
MT_OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
MT_OCI_LAYER = "application/vnd.oci.image.layer.v1.tar"
MT_OCI_LAYER_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
MT_OCI_LAYER_ZSTD = "application/vnd.oci.image.layer.v1.tar+zstd"
MT_DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
MT_DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
MT_DOCKER_LAYER_GZIP = "application/vnd.docker.image.rootfs.diff.tar.gzip"
MT_DOCKER_LAYER = "application/vnd.docker.image.rootfs.diff.tar"

INDEX_TYPES = {MT_OCI_INDEX, MT_DOCKER_LIST}
MANIFEST_TYPES = {MT_OCI_MANIFEST, MT_DOCKER_MANIFEST}
LAYER_COMPRESSION = {
    MT_OCI_LAYER: "none",
    MT_DOCKER_LAYER: "none",
    MT_OCI_LAYER_GZIP: "gzip",
    MT_DOCKER_LAYER_GZIP: "gzip",
    MT_OCI_LAYER_ZSTD: "zstd",
    "application/vnd.oci.image.layer.nondistributable.v1.tar": "none",
    "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip": "gzip",
    "application/vnd.oci.image.layer.nondistributable.v1.tar+zstd": "zstd",
}
REF_NAME = "org.opencontainers.image.ref.name"
# An image config, manifest or docker-archive manifest.json larger than this is not one.
MAX_JSON = 16 << 20


@dataclass(frozen=True)
class Platform:
    os: str
    architecture: str
    variant: str = ""

    def __str__(self) -> str:
        return "/".join(p for p in (self.os, self.architecture, self.variant) if p)

    @classmethod
    def parse(cls, text: str) -> Platform:
        parts = text.split("/")
        if len(parts) not in (2, 3) or not all(parts):
            raise ImageError(
                f"bad platform {text!r}", hint="write it as OS/ARCH[/VARIANT], e.g. linux/arm64"
            )
        return cls(parts[0], parts[1], parts[2] if len(parts) == 3 else "")

    def matches(self, other: Platform) -> bool:
        return (
            self.os == other.os
            and self.architecture == other.architecture
            and (not self.variant or not other.variant or self.variant == other.variant)
        )


@dataclass(frozen=True)
class Descriptor:
    media_type: str
    digest: str
    size: int
    annotations: Mapping[str, str] = field(default_factory=dict)
    platform: Platform | None = None

    @classmethod
    def from_json(cls, data: object, where: str) -> Descriptor:
        data = _expect_mapping(data, where)
        media_type = data.get("mediaType", "")
        digest = data.get("digest")
        size = data.get("size")
        if not isinstance(media_type, str) or not isinstance(digest, str):
            raise ImageError(f"{where}: malformed descriptor (mediaType and digest are strings)")
        if not isinstance(size, int) or isinstance(size, bool) or size < 0:
            raise ImageError(f"{where}: malformed descriptor (size {size!r} is not a byte count)")
        check_digest_syntax(digest, where)
        plat = data.get("platform")
        platform = None
        if isinstance(plat, Mapping):
            platform = Platform(
                str(plat.get("os", "")),
                str(plat.get("architecture", "")),
                str(plat.get("variant", "")),
            )
        annotations = _expect_mapping(data.get("annotations") or {}, f"{where} annotations")
        if not all(isinstance(v, str) for v in annotations.values()):
            raise ImageError(f"{where}: annotations must map strings to strings")
        return cls(media_type, digest, size, dict(annotations), platform)

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "mediaType": self.media_type,
            "digest": self.digest,
            "size": self.size,
        }
        if self.annotations:
            out["annotations"] = dict(self.annotations)
        if self.platform is not None:
            plat = {"os": self.platform.os, "architecture": self.platform.architecture}
            if self.platform.variant:
                plat["variant"] = self.platform.variant
            out["platform"] = plat
        return out


@dataclass(frozen=True)
class ImageConfig:
    """The parts of the image config that oci2disk uses."""

    os: str
    architecture: str
    variant: str
    diff_ids: tuple[str, ...]
    env: tuple[str, ...] = ()
    entrypoint: tuple[str, ...] = ()
    cmd: tuple[str, ...] = ()
    working_dir: str = ""
    user: str = ""
    created: str = ""

    @property
    def platform(self) -> Platform:
        return Platform(self.os, self.architecture, self.variant)

    @classmethod
    def from_json(cls, data: object, where: str) -> ImageConfig:
        data = _expect_mapping(data, where)
        rootfs = data.get("rootfs")
        if not isinstance(rootfs, Mapping) or not isinstance(rootfs.get("diff_ids"), list):
            raise ImageError(f"{where}: image config has no rootfs.diff_ids")
        diff_ids = _expect_strings(rootfs["diff_ids"], f"{where} rootfs.diff_ids")
        for diff_id in diff_ids:
            check_digest_syntax(diff_id, f"{where} rootfs.diff_ids")
        cfg = _expect_mapping(data.get("config") or {}, f"{where} config")
        return cls(
            os=str(data.get("os", "")),
            architecture=str(data.get("architecture", "")),
            variant=str(data.get("variant", "")),
            diff_ids=diff_ids,
            env=_expect_strings(cfg.get("Env"), f"{where} config.Env"),
            entrypoint=_expect_strings(cfg.get("Entrypoint"), f"{where} config.Entrypoint"),
            cmd=_expect_strings(cfg.get("Cmd"), f"{where} config.Cmd"),
            working_dir=str(cfg.get("WorkingDir") or ""),
            user=str(cfg.get("User") or ""),
            created=str(data.get("created") or ""),
        )


@dataclass(frozen=True)
class OciImage:
    """One image manifest inside an OCI layout directory."""

    layout: Path
    manifest: Descriptor
    config_descriptor: Descriptor
    config: ImageConfig
    layers: tuple[Descriptor, ...]

    @property
    def digest(self) -> str:
        return self.manifest.digest

    def blob_path(self, digest: str) -> Path:
        return blob_path(self.layout, digest)


def check_digest_syntax(digest: str, where: str) -> None:
    algo, _, hexpart = digest.partition(":")
    if algo != "sha256" or len(hexpart) != 64 or not all(c in "0123456789abcdef" for c in hexpart):
        raise ImageError(
            f"{where}: unsupported or malformed digest {digest!r} (want sha256:<64 hex>)"
        )


def blob_path(layout: Path, digest: str) -> Path:
    check_digest_syntax(digest, str(layout))
    algo, _, hexpart = digest.partition(":")
    return layout / "blobs" / algo / hexpart


# Blobs whose digest this process computed itself (while writing or verifying them),
# keyed by file identity, so a multi-GB layer is hashed once per run, not once per reader.
_VERIFIED: dict[tuple[int, int, int, int], str] = {}


def _identity(path: Path) -> tuple[int, int, int, int]:
    st = path.stat()
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


def _expect_mapping(value: object, where: str) -> Mapping[str, Any]:
    if not isinstance(value, Mapping):
        raise ImageError(
            f"{where}: expected a JSON object, found {type(value).__name__}",
            hint="the layout is corrupt or was not written by an OCI tool",
        )
    return value


def _expect_list(value: object, where: str) -> list[Any]:
    if value is None:
        return []
    if not isinstance(value, list):
        raise ImageError(
            f"{where}: expected a JSON array, found {type(value).__name__}",
            hint="the layout is corrupt or was not written by an OCI tool",
        )
    return value


def _expect_strings(value: object, where: str) -> tuple[str, ...]:
    items = _expect_list(value, where)
    if not all(isinstance(item, str) for item in items):
        raise ImageError(f"{where}: expected a list of strings")
    return tuple(items)


def remember_verified(path: Path, digest: str) -> None:
    _VERIFIED[_identity(path)] = digest


def verify_blob(layout: Path, desc: Descriptor) -> Path:
    """Check a blob's size and sha256 against its descriptor; return its path."""
    with open_verified_blob(layout, desc):
        return blob_path(layout, desc.digest)


def _open_blob(layout: Path, digest: str) -> io.BufferedReader:
    """Open a blob that must be a regular file; a FIFO, device or directory is refused
    before anything reads it (a FIFO would block the open, and its reads, forever)."""
    path = blob_path(layout, digest)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        raise ImageError(f"{layout}: blob {digest} is missing") from None
    except OSError as exc:
        raise ImageError(f"{layout}: cannot open blob {digest} ({exc.strerror})") from None
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        os.close(fd)
        what = "a directory" if stat.S_ISDIR(st.st_mode) else "not a regular file"
        raise ImageError(
            f"{layout}: blob {digest} is {what}",
            hint="a layout's blobs are plain files; export the image again",
        )
    flags = fcntl.fcntl(fd, fcntl.F_GETFL)
    fcntl.fcntl(fd, fcntl.F_SETFL, flags & ~os.O_NONBLOCK)
    return io.open(fd, "rb", closefd=True)  # noqa: UP020  # typed as BufferedReader


def open_verified_blob(layout: Path, desc: Descriptor) -> IO[bytes]:
    """Open a blob and check its size and sha256 through the open file.

    The caller goes on reading the very file that was checked, even if the blob's name
    is replaced meanwhile. The file is positioned at its start.
    """
    f = _open_blob(layout, desc.digest)
    try:
        size = os.fstat(f.fileno()).st_size
        if size != desc.size:
            raise ImageError(
                f"{layout}: blob {desc.digest} is {size} bytes, its descriptor says {desc.size}",
                hint="the layout is truncated or corrupt; export the image again",
            )
        st = os.fstat(f.fileno())
        identity = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
        if _VERIFIED.get(identity) == desc.digest:
            return f  # hashed by this process already (written by LayoutWriter)
        actual = "sha256:" + hashlib.file_digest(f, "sha256").hexdigest()
        _VERIFIED[identity] = actual
        if actual != desc.digest:
            raise ImageError(
                f"{layout}: blob {desc.digest} has digest {actual}",
                hint="the layout is corrupt; export the image again",
            )
        f.seek(0)
        return f
    except BaseException:
        f.close()
        raise


def read_json_blob(layout: Path, desc: Descriptor) -> dict[str, Any]:
    path = verify_blob(layout, desc)
    try:
        data = json.loads(path.read_bytes())
    except ValueError as exc:
        raise ImageError(f"{layout}: blob {desc.digest} is not valid JSON ({exc})") from None
    if not isinstance(data, dict):
        raise ImageError(f"{layout}: blob {desc.digest} is not a JSON object")
    return data


def open_layout(layout: Path, tag: str | None = None, platform: Platform | None = None) -> OciImage:
    """Resolve ``tag`` (or the only manifest) in an OCI layout to an image."""
    layout = Path(layout)
    index_file = layout / "index.json"
    if not (layout / "oci-layout").is_file() or not index_file.is_file():
        raise ImageError(
            f"{layout} is not an OCI image layout (no oci-layout or index.json)",
            hint="make one with `skopeo copy`, `buildah push ... oci:DIR`, or `oci2disk bootstrap`",
        )
    return resolve_index(index_file.read_bytes(), layout, tag, platform, os.fspath(index_file))


def resolve_index(
    data: bytes, layout: Path, tag: str | None, platform: Platform | None, where: str
) -> OciImage:
    """The image an OCI ``index.json`` (``data``, read from ``where``) names by ``tag``
    (or its only one), its blobs in ``layout``."""
    index_file = where
    try:
        index = json.loads(data)
    except ValueError as exc:
        raise ImageError(f"{index_file}: not valid JSON ({exc})") from None
    index = _expect_mapping(index, index_file)
    entries = [
        Descriptor.from_json(m, f"{index_file} manifests[{i}]")
        for i, m in enumerate(_expect_list(index.get("manifests"), f"{index_file} manifests"))
    ]
    if tag is not None:
        chosen = [d for d in entries if d.annotations.get(REF_NAME) == tag]
        if not chosen:
            names = sorted({d.annotations.get(REF_NAME, "") for d in entries} - {""})
            raise ImageError(
                f"{layout}: no image tagged {tag!r}",
                hint=f"tags present: {', '.join(names) or 'none'}",
            )
        entries = chosen
    if not entries:
        raise ImageError(f"{index_file}: the layout holds no images")
    if len(entries) > 1 and platform is None:
        entries = [_pick_single(layout, entries)]
    return _resolve(layout, entries, platform, index_file)


def _pick_single(layout: Path, entries: list[Descriptor]) -> Descriptor:
    if all(d.platform is not None for d in entries):
        host = host_platform()
        for d in entries:
            assert d.platform is not None
            if d.platform.matches(host):
                return d
    names = sorted({d.annotations.get(REF_NAME, "") for d in entries} - {""})
    raise ImageError(
        f"{layout}: the layout holds {len(entries)} images; say which one",
        hint=f"use oci:{layout}:TAG with one of: {', '.join(names) or '(untagged)'}",
    )


def _resolve(
    layout: Path, entries: list[Descriptor], platform: Platform | None, where: str
) -> OciImage:
    if platform is not None and len(entries) > 1:
        entries = [_by_platform(entries, platform, where)]
    desc = entries[0]
    if desc.media_type in INDEX_TYPES:
        nested = read_json_blob(layout, desc)
        children = [
            Descriptor.from_json(m, f"{desc.digest} manifests[{i}]")
            for i, m in enumerate(_expect_list(nested.get("manifests"), f"{desc.digest} manifests"))
        ]
        children = [c for c in children if c.media_type in MANIFEST_TYPES or not c.media_type]
        want = platform or host_platform()
        return _resolve(layout, [_by_platform(children, want, desc.digest)], None, desc.digest)
    return load_manifest(layout, desc)


def _by_platform(entries: list[Descriptor], want: Platform, where: str) -> Descriptor:
    for d in entries:
        if d.platform is not None and d.platform.matches(want):
            return d
    present = sorted(str(d.platform) for d in entries if d.platform is not None)
    raise ImageError(
        f"{where}: no image for platform {want}",
        hint=f"platforms present: {', '.join(present) or 'none recorded'}",
    )


def load_manifest(layout: Path, desc: Descriptor) -> OciImage:
    manifest = read_json_blob(layout, desc)
    where = f"manifest {desc.digest}"
    if "config" not in manifest:
        raise ImageError(f"{layout}: {where} has no config")
    config_desc = Descriptor.from_json(manifest["config"], f"{where} config")
    layers = tuple(
        Descriptor.from_json(layer, f"{where} layers[{i}]")
        for i, layer in enumerate(_expect_list(manifest.get("layers"), f"{where} layers"))
    )
    for layer in layers:
        if layer.media_type not in LAYER_COMPRESSION:
            raise ImageError(
                f"{layout}: layer {layer.digest} has media type {layer.media_type!r}, "
                "which oci2disk cannot read",
                hint="supported: tar, tar+gzip and tar+zstd layers (OCI and Docker types)",
            )
    config = ImageConfig.from_json(
        read_json_blob(layout, config_desc), f"config {config_desc.digest}"
    )
    if len(config.diff_ids) != len(layers):
        raise ImageError(
            f"{layout}: {where} has {len(layers)} layers but its config lists "
            f"{len(config.diff_ids)} diff_ids"
        )
    return OciImage(layout, desc, config_desc, config, layers)


def host_platform() -> Platform:
    arch = Arch.lookup(os.uname().machine)
    if arch is None:
        return Platform("linux", os.uname().machine)
    return Platform("linux", arch.oci, arch.variant)


# ---------------------------------------------------------------- writing layouts


class BlobTap(Protocol):
    """Sees a blob's bytes while it is stored (the cache indexes layers so)."""

    def feed(self, chunk: bytes, /) -> None: ...

    def close(self, desc: Descriptor | None, /) -> None: ...


# Makes a tap for each uncompressed layer of an archive being read.
TapFactory = Callable[[], BlobTap]


class LayoutWriter:
    """Builds an OCI layout in a directory; blobs are content addressed."""

    def __init__(self, layout: Path) -> None:
        self.layout = Path(layout)
        (self.layout / "blobs" / "sha256").mkdir(parents=True, exist_ok=True)
        (self.layout / "oci-layout").write_text('{"imageLayoutVersion":"1.0.0"}')

    def add_bytes(self, data: bytes, media_type: str) -> Descriptor:
        digest = "sha256:" + hashlib.sha256(data).hexdigest()
        target = blob_path(self.layout, digest)
        if not target.exists():
            # A unique temporary name: runs sharing a cache write the same blobs at once.
            fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=".in-")
            with os.fdopen(fd, "wb") as out:
                out.write(data)
            os.chmod(tmp, 0o644)
            os.replace(tmp, target)
        return Descriptor(media_type, digest, len(data))

    def add_stream(self, stream: IO[bytes], media_type: str) -> Descriptor:
        return self.add_chunks(iter(lambda: stream.read(CHUNK), b""), media_type)

    def add_chunks(
        self, chunks: Iterable[bytes], media_type: str, tap: BlobTap | None = None
    ) -> Descriptor:
        """Store a blob arriving in pieces; it is hashed and written on another thread
        while the next piece is read. ``tap`` sees every piece too, then the blob's
        descriptor (None when storing failed)."""
        fd, tmpname = tempfile.mkstemp(dir=self.layout / "blobs" / "sha256", prefix=".in-")
        desc: Descriptor | None = None
        try:
            with os.fdopen(fd, "wb") as out:
                copier = HashingCopier(out)
                try:
                    for chunk in chunks:
                        if tap is not None:
                            tap.feed(chunk)
                        copier.write(chunk)
                finally:
                    copier.close()
                hexdigest, size = copier.finish()
            desc = Descriptor(media_type, "sha256:" + hexdigest, size)
            target = blob_path(self.layout, desc.digest)
            os.replace(tmpname, target)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmpname)
            raise
        finally:
            if tap is not None:
                tap.close(desc)
        remember_verified(target, desc.digest)
        return desc

    def add_image(
        self,
        config: Mapping[str, Any],
        layers: list[Descriptor],
        tag: str | None,
    ) -> Descriptor:
        config_desc = self.add_bytes(canonical_json(config), MT_OCI_CONFIG)
        manifest = {
            "schemaVersion": 2,
            "mediaType": MT_OCI_MANIFEST,
            "config": config_desc.to_json(),
            "layers": [layer.to_json() for layer in layers],
        }
        annotations = {REF_NAME: tag} if tag else {}
        desc = self.add_bytes(canonical_json(manifest), MT_OCI_MANIFEST)
        desc = Descriptor(desc.media_type, desc.digest, desc.size, annotations)
        self._add_to_index(desc)
        return desc

    def _add_to_index(self, desc: Descriptor) -> None:
        index_file = self.layout / "index.json"
        manifests: list[dict[str, Any]] = []
        if index_file.exists():
            manifests = json.loads(index_file.read_bytes()).get("manifests", [])
        tag = desc.annotations.get(REF_NAME)
        if tag:  # a tag names one image: the new one replaces the old
            manifests = [m for m in manifests if (m.get("annotations") or {}).get(REF_NAME) != tag]
        manifests.append(desc.to_json())
        index = {"schemaVersion": 2, "mediaType": MT_OCI_INDEX, "manifests": manifests}
        tmp = index_file.with_name("index.json.tmp")
        tmp.write_bytes(canonical_json(index))
        tmp.replace(index_file)


def canonical_json(data: Any) -> bytes:
    return json.dumps(data, sort_keys=True, separators=(",", ":")).encode()


_MAGIC_MEDIA_TYPES = (
    (b"\x1f\x8b", MT_OCI_LAYER_GZIP),
    (b"\x28\xb5\x2f\xfd", MT_OCI_LAYER_ZSTD),
)


def layout_from_docker_archive(stream: IO[bytes], layout: Path, tag: str | None) -> OciImage:
    """Turn a ``docker save`` tar (read as a stream) into an OCI layout (see
    :func:`image_from_docker_archive`), its image listed in the layout's index."""
    writer = LayoutWriter(layout)
    desc = _read_docker_archive(stream, writer)
    desc = Descriptor(desc.media_type, desc.digest, desc.size, {REF_NAME: tag} if tag else {})
    writer._add_to_index(desc)
    return open_layout(layout, tag)


def image_from_docker_archive(
    stream: IO[bytes], layout: Path, taps: TapFactory | None = None
) -> OciImage:
    """Add the image of a ``docker save`` tar to a layout shared by many images (the
    cache): its blobs only, the index untouched. ``taps`` makes a tap that sees each
    uncompressed layer as it arrives."""
    return load_manifest(layout, _read_docker_archive(stream, LayoutWriter(layout), taps))


def _read_docker_archive(
    stream: IO[bytes], writer: LayoutWriter, taps: TapFactory | None = None
) -> Descriptor:
    """Write a ``docker save`` tar's blobs and an OCI manifest; return the manifest's
    descriptor.

    Layers are kept byte for byte: an uncompressed layer becomes an OCI ``tar`` layer
    whose digest equals its diff_id, a gzip or zstd one (``docker load`` takes those
    too) keeps its compression. ``docker save`` writes a layer that occurs twice once,
    and the second name as a symlink to the first; such links are followed inside
    the archive only. The config is kept byte for byte.
    """
    by_name: dict[str, Descriptor] = {}
    links: dict[str, str] = {}
    manifest_json: list[dict[str, Any]] | None = None
    reader = ForwardReader(stream)
    with _archive_errors("not a readable docker-archive"):
        for member in _archive_members(reader):
            name = os.path.normpath(member.name)
            if member.issym() or member.islnk():
                base = os.path.dirname(name) if member.issym() else ""
                links[name] = os.path.normpath(os.path.join(base, member.linkname))
                continue
            if not member.isfile() or member.sparse is not None:
                continue
            if name == "manifest.json":
                manifest_json = json.loads(_read_exactly(reader, member.size))
            elif name.endswith(".json") and "/" not in name and name != "repositories":
                by_name[name] = writer.add_bytes(_read_exactly(reader, member.size), MT_OCI_CONFIG)
            elif name.endswith(".tar") or name.startswith("blobs/"):
                by_name[name] = _store_member(reader, member.size, writer, taps)
    if not manifest_json or not isinstance(manifest_json, list):
        raise ImageError("docker-archive has no manifest.json", hint="make it with `docker save`")

    def find(name: str) -> Descriptor | None:
        name = os.path.normpath(name)
        for _ in range(len(links) + 1):  # a chain of links, but never a loop
            if name in by_name:
                return by_name[name]
            if name not in links:
                return None
            name = links[name]
        return None

    entry = manifest_json[0]
    config_desc = find(entry["Config"])
    layer_descs = [find(p) for p in entry["Layers"]]
    if config_desc is None or any(d is None for d in layer_descs):
        raise ImageError("docker-archive is incomplete: manifest.json names missing files")
    layers = [d for d in layer_descs if d is not None]
    # Docker >= 25 stores the config under blobs/ too, beside the layers.
    config_desc = Descriptor(MT_OCI_CONFIG, config_desc.digest, config_desc.size)
    manifest = {
        "schemaVersion": 2,
        "mediaType": MT_OCI_MANIFEST,
        "config": config_desc.to_json(),
        "layers": [layer.to_json() for layer in layers],
    }
    return writer.add_bytes(canonical_json(manifest), MT_OCI_MANIFEST)


@contextlib.contextmanager
def _archive_errors(what: str) -> Iterator[None]:
    """An archive that cannot be read is an ImageError starting with ``what``; a full
    workspace stays an OSError (the archive is fine)."""
    try:
        yield
    except (tarfile.TarError, OSError, ValueError, EOFError) as exc:
        if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
            raise
        raise ImageError(f"{what} ({exc})") from None


def _archive_members(reader: ForwardReader) -> Iterator[tarfile.TarInfo]:
    """The members of an archive arriving through ``reader``. tarfile reads only the
    headers; the caller reads a member's data from ``reader`` itself, in 1 MiB pieces
    (tarfile's stream mode reads 10 KiB at a time and copied every byte several times:
    it took longer than the engine took to send the image)."""
    tar = tarfile.TarFile(fileobj=cast(IO[bytes], reader), mode="r")
    for member in tar:
        tar.members = []  # type: ignore[attr-defined]  # nothing to remember
        yield member


def _read_exactly(reader: ForwardReader, size: int) -> bytes:
    if size > MAX_JSON:
        raise ImageError(f"a JSON file of {size} bytes in a docker-archive is not an image's")
    data = reader.read(size)
    if len(data) != size:
        raise EOFError("the archive ends inside a file")
    return data


def _store_member(
    reader: ForwardReader, size: int, writer: LayoutWriter, taps: TapFactory | None
) -> Descriptor:
    """A layer (or Docker >= 25's blob) of a docker-archive, read in pieces into a blob;
    a gzip or zstd layer keeps its compression (``docker load`` takes those too)."""
    first = reader.read(min(size, CHUNK))
    media_type = next(
        (mt for prefix, mt in _MAGIC_MEDIA_TYPES if first.startswith(prefix)), MT_OCI_LAYER
    )

    def chunks() -> Iterator[bytes]:
        left = size - len(first)
        if first:
            yield first
        while left > 0:
            chunk = reader.read(min(CHUNK, left))
            if not chunk:
                raise EOFError("the archive ends inside a layer")
            left -= len(chunk)
            yield chunk
        if len(first) < min(size, CHUNK):
            raise EOFError("the archive ends inside a layer")

    # An uncompressed layer is indexed as it arrives; a config or manifest (JSON) is not.
    looks_like_tar = media_type == MT_OCI_LAYER and first.lstrip()[:1] not in (b"{", b"[")
    tap = taps() if taps is not None and looks_like_tar else None
    return writer.add_chunks(chunks(), media_type, tap)


def image_from_oci_archive(
    stream: IO[bytes],
    layout: Path,
    where: str,
    platform: Platform | None = None,
    taps: TapFactory | None = None,
) -> OciImage:
    """Read an ``oci-archive`` (a tarred OCI layout) as a stream: each blob is hashed
    (it must match its name) and stored in ``layout`` as it arrives, the archive's
    index.json is read, and the image it names is returned. Only ``blobs/sha256/*``
    and ``index.json`` are read; links, devices and any other path are skipped."""
    writer = LayoutWriter(layout)
    index: bytes | None = None
    reader = ForwardReader(stream)
    with _archive_errors(f"{where}: not a readable oci-archive"):
        for member in _archive_members(reader):
            name = os.path.normpath(member.name.lstrip("/"))
            if not member.isfile() or member.sparse is not None:
                continue
            if name == "index.json":
                index = _read_exactly(reader, member.size)
            elif name.startswith("blobs/sha256/") and len(name) == len("blobs/sha256/") + 64:
                desc = _store_member(reader, member.size, writer, taps)
                if desc.digest != "sha256:" + name.rsplit("/", 1)[1]:
                    raise ImageError(
                        f"{where}: the blob stored as {name} has digest {desc.digest}",
                        hint="the archive is corrupt or was altered; export the image again",
                    )
    if index is None:
        raise ImageError(
            f"{where}: not an oci-archive (it has no index.json)",
            hint="make one with `skopeo copy ... oci-archive:FILE` or `buildah push`",
        )
    return resolve_index(index, layout, None, platform, f"{where}: index.json")


def layout_from_rootfs_tar(
    tar_path: Path,
    layout: Path,
    tag: str | None,
    *,
    platform: Platform | None = None,
    config: Mapping[str, Any] | None = None,
) -> OciImage:
    """Wrap one flat rootfs tarball (gzip or plain) as a single-layer OCI image."""
    writer = LayoutWriter(layout)
    with tar_path.open("rb") as raw:
        magic = raw.read(2)
        raw.seek(0)
        stream: IO[bytes] = gzip.GzipFile(fileobj=raw) if magic == b"\x1f\x8b" else raw  # type: ignore[assignment]
        layer = writer.add_stream(stream, MT_OCI_LAYER)
    plat = platform or host_platform()
    image_config: dict[str, Any] = {
        "architecture": plat.architecture,
        "os": plat.os,
        "rootfs": {"type": "layers", "diff_ids": [layer.digest]},
        "config": dict(
            config
            or {
                "Env": ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"],
                "Cmd": ["/bin/bash"],
            }
        ),
    }
    if plat.variant:
        image_config["variant"] = plat.variant
    writer.add_image(image_config, [layer], tag)
    return open_layout(layout, tag)


def copy_layout_image(image: OciImage, dest: Path, tag: str | None) -> OciImage:
    """Copy one image (its manifest, config and layers) into another layout (``--add``
    changes the copy, never the user's layout)."""
    writer = LayoutWriter(dest)
    for desc in (image.manifest, image.config_descriptor, *image.layers):
        target = blob_path(dest, desc.digest)
        if not target.exists():
            shutil.copyfile(image.blob_path(desc.digest), target)
    annotations = {REF_NAME: tag} if tag else {}
    writer._add_to_index(
        Descriptor(
            image.manifest.media_type, image.manifest.digest, image.manifest.size, annotations
        )
    )
    return open_layout(dest, tag)
