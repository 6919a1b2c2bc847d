"""A recording proxy in front of the Docker Engine's socket: which API calls a run made.

Point a run at it with DOCKER_HOST=unix://<socket>; every request line that passes
through (``GET /v1.41/images/x/json``) is kept, in order, with the API version removed.
"""

from __future__ import annotations

import os
import re
import socket
import threading
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

ENGINE_SOCKET = "/var/run/docker.sock"
_REQUEST = re.compile(rb"(GET|HEAD|POST|PUT|DELETE) (/\S*) HTTP/1\.[01]\r\n")
_VERSION = re.compile(r"^/v[0-9.]+/")


class Recorder:
    def __init__(self, path: Path) -> None:
        self.path = path
        self.calls: list[str] = []
        self._lock = threading.Lock()

    @property
    def docker_host(self) -> str:
        return f"unix://{self.path}"

    def paths(self) -> list[str]:
        """The request paths, without the API version prefix and the query."""
        with self._lock:
            calls = list(self.calls)
        return [_VERSION.sub("/", call.split(" ", 1)[1]).split("?")[0] for call in calls]

    def clear(self) -> None:
        with self._lock:
            self.calls.clear()

    def _record(self, data: bytes) -> None:
        with self._lock:
            for match in _REQUEST.finditer(data):
                self.calls.append(f"{match[1].decode()} {match[2].decode()}")


def _pump(src: socket.socket, dst: socket.socket, recorder: Recorder | None) -> None:
    try:
        while data := src.recv(1 << 16):
            if recorder is not None:
                recorder._record(data)
            dst.sendall(data)
    except OSError:
        pass
    finally:
        for sock in (src, dst):
            with suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)


@contextmanager
def recording_engine(folder: Path) -> Iterator[Recorder]:
    """A proxy socket in ``folder`` that records the requests a client sends the engine."""
    path = folder / "engine.sock"
    recorder = Recorder(path)
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(os.fspath(path))
    server.listen(16)
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            try:
                client, _ = server.accept()
            except OSError:
                return
            upstream = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            upstream.connect(ENGINE_SOCKET)
            threading.Thread(target=_pump, args=(client, upstream, recorder), daemon=True).start()
            threading.Thread(target=_pump, args=(upstream, client, None), daemon=True).start()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield recorder
    finally:
        stop.set()
        with suppress(OSError):
            server.shutdown(socket.SHUT_RDWR)  # wakes the accept() above
        server.close()
        path.unlink(missing_ok=True)
