"""The output-format plugins: each declared once, by its own module, and asked, not looked up."""

from __future__ import annotations

import importlib
import os
import subprocess
import sys
from pathlib import Path

import pytest

from layerkit import directory, file, make_image
from oci2disk.compression import Compression
from oci2disk.convert import REGISTRY, ConvertOptions, Format, default_outputs, preflight
from oci2disk.convert.options import InitramfsSpec, TarSpec
from oci2disk.errors import ToolMissingError, UsageError

ROOT = Path(__file__).resolve().parents[2]
USER_NAMES = [
    "raw", "qcow2", "vmdk", "vhdx", "vpc", "vhd", "vdi", "fs", "tar", "cgz", "dir",
    "squashfs", "iso",
]  # fmt: skip


def test_every_user_visible_name_is_registered() -> None:
    assert sorted(REGISTRY) == sorted([*USER_NAMES, "kernel"])
    assert REGISTRY["vhd"] is Format.VPC and Format.parse("VHD") is Format.VPC
    with pytest.raises(UsageError, match="unknown output format 'floppy'"):
        Format.parse("floppy")


def test_each_format_is_declared_by_a_module_that_names_its_host_tools() -> None:
    for fmt in Format:
        module = importlib.import_module(fmt.plugin.write.__module__)
        assert module.__doc__ is not None and "Host tools:" in module.__doc__, module.__name__
        for tool in fmt.plugin.tools:
            assert tool.program in module.__doc__ or tool.program in (
                importlib.import_module("oci2disk.convert.disk").__doc__ or ""
            )
    assert {f for f in Format if f.plugin.disk} == {
        Format.RAW, Format.FS, Format.QCOW2, Format.VMDK, Format.VHDX, Format.VPC, Format.VDI
    }  # fmt: skip


@pytest.mark.parametrize(
    ("fmt", "options", "name"),
    [
        (Format.RAW, ConvertOptions(), "disk.raw"),
        (Format.FS, ConvertOptions(), "disk.ext4"),
        (Format.VPC, ConvertOptions(), "disk.vhd"),
        (Format.DIR, ConvertOptions(), "disk.rootfs"),
        (Format.KERNEL, ConvertOptions(), "vmlinuz"),
        (Format.CGZ, ConvertOptions(), "disk.cgz"),
        (Format.CGZ, ConvertOptions(initramfs=InitramfsSpec(None, Compression.XZ)), "disk.cpio.xz"),
        (Format.TAR, ConvertOptions(tar=TarSpec(Compression.ZSTD)), "disk.tar.zst"),
    ],
)
def test_default_output_names(fmt: Format, options: ConvertOptions, name: str) -> None:
    assert default_outputs(Path("/o"), "disk", (fmt,), options)[fmt] == Path("/o") / name


def test_preflight_names_the_package_the_format_declares(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", "/nonexistent")
    monkeypatch.setattr("oci2disk.run._sbin_lookup", lambda program: None)
    with pytest.raises(ToolMissingError, match=r"install mke2fs \(Debian package e2fsprogs"):
        preflight([Format.TAR, Format.VDI])
    preflight([Format.TAR, Format.CGZ, Format.DIR])  # no host tools needed


def test_a_raw_disk_is_written_under_python_optimizations(tmp_path: Path) -> None:
    """write_raw did its work inside an assert: `python -O` committed an empty disk.raw."""
    make_image(tmp_path / "layout", [[directory("etc"), file("etc/hostname", b"box\n")]])
    script = (
        "import sys; from pathlib import Path; "
        "from oci2disk.convert import ConvertOptions, Format; "
        "from oci2disk.pipeline import convert_ref; "
        "convert_ref(sys.argv[1], Format.RAW, Path(sys.argv[2]), ConvertOptions())"
    )
    out = tmp_path / "disk.raw"
    subprocess.run(
        [sys.executable, "-O", "-c", script, f"oci:{tmp_path / 'layout'}:test", os.fspath(out)],
        check=True,
        cwd=ROOT,
    )
    with out.open("rb") as f:
        f.seek((1 << 20) + 1080)  # the ext superblock's magic, in the partition at 1 MiB
        assert f.read(2) == b"\x53\xef"
