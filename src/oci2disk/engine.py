"""The Docker Engine, through docker-py: which engine, and one client for building,
saving and importing.

``DOCKER_HOST`` picks the engine as the docker CLI does: ``unix:///path`` (the default,
``/var/run/docker.sock``), ``tcp://HOST:PORT`` (TLS when ``DOCKER_TLS_VERIFY`` is set,
with the certificates in ``DOCKER_CERT_PATH``, as ``docker --tlsverify`` uses them) and
``ssh://[USER@]HOST[:PORT]`` (docker-py's paramiko transport: the remote user runs
``docker system dial-stdio``; keys from ssh-agent or ``~/.ssh``). Builds, ``docker-daemon:``
sources and ``bootstrap --to docker-daemon:`` all go to that engine. An engine that does
not answer is an error naming the address and where it came from.

``build/docker.py`` builds with it; ``oci/`` reads ``docker-daemon:`` images and pulls
with it when skopeo is missing. Images leave the engine as ``docker save`` streams.

Host tools: a Docker Engine, local or remote (Debian package docker.io).
"""

from __future__ import annotations

import importlib.util
import io
import logging
import os
import re
import urllib.parse
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from oci2disk import progress
from oci2disk.errors import BuildError, ImageError, Oci2DiskError
from oci2disk.oci import cache
from oci2disk.oci.layout import OciImage, layout_from_docker_archive

log = logging.getLogger("oci2disk.engine")

DEFAULT_HOST = "unix:///var/run/docker.sock"


def client() -> Any:
    """A low-level docker-py client for the engine DOCKER_HOST names (local by default)."""
    return connect()


