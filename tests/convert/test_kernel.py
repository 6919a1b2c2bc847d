"""The kernel output: vmlinuz and initrd.img from /boot, and vmlinux extracted from vmlinuz."""

from __future__ import annotations

import bz2
import gzip
import lzma
import struct
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest
import zstandard

from layerkit import Member, directory, file, make_image, symlink
from oci2disk.convert import ConvertOptions, ConvertResult, convert, default_outputs
from oci2disk.convert.kernel import extract_vmlinux
from oci2disk.errors import ConvertError, RecipeError
from oci2disk.oci.layout import OciImage
from oci2disk.recipe import Format, KernelSpec, load
from oci2disk.rootfs.flatten import flatten
from oci2disk.rootfs.kernels import version_key
from oci2disk.workspace import Workspace

# An ELF header (x86-64 executable) and a body that compresses well but is not all zeros.
ELF = b"\x7fELF\x02\x01\x01" + bytes(9) + struct.pack("<HH", 2, 0x3E) + bytes(44)
VMLINUX = ELF + b"".join(i.to_bytes(4, "little") for i in range(50_000))


def _lz4(data: bytes) -> bytes:
    # The kernel's lz4 payloads use the legacy frame format (lz4 -l).
    return subprocess.run(
        ["lz4", "-l", "-c", "-9"], input=data, capture_output=True, check=True
    ).stdout


CODECS: dict[str, Callable[[bytes], bytes]] = {
    "gzip": lambda d: gzip.compress(d, mtime=0),
    "xz": lambda d: lzma.compress(d, check=lzma.CHECK_CRC32),
    # The kernel's `lzma -9` has a 64 MiB dictionary, so its header starts 5d 00 00 00,
    # the magic scripts/extract-vmlinux looks for; 16 MiB is the smallest that does too.
    "lzma": lambda d: lzma.compress(
        d, format=lzma.FORMAT_ALONE, filters=[{"id": lzma.FILTER_LZMA1, "dict_size": 1 << 24}]
    ),
    "bzip2": bz2.compress,
    "zstd": lambda d: zstandard.ZstdCompressor().compress(d),
    "lz4": _lz4,
}


def fake_bzimage(payload: bytes, *, header: bool) -> bytes:
    """Setup code, then the compressed kernel, then trailing data, like an x86 bzImage."""
    setup = bytearray(5 * 512)  # setup_sects = 4, plus the boot sector
    if header:
        setup[0x1F1] = 4
        setup[0x202:0x206] = b"HdrS"
        struct.pack_into("<H", setup, 0x206, 0x20F)
        struct.pack_into("<II", setup, 0x248, 0x40, len(payload))
    decompressor = b"\x1f\x8b\x08 not a real gzip stream" + bytes(0x40 - 30)  # a decoy
    return bytes(setup) + decompressor[:0x40] + payload + b"\x00" * 100 + b"trailer"


@pytest.mark.parametrize("codec", sorted(CODECS))
@pytest.mark.parametrize("header", [True, False], ids=["bzimage-header", "magic-scan"])
def test_vmlinux_comes_out_of_every_compression(tmp_path: Path, codec: str, header: bool) -> None:
    vmlinuz = fake_bzimage(CODECS[codec](VMLINUX), header=header)
    assert extract_vmlinux(vmlinuz, tmp_path) == VMLINUX


def test_an_elf_kernel_is_its_own_vmlinux(tmp_path: Path) -> None:
    assert extract_vmlinux(VMLINUX, tmp_path) == VMLINUX


def test_no_elf_inside_is_a_clear_error(tmp_path: Path) -> None:
    vmlinuz = fake_bzimage(gzip.compress(b"no elf here" * 100, mtime=0), header=True)
    with pytest.raises(ConvertError, match="cannot find the ELF kernel") as caught:
        extract_vmlinux(vmlinuz, tmp_path)
    assert caught.value.hint is not None and "vmlinux" in caught.value.hint


def test_versions_compare_as_numbers() -> None:
    versions = ["6.1.0-9-amd64", "6.1.0-50-amd64", "5.10.0-28-amd64", "6.10.1-arch1-1"]
    assert sorted(versions, key=version_key) == [
        "5.10.0-28-amd64",
        "6.1.0-9-amd64",
        "6.1.0-50-amd64",
        "6.10.1-arch1-1",
    ]


def vmlinuz_of(version: str) -> bytes:
    return fake_bzimage(gzip.compress(VMLINUX + version.encode(), mtime=0), header=True)


DEBIAN_BOOT: list[Member] = [
    directory("boot"),
    file("boot/vmlinuz-6.1.0-9-amd64", vmlinuz_of("9")),
    file("boot/initrd.img-6.1.0-9-amd64", b"initrd 9"),
    file("boot/vmlinuz-6.1.0-50-amd64", vmlinuz_of("50")),
    file("boot/initrd.img-6.1.0-50-amd64", b"initrd 50"),
    file("boot/config-6.1.0-50-amd64", b"CONFIG_X=y"),
    symlink("vmlinuz", "boot/vmlinuz-6.1.0-50-amd64"),
]


