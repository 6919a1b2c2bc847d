"""The content-addressed cache: layers and images by digest, finished artifacts by key.

The cache folder (``${XDG_CACHE_HOME:-~/.cache}/oci2disk``) is itself an OCI image
layout, so an image rebuilt from it is an ordinary :class:`OciImage` that flatten reads
in place::

    oci-layout
    blobs/sha256/<hex>        layers, uncompressed (by diff_id), configs and
                              manifests, by digest
    images/<config hex>       "<manifest digest> <size>": the image whose config the
                              engine reports as the image Id (``docker image inspect``)
    indexes/<layer hex>       the layer's tar headers (oci.layers.LayerIndex), made as
                              it arrived or when it was first flattened
    artifacts/<key>/          finished outputs and meta.json; key = sha256 of (image
                              digest, options, oci2disk version)
    lock                      flock: shared while a run uses the cache, exclusive to evict

Reading verifies: every blob of an image is hashed before it is read (a blob that
does not match is deleted and the image read afresh from its source; inside
:func:`deferred_checks` the layers are hashed by :meth:`Cache.checked`, when a run
is about to flatten them); a layer index carries the sha256 of its body; an artifact
is used only if each file's size, mtime, ctime and inode are those recorded when it
was stored (any write to it changes them; ``oci2disk cache --verify`` rehashes).
Writes go to temporary names and are renamed into place, so two runs sharing a cache
never see half an entry. Least recently used entries are evicted above a size limit.

Host tools: none.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import logging
import os
import shutil
import stat
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping
from contextvars import ContextVar
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from oci2disk.bytestreams import copy_sparse
from oci2disk.compression import DECOMPRESS_ERRORS
from oci2disk.errors import ImageError, Oci2DiskError
from oci2disk.oci.layers import (
    LayerIndex,
    StreamIndexer,
    diff_id_error,
    dump_index,
    load_index,
    open_layer,
)
from oci2disk.oci.layout import (
    LAYER_COMPRESSION,
    MT_OCI_LAYER,
    MT_OCI_MANIFEST,
    Descriptor,
    LayoutWriter,
    OciImage,
    Platform,
    blob_path,
    canonical_json,
    image_from_docker_archive,
    image_from_oci_archive,
    load_manifest,
    verify_blob,
)

log = logging.getLogger("oci2disk.cache")

DEFAULT_MAX_BYTES = 10 << 30
MAX_SIZE_ENV = "OCI2DISK_CACHE_SIZE"
STALE_TEMP_SECONDS = 3600  # a temporary file this old belongs to a run that died
_FICLONE = 0x40049409


def default_root(env: Mapping[str, str] | None = None) -> Path:
    env = os.environ if env is None else env
    base = env.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "oci2disk"


def parse_size(text: str) -> int:
    """``10G``, ``512M``, ``1048576`` -> bytes."""
    text = text.strip().upper().removesuffix("B").removesuffix("I")
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
    scale = units.get(text[-1:], 1)
    number = text[:-1] if text[-1:] in units else text
    try:
        value = int(float(number) * scale)
    except ValueError:
        raise Oci2DiskError(
            f"cache size {text!r} is not a size", hint='write it like "10G" or "512M"'
        ) from None
    if value < 0:
        raise Oci2DiskError(f"cache size {text!r} is negative")
    return value


def default_max_bytes(env: Mapping[str, str] | None = None) -> int:
    env = os.environ if env is None else env
    text = env.get(MAX_SIZE_ENV)
    return parse_size(text) if text else DEFAULT_MAX_BYTES


@dataclass(frozen=True)
class Usage:
    root: Path
    blobs: int
    blob_bytes: int
    images: int
    artifacts: int
    artifact_bytes: int

    @property
    def total(self) -> int:
        return self.blob_bytes + self.artifact_bytes


@dataclass(frozen=True)
class CachedArtifacts:
    """One artifacts entry: its folder and the meta data stored with it."""

    path: Path
    meta: Mapping[str, Any]

    def file(self, name: str) -> Path:
        return self.path / "files" / name


class Cache:
    def __init__(self, root: Path, max_bytes: int = DEFAULT_MAX_BYTES) -> None:
        self.root = Path(root)
        self.max_bytes = max_bytes
        self.blobs = self.root / "blobs" / "sha256"
        self.images = self.root / "images"
        self.artifacts = self.root / "artifacts"
        self.indexes = self.root / "indexes"
        self._lock_fd: int | None = None

    # ------------------------------------------------------------ sessions and locks

    @contextlib.contextmanager
    def session(self) -> Iterator[Cache]:
        """Hold the cache (shared with other runs) for one run; evict at the end."""
        for folder in (self.blobs, self.images, self.artifacts, self.indexes):
            folder.mkdir(parents=True, exist_ok=True)
        layout_file = self.root / "oci-layout"
        if not layout_file.exists():
            _write_atomic(layout_file, b'{"imageLayoutVersion":"1.0.0"}')
        fd = os.open(self.root / "lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        fcntl.flock(fd, fcntl.LOCK_SH)
        self._lock_fd = fd
        try:
            yield self
        finally:
            try:
                if self._exclusive(wait=False):
                    self.evict(self.max_bytes)
            finally:
                self._lock_fd = None
                os.close(fd)

    def _exclusive(self, *, wait: bool) -> bool:
        """Turn this run's shared lock into an exclusive one: only when no other run
        uses the cache (an entry it is reading is never removed under it)."""
        assert self._lock_fd is not None
        try:
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            return False
        return True

    # ---------------------------------------------------------------------- images

    def image(self, config_digest: str) -> OciImage | None:
        """The image whose config is ``config_digest``, every blob checked, or None.

        A pointer or blob that is missing or does not match its digest is removed, so
        the caller reads the image afresh and stores it again. Inside
        :func:`deferred_checks`, the layers (gigabytes) are checked later, by
        :meth:`checked`, and only if they are read at all.
        """
        pointer = self.images / _hex(config_digest)
        try:
            digest, _, size = pointer.read_text().strip().partition(" ")
            desc = Descriptor(MT_OCI_MANIFEST, digest, int(size))
        except (OSError, ValueError):
            return None
        try:
            image = load_manifest(self.root, desc)
            if image.config_descriptor.digest != config_digest:
                raise ImageError(f"cache: {pointer} names an image of another config")
            for layer in image.layers:
                self._touch(layer.digest)
                if not _DEFERRED.get():
                    verify_blob(self.root, layer)
                elif not blob_path(self.root, layer.digest).is_file():
                    raise ImageError(f"cache: layer {layer.digest} is missing")
        except (ImageError, ValueError) as exc:
            log.warning("cache: discarding a damaged entry (%s)", exc)
            self._discard_image(pointer, desc)
            return None
        self._touch(desc.digest)
        return image

    def checked(self, image: OciImage) -> bool:
        """Check the layers of an image read from this cache (each is hashed once per
        run); one that does not match its digest is removed with the image's entry,
        and False returned: the caller reads the image again from its source."""
        if image.layout != self.root:
            return True
        try:
            for layer in image.layers:
                verify_blob(self.root, layer)
        except ImageError as exc:
            log.warning("cache: discarding a damaged entry (%s)", exc)
            self._discard_image(self.images / _hex(image.config_descriptor.digest), image.manifest)
            return False
        return True

    def remember_image(self, image: OciImage) -> None:
        """Record ``image`` (its blobs already in the cache) under its config digest."""
        if image.layout != self.root:
            raise ValueError("the image's blobs are not in this cache")
        text = f"{image.manifest.digest} {image.manifest.size}\n"
        _write_atomic(self.images / _hex(image.config_descriptor.digest), text.encode())

    def add_docker_archive(self, stream: IO[bytes]) -> OciImage:
        """Read a ``docker save`` stream into the cache (each layer hashed and indexed
        as it arrives) and remember its image; a later run finds it by its config
        digest."""
        image = self.uncompressed(
            image_from_docker_archive(stream, self.root, lambda: _IndexTap(self))
        )
        self.remember_image(image)
        return image

    def add_oci_archive(self, stream: IO[bytes], where: str, platform: Platform | None) -> OciImage:
        """Read an oci-archive into the cache as it streams (blobs hashed against their
        names, uncompressed layers indexed) and remember its image."""
        image = self.uncompressed(
            image_from_oci_archive(stream, self.root, where, platform, lambda: _IndexTap(self))
        )
        self.remember_image(image)
        return image

    def uncompressed(self, image: OciImage) -> OciImage:
        """``image`` (its blobs in the cache) with every compressed layer stored
        uncompressed, by its diff_id: the flattener then reads each layer in place on
        every later run instead of decompressing it again (Docker >= 25 and registries
        send gzip or zstd layers)."""
        if image.layout != self.root:
            raise ValueError("the image's blobs are not in this cache")
        if all(LAYER_COMPRESSION[layer.media_type] == "none" for layer in image.layers):
            return image
        writer = LayoutWriter(self.root)
        layers: list[Descriptor] = []
        for index, desc in enumerate(image.layers):
            diff_id = image.config.diff_ids[index]
            if LAYER_COMPRESSION[desc.media_type] == "none":
                layers.append(desc)
                continue
            target = blob_path(self.root, diff_id)
            if not target.exists():
                with open_layer(image, desc) as stream:  # the blob's digest checked first
                    try:
                        written = writer.add_stream(stream, MT_OCI_LAYER)
                    except DECOMPRESS_ERRORS as exc:
                        raise ImageError(
                            f"layer {desc.digest}: cannot decompress it ({exc})",
                            hint="the layer blob is corrupt; export the image again",
                        ) from None
                if written.digest != diff_id:
                    _unlink_blob(self.root, written.digest)
                    raise diff_id_error(desc, index, written.digest, diff_id)
            layers.append(Descriptor(MT_OCI_LAYER, diff_id, target.stat().st_size))
        manifest = {
            "schemaVersion": 2,
            "mediaType": MT_OCI_MANIFEST,
            "config": image.config_descriptor.to_json(),
            "layers": [layer.to_json() for layer in layers],
        }
        return load_manifest(self.root, writer.add_bytes(canonical_json(manifest), MT_OCI_MANIFEST))

    def layer_index(self, digest: str) -> LayerIndex | None:
        """The stored index of the layer blob ``digest``; a damaged one is removed."""
        path = self.indexes / _hex(digest)
        try:
            data = path.read_bytes()
        except OSError:
            return None
        index = load_index(data)
        if index is None:
            log.warning("cache: discarding the damaged index of layer %s", digest)
            path.unlink(missing_ok=True)
            return None
        with contextlib.suppress(OSError):
            os.utime(path)
        return index

    def remember_index(self, digest: str, index: LayerIndex) -> None:
        with contextlib.suppress(OSError):  # a full disk costs a later run a scan
            _write_atomic(self.indexes / _hex(digest), dump_index(index))

    def _discard_image(self, pointer: Path, desc: Descriptor) -> None:
        pointer.unlink(missing_ok=True)
        try:
            image = load_manifest(self.root, desc)
        except (ImageError, ValueError):
            _unlink_blob(self.root, desc.digest)
            return
        for layer in image.layers:
            try:
                verify_blob(self.root, layer)
            except ImageError:
                _unlink_blob(self.root, layer.digest)

    def _touch(self, digest: str) -> None:
        with contextlib.suppress(OSError):
            os.utime(blob_path(self.root, digest))

    # ------------------------------------------------------------------- artifacts

    def artifacts_for(self, key: str) -> CachedArtifacts | None:
        """The stored artifacts under ``key`` if none was changed since it was stored."""
        entry = self.artifacts / key
        try:
            meta = json.loads((entry / "meta.json").read_bytes())
            for name, stamp in meta["files"].items():
                if _stamp(entry / "files" / name) != stamp["stamp"]:
                    raise ValueError(f"{name} changed since it was stored")
        except (OSError, ValueError, KeyError, TypeError) as exc:
            if entry.exists():
                log.warning("cache: discarding artifacts %s (%s)", key[:12], exc)
                _remove_tree(entry, self.artifacts)
            return None
        with contextlib.suppress(OSError):
            os.utime(entry)
        return CachedArtifacts(entry, meta)

    def store_artifacts(
        self,
        key: str,
        files: Mapping[str, tuple[Path, str]],
        meta: Mapping[str, Any],
        staged: Callable[[Path], Path | None] | None = None,
    ) -> None:
        """Store ``files`` (name -> (path, sha256)) under ``key``; a run that stores the
        same key at the same time wins or loses whole. ``staged`` gives a copy of a
        file made earlier in this cache (:meth:`staging_folder`), moved in instead."""
        tmp = Path(tempfile.mkdtemp(dir=self.artifacts, prefix=".in-"))
        try:
            stamps: dict[str, Any] = {}
            (tmp / "files").mkdir()
            for name, (path, sha256) in files.items():
                target = tmp / "files" / name
                copy = staged(path) if staged is not None else None
                if copy is not None:
                    os.rename(copy, target)
                else:
                    clone_file(path, target)
                os.chmod(target, 0o444)
                stamps[name] = {"sha256": sha256}
            for name in stamps:
                stamps[name]["stamp"] = _stamp(tmp / "files" / name)
            data = {**meta, "files": stamps, "stored": int(time.time())}
            (tmp / "meta.json").write_text(json.dumps(data, indent=1, sort_keys=True))
            try:
                os.rename(tmp, self.artifacts / key)
            except OSError as exc:
                if exc.errno not in (errno.EEXIST, errno.ENOTEMPTY):
                    raise
                _remove_tree(tmp, self.artifacts)  # another run stored it first
        except BaseException:
            _remove_tree(tmp, self.artifacts)
            raise

    def staging_folder(self) -> Path:
        """A folder for copies of outputs made before they are stored (removed by
        :meth:`discard_staging`, or by eviction when its run died)."""
        return Path(tempfile.mkdtemp(dir=self.artifacts, prefix=".in-"))

    def discard_staging(self, folder: Path) -> None:
        _remove_tree(folder, self.artifacts)

    def placed(self, key: str) -> dict[str, list[int]]:
        """Where this entry's files were last put (path -> stamp of the file there)."""
        try:
            data = json.loads((self.artifacts / key / "placed.json").read_bytes())
        except (OSError, ValueError):
            return {}
        return data if isinstance(data, dict) else {}

    def remember_placed(self, key: str, paths: list[Path]) -> None:
        """Record the stamps of ``paths``, copies of this entry's files just put there:
        a later run finds them untouched (same inode, size, mtime and ctime) and leaves
        them be. Two runs recording at once lose one record, never the entry."""
        entry = self.artifacts / key
        if not entry.is_dir():
            return
        placed = self.placed(key)
        for path in paths:
            placed[os.fspath(path)] = _stamp(path)
        with contextlib.suppress(OSError):
            _write_atomic(entry / "placed.json", json.dumps(placed, sort_keys=True).encode())

    def untouched(self, key: str, path: Path) -> bool:
        """Whether ``path`` is still the very file this entry last put there."""
        try:
            return self.placed(key).get(os.fspath(path)) == _stamp(path)
        except OSError:
            return False

    # -------------------------------------------------------- usage and eviction

    def usage(self) -> Usage:
        blobs = [p for p in _files(self.blobs) if not p.name.startswith(".")]
        artifacts = [p for p in _dirs(self.artifacts) if not p.name.startswith(".")]
        return Usage(
            self.root,
            len(blobs),
            sum(_size(p) for p in blobs),
            len([p for p in _files(self.images) if not p.name.startswith(".")]),
            len(artifacts),
            sum(_tree_size(p) for p in artifacts),
        )

    def evict(self, max_bytes: int) -> int:
        """Remove least recently used entries until the cache holds at most
        ``max_bytes``; return the bytes freed. Needs the exclusive lock."""
        now = time.time()
        entries: list[tuple[float, int, Path]] = []
        for folder in (self.blobs, self.artifacts, self.images, self.indexes):
            for path in _children(folder):
                try:
                    st = path.lstat()
                except OSError:
                    continue
                if path.name.startswith("."):  # a temporary of a run that died
                    if now - st.st_mtime > STALE_TEMP_SECONDS:
                        _remove_tree(path, folder)
                    continue
                if folder not in (self.images, self.indexes):  # dropped with their blobs
                    size = _tree_size(path) if stat.S_ISDIR(st.st_mode) else st.st_size
                    entries.append((st.st_mtime, size, path))
        total = sum(size for _, size, _ in entries)
        freed = 0
        for _, size, path in sorted(entries):
            if total - freed <= max_bytes:
                break
            _remove_tree(path, path.parent)
            freed += size
        if freed:
            self._drop_dangling_images()
        return freed

    def _drop_dangling_images(self) -> None:
        for index in _files(self.indexes):
            if not index.name.startswith(".") and not (self.blobs / index.name).exists():
                index.unlink(missing_ok=True)
        for pointer in _files(self.images):
            try:
                digest = pointer.read_text().split()[0]
                if blob_path(self.root, digest).exists():
                    continue
            except (OSError, IndexError, ImageError):
                pass
            pointer.unlink(missing_ok=True)

    def verify_all(self) -> list[str]:
        """Rehash every blob and stored artifact; remove and name what does not match."""
        bad: list[str] = []
        for path in _files(self.blobs):
            if path.name.startswith("."):
                continue
            with path.open("rb") as f:
                actual = hashlib.file_digest(f, "sha256").hexdigest()
            if actual != path.name:
                bad.append(os.fspath(path))
                path.unlink(missing_ok=True)
        for index in _files(self.indexes):
            if not index.name.startswith(".") and load_index(index.read_bytes()) is None:
                bad.append(os.fspath(index))
                index.unlink(missing_ok=True)
        for entry in _dirs(self.artifacts):
            try:
                meta = json.loads((entry / "meta.json").read_bytes())
                for name, info in meta["files"].items():
                    with (entry / "files" / name).open("rb") as f:
                        if hashlib.file_digest(f, "sha256").hexdigest() != info["sha256"]:
                            raise ValueError(name)
            except (OSError, ValueError, KeyError, TypeError):
                bad.append(os.fspath(entry))
                _remove_tree(entry, self.artifacts)
        self._drop_dangling_images()
        return bad

    @contextlib.contextmanager
    def exclusive(self) -> Iterator[Cache]:
        """The cache to itself, waiting for other runs (for ``oci2disk cache --prune``)."""
        with self.session():
            self._exclusive(wait=True)
            yield self


