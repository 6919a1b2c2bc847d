"""Progress for long steps: a live line on a terminal, plain lines otherwise.

Only the CLI creates a Progress that prints; library code receives one (or the
silent default) and reports through it.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import BinaryIO, TextIO, cast


class Progress:
    def __init__(self, stream: TextIO | None = None, *, live: bool | None = None) -> None:
        self.stream = stream
        self.live = bool(stream is not None and (stream.isatty() if live is None else live))
        self._last = 0.0

    def message(self, text: str) -> None:
        if self.stream is not None:
            self._clear()
            print(text, file=self.stream, flush=True)

    @contextmanager
    def step(self, title: str) -> Iterator[None]:
        start = time.monotonic()
        self.message(f"==> {title}")
        yield
        self._clear()
        self.message(f"    {title}: done in {time.monotonic() - start:.1f} s")

    def update(self, text: str) -> None:
        """A transient status (bytes written ...); shown only on a terminal."""
        if not self.live or self.stream is None:
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


SILENT = Progress(None)


class _CountingWriter:
    """Wraps a binary sink and reports bytes written through a Progress."""

    def __init__(self, sink: BinaryIO, progress: Progress, label: str) -> None:
        self._sink = sink
        self._progress = progress
        self._label = label
        self._count = 0

    def write(self, data: bytes) -> int:
        n = self._sink.write(data)
        self._count += len(data)
        self._progress.update(f"{self._label}: {self._count / (1 << 20):.0f} MiB")
        return n

    def flush(self) -> None:
        self._sink.flush()

    def __getattr__(self, name: str) -> object:
        return getattr(self._sink, name)


def stderr_progress() -> Progress:
    return Progress(sys.stderr)
