"""An ssh server on loopback that gives the tests' user ``docker system dial-stdio``, for
DOCKER_HOST=ssh://... (docker-py's paramiko transport).

A hand-started sshd (Debian package openssh-server), not a container: ssh:// means
"the engine on the machine I log in to", and here that is this machine's engine, which
a container could reach only with the socket mounted into it. The server has its own
host key, config, pidfile and authorized key in a temporary folder; the client side is
a HOME of its own (.ssh/config, the key, known_hosts), since docker-py reads
~/.ssh/config and rejects unknown host keys.
"""

from __future__ import annotations

import atexit
import getpass
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

START_TIMEOUT = 20.0


@dataclass(frozen=True)
class SshServer:
    url: str  # ssh://USER@127.0.0.1:PORT, for DOCKER_HOST
    home: Path  # HOME for the client: .ssh/config, id_ed25519, known_hosts


_RUNNING: dict[str, SshServer] = {}


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _keygen(path: Path) -> str:
    subprocess.run(
        ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", os.fspath(path)],
        check=True, capture_output=True,
    )  # fmt: skip
    return path.with_suffix(".pub").read_text().strip()


def start_sshd() -> SshServer:
    if "sshd" in _RUNNING:
        return _RUNNING["sshd"]
    root = Path(tempfile.mkdtemp(prefix="oci2disk-sshd-"))
    os.chmod(root, 0o755)
    host_key = _keygen(root / "host_key")
    (root / "authorized_keys").write_text(_keygen(root / "client_key") + "\n")
    port = _free_port()
    user = getpass.getuser()
    config = root / "sshd_config"
    config.write_text(
        f"Port {port}\nListenAddress 127.0.0.1\nHostKey {root / 'host_key'}\n"
        f"PidFile {root / 'sshd.pid'}\nAuthorizedKeysFile {root / 'authorized_keys'}\n"
        "PasswordAuthentication no\nKbdInteractiveAuthentication no\nUsePAM no\n"
        "PermitRootLogin prohibit-password\nStrictModes no\n"
    )
    Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)  # sshd's privilege separation dir
    log = root / "sshd.log"
    proc = subprocess.Popen(
        ["/usr/sbin/sshd", "-D", "-e", "-f", os.fspath(config)],
        stdout=log.open("wb"), stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
    )  # fmt: skip

    def stop() -> None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        shutil.rmtree(root, ignore_errors=True)

    atexit.register(stop)
    home = root / "home"
    ssh_dir = home / ".ssh"
    ssh_dir.mkdir(parents=True, mode=0o700)
    shutil.copy(root / "client_key", ssh_dir / "id_ed25519")
    (ssh_dir / "id_ed25519").chmod(0o600)
    (ssh_dir / "config").write_text(
        f"Host 127.0.0.1\n  Port {port}\n  User {user}\n  IdentityFile {ssh_dir / 'id_ed25519'}\n"
    )
    (ssh_dir / "known_hosts").write_text(f"[127.0.0.1]:{port} {host_key.rsplit(' ', 1)[0]}\n")
    deadline = time.monotonic() + START_TIMEOUT
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1) as s:
                if s.recv(4).startswith(b"SSH-"):
                    break
        except OSError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"sshd did not start: {log.read_text()[-2000:]}")
        time.sleep(0.2)
    server = SshServer(f"ssh://{user}@127.0.0.1:{port}", home)
    _RUNNING["sshd"] = server
    return server