class _IndexTap:
    """Indexes an uncompressed layer while it is stored; keeps the index when the
    layer was stored whole."""

    def __init__(self, cache: Cache) -> None:
        self.cache = cache
        self.indexer = StreamIndexer()

    def feed(self, chunk: bytes) -> None:
        self.indexer.feed(chunk)

    def close(self, desc: Descriptor | None) -> None:
        index = self.indexer.finish()
        if desc is not None and index is not None:
            self.cache.remember_index(desc.digest, index)


# Set while an image is opened for a run that may re-use stored outputs: its layers
# are then checked only when they are read (Cache.checked).
_DEFERRED: ContextVar[bool] = ContextVar("oci2disk_cache_deferred", default=False)


@contextlib.contextmanager
def deferred_checks() -> Iterator[None]:
    """Open images from the cache without hashing their layers yet: a run whose
    outputs are stored never reads them. The caller calls :meth:`Cache.checked`
    before it reads the layers, and opens the image again when that says False."""
    token = _DEFERRED.set(True)
    try:
        yield
    finally:
        _DEFERRED.reset(token)


# The cache the running command uses (set by the command line), None when off.
_ACTIVE: ContextVar[Cache | None] = ContextVar("oci2disk_cache", default=None)


def active() -> Cache | None:
    return _ACTIVE.get()


