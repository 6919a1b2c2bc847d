"""A real registry on loopback, in a service container, with the bootstrapped base in it.

The registry (Debian's docker-registry, built FROM the local Debian base: there is no
registry image to pull here) runs as a pytest-docker service (tests/services/
docker-compose.yml), published on a free 127.0.0.1 port. A container serves here: a
registry is a network service, and the engine, skopeo and buildah reach it through
the published port as they would reach a registry host. Its blobs live on a tmpfs and
go with the container.

One registry per test process: test modules import the fixtures from here, and pytest
would make a session fixture once per importing module, so the registry itself is a
process-wide singleton, taken down (``docker-compose down``) when the process exits.

The Docker Engine talks plain HTTP to 127.0.0.0/8 registries by itself; skopeo and
buildah are given --tls-verify=false (oci2disk does that for loopback registries).
"""

from __future__ import annotations

import atexit
import os
import subprocess
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest
from pytest_docker.plugin import DockerComposeExecutor, Services

START_TIMEOUT = 60.0
COMPOSE_FILE = Path(__file__).resolve().parent / "services" / "docker-compose.yml"
# docker-compose 1.29 (Debian bookworm's); pytest-docker's default `up --wait` is v2 only
COMPOSE_COMMAND = "docker-compose"


@dataclass(frozen=True)
class Registry:
    host: str  # "127.0.0.1:PORT"
    login: tuple[str, str] | None = None  # user and password, when it wants a login

    def name(self, repository: str) -> str:
        """``127.0.0.1:PORT/REPOSITORY[:TAG]``, as a FROM line or `docker pull` writes it."""
        return f"{self.host}/{repository}"

    def answers(self) -> bool:
        """/v2/ answers: 200, or 401 from a registry that wants a login."""
        try:
            with urllib.request.urlopen(f"http://{self.host}/v2/", timeout=2) as response:
                return bool(response.status == 200)
        except urllib.error.HTTPError as exc:
            return exc.code == 401
        except OSError:
            return False

    def has(self, repository: str, tag: str) -> bool:
        url = f"http://{self.host}/v2/{repository}/manifests/{tag}"
        request = urllib.request.Request(url, method="HEAD")
        request.add_header(
            "Accept",
            "application/vnd.oci.image.manifest.v1+json, "
            "application/vnd.docker.distribution.manifest.v2+json",
        )
        try:
            with urllib.request.urlopen(request, timeout=10) as response:
                return bool(response.status == 200)
        except OSError:
            return False


_RUNNING: dict[str, Registry] = {}
_PUSHED: set[tuple[str, str]] = set()


# The login of the registry-auth service (tests/services/registry/htpasswd).
AUTH_USER = "oci2disk"
AUTH_PASSWORD = "oci2disk-test-password"


def start_registry(base_image: str, service: str = "registry") -> Registry:
    """Start the registry services (building their image FROM ``base_image`` once) and
    return ``service``: "registry", or "registry-auth" which wants a login."""
    if service in _RUNNING:
        return _RUNNING[service]
    os.environ["OCI2DISK_TEST_BASE"] = base_image  # compose reads it for the build arg
    compose = DockerComposeExecutor(COMPOSE_COMMAND, str(COMPOSE_FILE), f"oci2disk{os.getpid()}")
    atexit.register(compose.execute, "down -v")
    compose.execute("up --build -d")
    services = Services(compose)
    for name in ("registry", "registry-auth"):
        login = (AUTH_USER, AUTH_PASSWORD) if name == "registry-auth" else None
        started = Registry(f"127.0.0.1:{services.port_for(name, 5000)}", login)
        try:
            services.wait_until_responsive(check=started.answers, timeout=START_TIMEOUT, pause=0.2)
        except Exception:
            logs = compose.execute(f"logs {name}").decode(errors="replace")
            raise RuntimeError(f"the {name} service did not answer: {logs[-2000:]}") from None
        _RUNNING[name] = started
    return _RUNNING[service]


def push(registry: Registry, source: str, repository: str, tag: str) -> str:
    """Copy ``source`` (a skopeo reference) to the registry once; return the name pushed."""
    key = (repository, tag)
    target = registry.name(f"{repository}:{tag}")
    if key not in _PUSHED:
        subprocess.run(
            ["skopeo", "copy", "--quiet", "--dest-tls-verify=false", source, f"docker://{target}"],
            check=True,
            capture_output=True,
        )
        _PUSHED.add(key)
    return target


@pytest.fixture(scope="session")
def registry(base_image: str) -> Registry:
    """A registry on 127.0.0.1, empty but for what tests push."""
    return start_registry(base_image)


@pytest.fixture(scope="session")
def registry_base(registry: Registry, base_image: str) -> str:
    """The bootstrapped Debian base in the registry: ``127.0.0.1:PORT/debian:bookworm``."""
    return push(registry, f"docker-daemon:{base_image}", "debian", "bookworm")


@pytest.fixture(scope="session")
def registry_auth(base_image: str) -> Registry:
    """A registry on 127.0.0.1 that wants the login AUTH_USER / AUTH_PASSWORD."""
    return start_registry(base_image, "registry-auth")
