"""A real registry on loopback (Debian's docker-registry) with the bootstrapped base in it.

One registry per test process: test modules import the fixtures from here, and pytest
would make a session fixture once per importing module, so the registry itself is a
process-wide singleton, stopped when the process exits.

The Docker Engine talks plain HTTP to 127.0.0.0/8 registries by itself; skopeo and
buildah are given --tls-verify=false (oci2disk does that for loopback registries).
"""

from __future__ import annotations

import atexit
import os
import shutil
import socket
import subprocess
import tempfile
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest

START_TIMEOUT = 30.0


@dataclass(frozen=True)
class Registry:
    host: str  # "127.0.0.1:PORT"
    root: Path
    log: Path

    def name(self, repository: str) -> str:
        """``127.0.0.1:PORT/REPOSITORY[:TAG]``, as a FROM line or `docker pull` writes it."""
        return f"{self.host}/{repository}"

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


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_registry() -> Registry:
    """Start docker-registry on a free loopback port and wait until /v2/ answers."""
    if "registry" in _RUNNING:
        return _RUNNING["registry"]
    root = Path(tempfile.mkdtemp(prefix="oci2disk-registry-"))
    port = _free_port()
    config = root / "config.yml"
    config.write_text(
        "version: 0.1\n"
        "log:\n  level: warn\n"
        f"storage:\n  filesystem:\n    rootdirectory: {root / 'data'}\n"
        "  delete:\n    enabled: true\n"
        f"http:\n  addr: 127.0.0.1:{port}\n"
    )
    log = root / "registry.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            ["docker-registry", "serve", os.fspath(config)],
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )

    def stop() -> None:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        shutil.rmtree(root, ignore_errors=True)

    atexit.register(stop)
    registry = Registry(f"127.0.0.1:{port}", root, log)
    deadline = time.monotonic() + START_TIMEOUT
    while True:
        try:
            with urllib.request.urlopen(f"http://{registry.host}/v2/", timeout=2) as response:
                if response.status == 200:
                    break
        except OSError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"docker-registry did not start: {log.read_text()[-2000:]}")
        time.sleep(0.2)
    _RUNNING["registry"] = registry
    return registry


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
def registry() -> Registry:
    """A docker-registry on 127.0.0.1, empty but for what tests push."""
    return start_registry()


@pytest.fixture(scope="session")
def registry_base(registry: Registry, base_image: str) -> str:
    """The bootstrapped Debian base in the registry: ``127.0.0.1:PORT/debian:bookworm``."""
    return push(registry, f"docker-daemon:{base_image}", "debian", "bookworm")