@contextlib.contextmanager
def using(cache: Cache | None) -> Iterator[Cache | None]:
    """Make ``cache`` the active one for the duration (None: run without a cache). A
    cache folder that cannot be made is a warning, and the run goes on without it."""
    if cache is None:
        token = _ACTIVE.set(None)
        try:
            yield None
        finally:
            _ACTIVE.reset(token)
        return
    try:
        session = cache.session()
        opened = session.__enter__()
    except OSError as exc:
        log.info("cache: %s is not usable (%s); running without it", cache.root, exc)
        with using(None):
            yield None
        return
    token = _ACTIVE.set(opened)
    try:
        yield opened
    except BaseException as exc:
        _ACTIVE.reset(token)
        if not session.__exit__(type(exc), exc, exc.__traceback__):
            raise
    else:
        _ACTIVE.reset(token)
        session.__exit__(None, None, None)


# ------------------------------------------------------------------------ helpers


def clone_file(source: Path, target: Path) -> None:
    """Copy ``source`` to a new file ``target``: a copy-on-write clone where the
    filesystem has them (btrfs, XFS), else a copy that keeps holes (sparse disks)."""
    with source.open("rb") as src, target.open("xb") as dst:
        try:
            fcntl.ioctl(dst.fileno(), _FICLONE, src.fileno())
            return
        except OSError:
            pass
        size = os.fstat(src.fileno()).st_size
        os.ftruncate(dst.fileno(), size)
        copy_sparse(src.fileno(), dst.fileno(), size)


