"""The compressed writers of the cgz and tar outputs, with the real compressors."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from oci2disk.compression import Compression, open_decompressed
from oci2disk.convert.compress import compressed, describe
from oci2disk.errors import CommandError

DATA = os.urandom(1 << 16) * 40  # 2.5 MiB, more than a pipe holds


@pytest.mark.parametrize(
    "compression", [Compression.GZIP, Compression.ZSTD, Compression.XZ, Compression.NONE]
)
def test_what_is_written_reads_back(tmp_path: Path, compression: Compression) -> None:
    out = tmp_path / f"out{compression.suffix}"
    with compressed(out, compression, None) as sink:
        sink.write(DATA)
    assert out.read_bytes().startswith(compression.magic)
    with open_decompressed(out) as stream:
        assert stream.read() == DATA


def test_a_failing_compressor_is_an_error_with_its_stderr(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake = tmp_path / "bin" / "xz"
    fake.parent.mkdir()
    fake.write_text("#!/bin/sh\necho 'xz: out of memory' >&2\nexit 1\n")
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{fake.parent}:{os.environ['PATH']}")
    assert describe(Compression.XZ, 6) == "xz -6"
    with (
        pytest.raises(CommandError) as caught,
        compressed(tmp_path / "o.xz", Compression.XZ) as sink,
    ):
        sink.write(DATA)
    assert caught.value.returncode == 1 and "out of memory" in caught.value.stderr_tail
