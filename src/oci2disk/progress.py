"""Progress for long steps: a live line on a terminal, plain lines otherwise.

Only the CLI creates a Progress that prints; library code receives one (or the
silent default) and reports through it, or, deep in a step (the engine's transfer),
through :func:`current`, the Progress whose step is running.
"""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from pathlib import Path
from typing import IO, BinaryIO, TextIO, cast

MiB = 1 << 20
PLAIN_EVERY = 5.0  # seconds between two plain progress lines (not a terminal)


class Progress:
    def __init__(self, stream: TextIO | None = None, *, live: bool | None = None) -> None:
        self.stream = stream
        self.live = bool(stream is not None and (stream.isatty() if live is None else live))
        self._last = 0.0
        self._plain = 0.0

    def message(self, text: str) -> None:
        if self.stream is not None:
            self._clear()
            print(text, file=self.stream, flush=True)

    @contextmanager
    def step(self, title: str) -> Iterator[None]:
        start = time.monotonic()
        self.message(f"==> {title}")
        self._plain = start
        token = _CURRENT.set(self)
        try:
            yield
        finally:
            _CURRENT.reset(token)
        self._clear()
        self.message(f"    {title}: done in {time.monotonic() - start:.1f} s")

    def update(self, text: str) -> None:
        """A transient status (bytes written ...): a live line on a terminal, else a plain
        line every few seconds."""
        if self.stream is None:
            return
        if not self.live:
            now = time.monotonic()
            if now - self._plain >= PLAIN_EVERY:
                self._plain = now
                print(f"    {text}", file=self.stream, flush=True)
            return
        now = time.monotonic()
        if now - self._last < 0.2:
            return
        self._last = now
        self.stream.write("\r\033[K    " + text)
        self.stream.flush()

    def _clear(self) -> None:
        if self.live and self.stream is not None and self._last:
            self.stream.write("\r\033[K")
            self.stream.flush()
            self._last = 0.0

    def counting(self, sink: BinaryIO, label: str) -> BinaryIO:
        return cast(BinaryIO, _CountingWriter(sink, self, label))

    @contextmanager
    def watching(self, path: Path, label: str) -> Iterator[None]:
        """Report the bytes a program writes to ``path`` while the block runs (qemu-img,
        which says nothing while it works)."""
        if self.stream is None:
            yield
            return
        meter = _Meter(self, label)
        done = threading.Event()

        def poll() -> None:
            while not done.wait(0.5):
                try:
                    size = path.stat().st_blocks * 512
                except OSError:
                    continue
                meter.add(size - meter.count)

        thread = threading.Thread(target=poll, daemon=True)
        thread.start()
        try:
            yield
        finally:
            done.set()
            thread.join()

    def reading(self, source: IO[bytes], label: str, total: int | None = None) -> IO[bytes]:
        """``source`` reporting the bytes read from it (of ``total``) and the rate."""
        return cast(IO[bytes], _CountingReader(source, _Meter(self, label, total)))


SILENT = Progress(None)
_CURRENT: ContextVar[Progress] = ContextVar("oci2disk_progress", default=SILENT)


def current() -> Progress:
    """The Progress whose step is running (SILENT outside of any step)."""
    return _CURRENT.get()


class _Meter:
    """Bytes done, of a total when known, and the rate since the start."""

    def __init__(self, progress: Progress, label: str, total: int | None = None) -> None:
        self.progress = progress
        self.label = label
        self.total = total
        self.count = 0
        self.start = time.monotonic()

    def add(self, n: int) -> None:
        self.count += n
        if self.progress.stream is None:
            return
        elapsed = max(time.monotonic() - self.start, 1e-6)
        done = f"{self.count / MiB:.0f}"
        if self.total:
            done += f" of {self.total / MiB:.0f}"
        self.progress.update(f"{self.label}: {done} MiB, {self.count / MiB / elapsed:.0f} MiB/s")


class _CountingReader:
    def __init__(self, source: IO[bytes], meter: _Meter) -> None:
        self._source = source
        self._meter = meter

    def read(self, size: int = -1, /) -> bytes:
        data = self._source.read(size)
        self._meter.add(len(data))
        return data

    def readinto(self, buffer: bytearray | memoryview, /) -> int:
        n = self._source.readinto(buffer)  # type: ignore[attr-defined]
        self._meter.add(n or 0)
        return int(n or 0)

    def __getattr__(self, name: str) -> object:
        return getattr(self._source, name)


class _CountingWriter:
    """Wraps a binary sink and reports bytes written through a Progress."""

    def __init__(self, sink: BinaryIO, progress: Progress, label: str) -> None:
        self._sink = sink
        self._meter = _Meter(progress, label)

    def write(self, data: bytes) -> int:
        n = self._sink.write(data)
        self._meter.add(len(data))
        return n

    def flush(self) -> None:
        self._sink.flush()

    def __getattr__(self, name: str) -> object:
        return getattr(self._sink, name)


def stderr_progress() -> Progress:
    return Progress(sys.stderr)
