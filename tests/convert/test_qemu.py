"""vmdk, vhdx, vpc (VHD) and vdi: converted from the raw disk, read back by qemu-img."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from clikit import oci2disk
from layerkit import directory, file, make_image, symlink
from oci2disk.convert import ConvertOptions, convert, default_outputs
from oci2disk.recipe import DiskSpec, Format
from oci2disk.rootfs.flatten import flatten
from oci2disk.workspace import Workspace

SAMPLE = [
    directory("etc"),
    file("etc/os-release", b"ID=test\n"),
    file("usr/lib/big", bytes(range(256)) * 4096),
    symlink("lib", "usr/lib"),
]
VM_FORMATS = (Format.VMDK, Format.VHDX, Format.VPC, Format.VDI)
QEMU_NAMES = {Format.VMDK: "vmdk", Format.VHDX: "vhdx", Format.VPC: "vpc", Format.VDI: "vdi"}


def qemu_info(path: Path) -> dict[str, object]:
    proc = subprocess.run(
        ["qemu-img", "info", "--output=json", str(path)], capture_output=True, check=True
    )
    info: dict[str, object] = json.loads(proc.stdout)
    return info


@pytest.mark.parametrize("size", [None, 100 << 20], ids=["auto", "100M"])
def test_each_vm_format_reads_back_identical_to_the_raw_disk(
    tmp_path: Path, size: int | None
) -> None:
    image = make_image(tmp_path / "layout", [SAMPLE])
    formats = (Format.RAW, *VM_FORMATS)
    outputs = default_outputs(tmp_path, "disk", formats)
    options = ConvertOptions(disk=DiskSpec(size=size))
    with Workspace() as ws, flatten(image, ws.subdir("flat")) as rootfs:
        result = convert(image, rootfs, outputs, options, ws)
    assert {a.format for a in result.artifacts} == set(formats)
    raw = outputs[Format.RAW]
    raw_size = raw.stat().st_size
    if size is not None:
        assert raw_size == size
    for fmt in VM_FORMATS:
        out = outputs[fmt]
        info = qemu_info(out)
        assert info["format"] == QEMU_NAMES[fmt], out
        assert info["virtual-size"] == raw_size, f"{out.name}: {info['virtual-size']}"
        same = subprocess.run(
            ["qemu-img", "compare", "-f", "raw", "-F", QEMU_NAMES[fmt], str(raw), str(out)],
            capture_output=True,
            text=True,
        )
        assert same.returncode == 0 and "Images are identical" in same.stdout, same.stdout


def test_vhd_is_another_name_for_vpc(outdir: Path) -> None:
    assert Format.parse("vhd") is Format.VPC and Format.parse("VPC") is Format.VPC
    assert default_outputs(outdir, "disk", (Format.VPC,))[Format.VPC].name == "disk.vhd"
    make_image(outdir / "layout", [SAMPLE])
    for name in ("vhd", "vpc"):
        out = outdir / f"by-{name}.vhd"
        result = oci2disk("convert", f"oci:{outdir / 'layout'}:test", "-f", name, "-o", str(out))
        assert result.code == 0, result.stderr
        assert qemu_info(out)["format"] == "vpc"
        assert out.read_bytes()[-512:].startswith(b"conectix")  # the VHD footer