def short(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[-1] if text else type(exc).__name__


def engine_available() -> bool:
    try:
        client()
    except Oci2DiskError:
        return False
    return True


@dataclass(frozen=True)
class EngineAddress:
    url: str  # unix:///..., tcp://host:port, ssh://user@host:port
    source: str  # "DOCKER_HOST" or "the default socket"
    tls: bool = False
    cert_path: str | None = None

    @property
    def scheme(self) -> str:
        return self.url.partition("://")[0] if "://" in self.url else "unix"

    def describe(self) -> str:
        return f"{self.url} ({self.source})"


def engine_address(env: Mapping[str, str] | None = None) -> EngineAddress:
    """The engine ``DOCKER_HOST`` names, or the local default socket."""
    env = os.environ if env is None else env
    url = env.get("DOCKER_HOST", "").strip()
    if not url:
        return EngineAddress(DEFAULT_HOST, "the default socket")
    if url.startswith("/"):
        url = f"unix://{url}"
    scheme = url.partition("://")[0] if "://" in url else ""
    if scheme not in ("unix", "tcp", "ssh", "http", "https"):
        raise BuildError(
            f"DOCKER_HOST={url!r} is not an engine address oci2disk can use",
            hint="write unix:///var/run/docker.sock, tcp://HOST:2375 (2376 with TLS) or "
            "ssh://USER@HOST",
        )
    tls = bool(env.get("DOCKER_TLS_VERIFY")) or scheme == "https"
    return EngineAddress(url, "DOCKER_HOST", tls, env.get("DOCKER_CERT_PATH") or None)


def connect(address: EngineAddress | None = None, *, timeout: int = 600) -> Any:
    """A low-level docker-py client for ``address`` (default: :func:`engine_address`),
    checked with a ping."""
    address = address or engine_address()
    try:
        import docker
    except ImportError:  # pragma: no cover - it is a dependency
        raise Oci2DiskError(
            "the docker Python package is missing", hint="pip install 'docker[ssh]'"
        ) from None
    kwargs: dict[str, Any] = {"base_url": address.url, "version": "auto", "timeout": timeout}
    if address.tls:
        kwargs["tls"] = _tls_config(address)
    if address.scheme == "ssh" and importlib.util.find_spec("paramiko") is None:
        raise Oci2DiskError(
            f"DOCKER_HOST={address.url} needs paramiko for ssh://",
            hint="pip install 'docker[ssh]' (oci2disk's own dependencies include it)",
        )
    try:
        api = docker.APIClient(**kwargs)
        api.ping()
    except Oci2DiskError:
        raise
    except Exception as exc:
        raise BuildError(
            f"no Docker Engine answers at {address.describe()}: {short(exc)}",
            hint=_hint(address),
        ) from None
    return api


def _tls_config(address: EngineAddress) -> Any:
    import docker.tls

    cert_path = address.cert_path or os.path.join(os.path.expanduser("~"), ".docker")
    files = {name: os.path.join(cert_path, f"{name}.pem") for name in ("ca", "cert", "key")}
    missing = [path for path in files.values() if not os.path.isfile(path)]
    if missing:
        raise BuildError(
            f"TLS to {address.url} needs {', '.join(missing)}",
            hint="set DOCKER_CERT_PATH to the folder with ca.pem, cert.pem and key.pem",
        )
    return docker.tls.TLSConfig(
        client_cert=(files["cert"], files["key"]), ca_cert=files["ca"], verify=True
    )


def _hint(address: EngineAddress) -> str:
    if address.scheme == "ssh":
        where = urllib.parse.urlsplit(address.url)
        port = f"-p {where.port} " if where.port else ""
        user = f"{where.username}@" if where.username else ""
        return (
            f"check that `ssh {port}{user}{where.hostname} docker version` works without a "
            "password prompt (a key in ssh-agent or ~/.ssh/config) and that the remote user "
            "may use docker"
        )
    if address.scheme in ("tcp", "http", "https"):
        return (
            "check that dockerd listens there (dockerd -H tcp://ADDRESS:PORT), that the port "
            "is reachable from here, and DOCKER_TLS_VERIFY/DOCKER_CERT_PATH if it uses TLS; "
            "unset DOCKER_HOST for the local engine"
        )
    socket = address.url.partition("://")[2]
    if os.path.exists(socket) and not os.access(socket, os.R_OK | os.W_OK):
        # The engine runs; this user may not talk to it: starting it would not help.
        return (
            f"the engine's socket {socket} exists but this user may not use it (permission "
            "denied): add the user to its group (sudo usermod -aG docker $USER, then log in "
            "again), run as a user who may, or use rootless Docker"
        )
    return (
        "start the engine (`dockerd &`, or ./setup.sh which starts it), or point DOCKER_HOST at one"
    )


class _ChunkReader(io.RawIOBase):
    """A file object over an iterator of byte chunks (docker-py's save stream)."""

    def __init__(self, chunks: Iterator[bytes]) -> None:
        self._chunks = chunks
        self._buf = memoryview(b"")  # what is left of the last chunk, never copied

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        while not self._buf:
            try:
                self._buf = memoryview(next(self._chunks))
            except StopIteration:
                return 0
        n = min(len(buffer), len(self._buf))
        buffer[:n] = self._buf[:n]
        self._buf = self._buf[n:]
        return n


def save_to_layout(name: str, layout: Path, tag: str | None = None) -> OciImage:
    """Export an engine image as an OCI layout (``docker save`` streamed, digests computed).

    With a cache active (:func:`oci2disk.oci.cache.active`), an image whose config
    digest (the Id ``docker image inspect`` reports) is cached is read from the cache and
    nothing but its inspect from the engine; otherwise ``docker save`` streams into the
    cache instead of ``layout``, and the image is remembered there.
    """
    api = client()
    try:
        info = api.inspect_image(name)
    except Exception:
        raise ImageError(
            f"the Docker Engine has no image {name!r}",
            hint="build or load it first (`docker images` lists what the engine has)",
        ) from None
    store = cache.active()
    image_id = str(info.get("Id", ""))
    if store is not None and image_id.startswith("sha256:"):
        cached = store.image(image_id)
        if cached is not None:
            log.info("cache: %s is cached as %s", name, cached.digest)
            return cached
    try:
        chunks = api.get_image(name, chunk_size=1 << 20)
        stream = progress.current().reading(
            io.BufferedReader(_ChunkReader(iter(chunks)), buffer_size=1 << 20),
            f"docker save {name}",
            _int(info.get("Size")),
        )
        if store is None:
            return layout_from_docker_archive(stream, layout, tag)
        return store.add_docker_archive(stream)
    except Oci2DiskError:
        raise
    except Exception as exc:
        raise ImageError(f"docker save of {name} failed: {short(exc)}") from None


def _int(value: object) -> int | None:
    return value if isinstance(value, int) and value > 0 else None


def import_rootfs(tar_path: Path, name: str, tag: str, *, changes: Iterable[str] = ()) -> str:
    """``docker import`` a flat rootfs tarball as image ``name:tag``; return its id."""
    api = client()
    try:
        result = api.import_image_from_file(
            str(tar_path), repository=name, tag=tag, changes=list(changes)
        )
    except Exception as exc:
        raise ImageError(f"docker import of {tar_path} failed: {short(exc)}") from None
    text = result if isinstance(result, str) else str(result)
    match = re.search(r"sha256:[0-9a-f]{64}", text)
    if not match:
        raise ImageError(f"docker import of {tar_path} gave no image id: {text[-300:]}")
    return match.group(0)
