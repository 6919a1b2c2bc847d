"""A second Docker Engine on loopback TCP, for the remote-engine tests.

A dockerd process of its own (the host's docker.io), not a container: an engine in a
container needs --privileged and a nested storage driver, while a second daemon on
the host is what a remote build machine is to oci2disk, an API on tcp://HOST:PORT.
It gets its own data-root, exec-root (so its own managed containerd), pidfile and
unix socket, and its own bridge: started with ``--bridge none`` a second engine
removed the first one's docker0. ``--iptables=false`` leaves the host's rules to the
first engine. Started once per test process, stopped (by its pid) at exit.
"""

from __future__ import annotations

import atexit
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

START_TIMEOUT = 60.0
BRIDGE = "oci2disk-br2"
BRIDGE_ADDRESS = "10.213.7.1/24"


@dataclass(frozen=True)
class Engine:
    host: str  # tcp://127.0.0.1:PORT, for DOCKER_HOST
    root: Path
    log: Path

    def docker(self, *args: str, input: bytes | None = None) -> subprocess.CompletedProcess[bytes]:
        return subprocess.run(
            ["docker", "-H", self.host, *args], capture_output=True, check=True, input=input
        )


_RUNNING: dict[str, Engine] = {}


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _ensure_bridge() -> bool:
    """Create the second engine's bridge; True when this process made it."""
    if Path(f"/sys/class/net/{BRIDGE}").exists():
        return False
    for argv in (
        ["ip", "link", "add", BRIDGE, "type", "bridge"],
        ["ip", "addr", "add", BRIDGE_ADDRESS, "dev", BRIDGE],
        ["ip", "link", "set", BRIDGE, "up"],
    ):
        subprocess.run(argv, check=True, capture_output=True)
    return True


def start_engine() -> Engine:
    if "engine" in _RUNNING:
        return _RUNNING["engine"]
    root = Path(tempfile.mkdtemp(prefix="oci2disk-engine2-"))
    made_bridge = _ensure_bridge()
    host = f"tcp://127.0.0.1:{_free_port()}"
    log = root / "dockerd.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            ["dockerd",
             "--data-root", os.fspath(root / "data"),
             "--exec-root", os.fspath(root / "exec"),
             "--pidfile", os.fspath(root / "dockerd.pid"),
             "-H", host, "-H", f"unix://{root / 'docker.sock'}",
             "--bridge", BRIDGE, "--iptables=false", "--ip6tables=false"],
            stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
        )  # fmt: skip

    def stop() -> None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        if made_bridge:
            subprocess.run(["ip", "link", "delete", BRIDGE], capture_output=True, check=False)
        shutil.rmtree(root, ignore_errors=True)

    atexit.register(stop)
    engine = Engine(host, root, log)
    deadline = time.monotonic() + START_TIMEOUT
    while True:
        probe = subprocess.run(
            ["docker", "-H", host, "version", "--format", "{{.Server.Version}}"],
            capture_output=True, check=False,
        )  # fmt: skip
        if probe.returncode == 0:
            break
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"the second dockerd did not start: {log.read_text()[-2000:]}")
        time.sleep(0.5)
    _RUNNING["engine"] = engine
    return engine