def run(image: OciImage, out: Path, spec: KernelSpec | None = None) -> ConvertResult:
    options = ConvertOptions(kernel=spec or KernelSpec())
    with Workspace() as ws, flatten(image, ws.subdir("flat")) as rootfs:
        return convert(image, rootfs, {Format.KERNEL: out}, options, ws)


def test_newest_kernel_and_its_initrd_land_beside_the_other_outputs(tmp_path: Path) -> None:
    image = make_image(tmp_path / "layout", [DEBIAN_BOOT])
    out = tmp_path / "out"
    out.mkdir()
    outputs = default_outputs(out, "disk", (Format.KERNEL,))
    assert outputs[Format.KERNEL] == out / "vmlinuz"
    result = run(image, outputs[Format.KERNEL], KernelSpec(vmlinux=True))
    assert [(a.path.name, a.format) for a in result.artifacts] == [
        ("vmlinuz", Format.KERNEL),
        ("initrd.img", Format.KERNEL),
        ("vmlinux", Format.KERNEL),
    ]
    assert (out / "vmlinuz").read_bytes() == vmlinuz_of("50")
    assert (out / "initrd.img").read_bytes() == b"initrd 50"
    assert (out / "vmlinux").read_bytes() == VMLINUX + b"50"
    assert sorted(p.name for p in out.iterdir()) == ["initrd.img", "vmlinux", "vmlinuz"]


def test_the_recipe_can_name_the_version(tmp_path: Path) -> None:
    image = make_image(tmp_path / "layout", [DEBIAN_BOOT])
    run(image, tmp_path, KernelSpec(version="6.1.0-9-amd64"))  # -o DIR: vmlinuz inside
    assert (tmp_path / "vmlinuz").read_bytes() == vmlinuz_of("9")
    assert (tmp_path / "initrd.img").read_bytes() == b"initrd 9"
    assert not (tmp_path / "vmlinux").exists()
    with pytest.raises(ConvertError, match=r"has no kernel 6\.2") as caught:
        run(image, tmp_path / "k", KernelSpec(version="6.2"))
    assert caught.value.hint is not None
    assert "6.1.0-9-amd64, 6.1.0-50-amd64" in caught.value.hint


def test_fedora_layout_and_symlinked_kernels(tmp_path: Path) -> None:
    members = [
        file("usr/lib/modules/6.8.5-301.fc40.x86_64/vmlinuz", vmlinuz_of("fc")),
        directory("boot"),
        symlink("boot/initramfs-6.8.5-301.fc40.x86_64.img", "/efi/initramfs"),
        file("efi/initramfs", b"dracut"),
    ]
    image = make_image(tmp_path / "layout", [members])
    run(image, tmp_path / "vmlinuz")
    assert (tmp_path / "vmlinuz").read_bytes() == vmlinuz_of("fc")
    assert (tmp_path / "initrd.img").read_bytes() == b"dracut"


def test_a_kernel_without_initrd_is_written_with_a_warning(tmp_path: Path) -> None:
    image = make_image(tmp_path / "layout", [[file("boot/vmlinuz-virt", vmlinuz_of("alpine"))]])
    result = run(image, tmp_path / "vmlinuz")
    assert [a.path.name for a in result.artifacts] == ["vmlinuz"]
    assert any("no initrd for kernel virt" in w for w in result.warnings)
    assert not (tmp_path / "initrd.img").exists()


def test_an_image_without_a_kernel_is_a_clear_error(tmp_path: Path) -> None:
    image = make_image(tmp_path / "layout", [[directory("boot"), file("etc/hostname", b"x\n")]])
    with pytest.raises(ConvertError, match="the image has no kernel") as caught:
        run(image, tmp_path / "vmlinuz")
    assert caught.value.hint is not None and "linux-image-amd64" in caught.value.hint
    assert list(tmp_path.iterdir()) == [tmp_path / "layout"]  # nothing half-written


def test_recipe_kernel_table(tmp_path: Path) -> None:
    (tmp_path / "Dockerfile").write_text("FROM scratch\n")
    (tmp_path / "recipe.toml").write_text('[kernel]\nversion = "6.1.0-9-amd64"\nvmlinux = true\n')
    assert load(tmp_path).kernel == KernelSpec("6.1.0-9-amd64", vmlinux=True)
    (tmp_path / "recipe.toml").write_text('[kernel]\nvmlinux = "yes"\n')
    with pytest.raises(RecipeError, match=r"kernel\.vmlinux: expected true or false"):
        load(tmp_path)
    (tmp_path / "recipe.toml").write_text('[kernel]\nversion = "../x"\n')
    with pytest.raises(RecipeError, match=r"kernel\.version: expected a kernel version"):
        load(tmp_path)