def _stamp(path: Path) -> list[int]:
    st = path.stat()
    return [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino]


def _hex(digest: str) -> str:
    algo, _, hexpart = digest.partition(":")
    if algo != "sha256" or len(hexpart) != 64:
        raise ImageError(f"unsupported digest {digest!r}")
    return hexpart


def _write_atomic(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)


def _unlink_blob(root: Path, digest: str) -> None:
    with contextlib.suppress(OSError, ImageError):
        blob_path(root, digest).unlink(missing_ok=True)


def _children(folder: Path) -> list[Path]:
    try:
        return list(folder.iterdir())
    except OSError:
        return []


def _files(folder: Path) -> list[Path]:
    return [p for p in _children(folder) if p.is_file()]


def _dirs(folder: Path) -> list[Path]:
    return [p for p in _children(folder) if p.is_dir()]


def _size(path: Path) -> int:
    try:
        return path.lstat().st_blocks * 512
    except OSError:
        return 0


def _tree_size(path: Path) -> int:
    if not path.is_dir():
        return _size(path)
    return sum(_size(Path(top) / name) for top, _, names in os.walk(path) for name in names)


def _remove_tree(path: Path, inside: Path) -> None:
    """Remove a cache entry (file or folder); only ever below ``inside``."""
    if path.parent != inside:
        raise ValueError(f"{path} is not an entry of {inside}")
    if path.is_dir() and not path.is_symlink():
        for top, dirs, _ in os.walk(path):
            for name in dirs:  # entries are stored read-only
                with contextlib.suppress(OSError):
                    os.chmod(os.path.join(top, name), 0o755)
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(OSError):
            path.unlink()
