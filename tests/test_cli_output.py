"""What the command line prints: each warning once, the manifest as JSON from one value."""

from __future__ import annotations

import json
from pathlib import Path

from clikit import oci2disk
from layerkit import directory, file, make_image


def test_a_warning_is_printed_once(tmp_path: Path) -> None:
    make_image(
        tmp_path / "layout",
        [[directory("etc"), directory("boot"), file("boot/vmlinuz-6.1.0-9-amd64", b"k" * 4096)]],
    )
    out = tmp_path / "kernel"
    out.mkdir()
    result = oci2disk("convert", f"oci:{tmp_path / 'layout'}:test", "-f", "kernel", "-o", str(out))
    assert result.code == 0, result.stderr
    assert result.stderr.count("has no initrd for kernel 6.1.0-9-amd64") == 1, result.stderr


def test_json_is_the_manifest_written_beside_the_output(tmp_path: Path) -> None:
    make_image(tmp_path / "layout", [[directory("etc"), file("etc/hostname", b"box\n")]])
    target = tmp_path / "rootfs.tar"
    result = oci2disk(
        "--json", "convert", f"oci:{tmp_path / 'layout'}:test", "-f", "tar", "-o", str(target)
    )
    assert result.code == 0, result.stderr
    printed = json.loads(result.stdout)
    assert printed == json.loads((tmp_path / "rootfs.tar.manifest.json").read_text())
    assert printed["artifacts"][0]["format"] == "tar"
    assert printed["options"]["tar"] == {"compression": "none", "level": None}
