"""Which Docker Engine oci2disk talks to, and connecting to it (local or remote).

``DOCKER_HOST`` picks the engine as the docker CLI does: ``unix:///path`` (the default,
``/var/run/docker.sock``), ``tcp://HOST:PORT`` (TLS when ``DOCKER_TLS_VERIFY`` is set,
with the certificates in ``DOCKER_CERT_PATH``, as ``docker --tlsverify`` uses them) and
``ssh://[USER@]HOST[:PORT]`` (docker-py's paramiko transport: the remote user runs
``docker system dial-stdio``; keys from ssh-agent or ``~/.ssh``). Builds, ``docker-daemon:``
sources and ``bootstrap --to docker-daemon:`` all go to that engine. An engine that does
not answer is an error naming the address and where it came from.

Host tools: a Docker Engine, local or remote (Debian package docker.io).
"""

from __future__ import annotations

import importlib.util
import os
import urllib.parse
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from oci2disk.errors import BuildError, Oci2DiskError

DEFAULT_HOST = "unix:///var/run/docker.sock"


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
            f"no Docker Engine answers at {address.describe()}: {_short(exc)}",
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
    return (
        "start the engine (`dockerd &`, or ./setup.sh which starts it), or point DOCKER_HOST at one"
    )


def _short(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[-1] if text else type(exc).__name__
