"""The cgz output: a newc cpio of the rootfs that cpio, the kernel and verify all accept."""

from __future__ import annotations

import gzip
import logging
import subprocess
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest

from layerkit import Member, device, directory, fifo, file, hardlink, symlink
from oci2disk.convert import ConvertOptions, convert, default_outputs
from oci2disk.errors import ConvertError, RecipeError
from oci2disk.recipe import ArchiveCompression, Format, InitramfsSpec, KernelSpec, load
from oci2disk.rootfs import Entry, Kind, with_digests
from oci2disk.rootfs.archives import CpioTree, TarTree
from oci2disk.rootfs.directory import DirectoryTree
from oci2disk.rootfs.flatten import flatten
from oci2disk.verify import compare
from oci2disk.workspace import Workspace
from outputkit import convert_to, image_of, image_records

ROOT = Path(__file__).resolve().parents[2]
CAP = b"\x01\x00\x00\x02\x00\x20\x00\x00" + bytes(12)
LATIN1_NAME = b"caf\xe9.txt".decode("utf-8", "surrogateescape")
INIT = ConvertOptions(initramfs=InitramfsSpec(init="/sbin/init"))

SAMPLE: list[Member] = [
    directory("etc"),
    file("etc/passwd", b"root:x:0:0:root:/root:/bin/sh\n"),
    symlink("etc/localtime", "/usr/share/zoneinfo/UTC"),
    directory("home/user", mode=0o750, uid=1000, gid=1000),
    file("home/user/notes", bytes(range(256)) * 300, mode=0o600, uid=1000, gid=1001),
    directory("sbin"),
    file("sbin/init", b"#!/bin/sh\nexec /bin/sh\n", mode=0o755),
    file("usr/bin/su", b"su", mode=0o4755),
    file("usr/bin/python3.11", b"python" * 5000, mode=0o755),
    hardlink("usr/bin/python3", "usr/bin/python3.11"),
    hardlink("usr/lib/python3", "usr/bin/python3.11"),
    file("usr/bin/ping", b"ping", mode=0o755, xattrs={"security.capability": CAP}),
    symlink("bin", "usr/bin"),
    directory("dev"),
    device("dev/null", 1, 3, mode=0o666),
    device("dev/sda", 8, 0, block=True, mode=0o660),
    fifo("run/initctl", mode=0o600),
    file("empty"),
    file(LATIN1_NAME, b"latin-1 name"),
]


def without_xattrs(records: list[Entry]) -> list[Entry]:
    return [replace(r, xattrs=()) for r in records]


def read_records(path: Path) -> list[Entry]:
    """The entries of a (compressed) cpio file, as verify reads them."""
    return list(CpioTree(path).entries())


def newc_headers(data: bytes) -> Iterator[tuple[str, int, int, int, int]]:
    """(name, inode, mode, nlink, size) of each newc entry, read by hand."""
    pos = 0
    while True:
        assert data[pos : pos + 6] == b"070701", f"bad magic at {pos}"
        fields = [int(data[pos + 6 + 8 * i : pos + 14 + 8 * i], 16) for i in range(13)]
        namesize, size = fields[11], fields[6]
        name = data[pos + 110 : pos + 110 + namesize - 1].decode("utf-8", "surrogateescape")
        if name == "TRAILER!!!":
            return
        yield name, fields[0], fields[1], fields[4], size
        pos += (110 + namesize + 3) // 4 * 4
        pos += (size + 3) // 4 * 4


def test_cgz_holds_every_entry_of_the_image(tmp_path: Path) -> None:
    image = image_of(tmp_path, SAMPLE)
    out = tmp_path / "initramfs.cgz"
    result = convert_to(image, {Format.CGZ: out}, INIT)
    assert [a.path for a in result.artifacts] == [out]
    assert result.generated == ("init", "dev/console")
    assert out.read_bytes()[:2] == b"\x1f\x8b"  # gzip
    have = read_records(out)
    by_path = {r.path: r for r in have}
    assert by_path["init"].kind is Kind.SYMLINK and by_path["init"].linkname == "/sbin/init"
    assert (by_path["dev/console"].kind, by_path["dev/console"].devmajor) == (Kind.CHAR, 5)
    assert by_path["dev/console"].devminor == 1
    # newc has no xattrs; everything else is exact
    diffs = compare(without_xattrs(image_records(image)), have, ignore=result.generated)
    assert diffs == []


def test_gnu_cpio_lists_and_extracts_it_with_hard_links_and_owners(tmp_path: Path) -> None:
    image = image_of(tmp_path, SAMPLE)
    out = tmp_path / "initramfs.cgz"
    convert_to(image, {Format.CGZ: out}, INIT)
    archive = gzip.decompress(out.read_bytes())
    listing = subprocess.run(
        ["cpio", "-it", "--quiet"], input=archive, capture_output=True, check=True
    ).stdout.splitlines()
    assert len(listing) == len(image_records(image)) + 2  # and init, dev/console
    assert b"usr/bin/python3.11" in listing
    target = tmp_path / "x"
    target.mkdir()
    subprocess.run(
        ["cpio", "-idm", "--quiet", "--no-absolute-filenames", "--numeric-uid-gid"],
        input=archive,
        cwd=target,
        check=True,
    )
    got = list(with_digests(DirectoryTree(target)))
    diffs = compare(without_xattrs(image_records(image)), got, ignore=("init", "dev/console"))
    assert diffs == []
    assert (target / "usr/lib/python3").stat().st_ino == (target / "usr/bin/python3").stat().st_ino
    assert (target / "usr/lib/python3").read_bytes() == b"python" * 5000


def headers(path: Path) -> list[tuple[str, int, int, int, int]]:
    return list(newc_headers(path.read_bytes()))


def test_hard_link_data_is_stored_once_on_the_last_name(tmp_path: Path) -> None:
    image = image_of(tmp_path, SAMPLE)
    out = tmp_path / "initramfs.cpio"
    convert_to(
        image,
        {Format.CGZ: out},
        replace(INIT, initramfs=replace(INIT.initramfs, compression=ArchiveCompression.NONE)),
    )
    entries = {name: (ino, mode, nlink, size) for name, ino, mode, nlink, size in headers(out)}
    names = ["usr/bin/python3", "usr/bin/python3.11", "usr/lib/python3"]  # canonical order
    inodes = {entries[n][0] for n in names}
    assert len(inodes) == 1, "one inode number for the whole link set"
    assert [entries[n][2] for n in names] == [3, 3, 3]  # nlink
    assert [entries[n][3] for n in names] == [0, 0, 30000]  # data once, on the last name
    assert entries["."][1] & 0o170000 == 0o040000  # the root directory comes first
    assert next(iter(entries)) == "."


def test_without_init_the_error_says_which_option_fixes_it(tmp_path: Path) -> None:
    image = image_of(tmp_path, SAMPLE)
    out = tmp_path / "initramfs.cgz"
    with pytest.raises(ConvertError) as caught:
        convert_to(image, {Format.CGZ: out}, ConvertOptions())
    assert "has no /init" in caught.value.message
    assert caught.value.hint is not None
    assert 'init = "/sbin/init"' in caught.value.hint and "[initramfs]" in caught.value.hint
    assert "the image has /sbin/init" in caught.value.hint
    assert list(tmp_path.glob("initramfs*")) == [] and list(tmp_path.glob(".initramfs*")) == []


def test_an_image_with_its_own_init_needs_no_option(tmp_path: Path) -> None:
    image = image_of(
        tmp_path, [*SAMPLE, file("init", b"#!/bin/sh\n", mode=0o755), device("dev/console", 5, 1)]
    )
    out = tmp_path / "initramfs.cgz"
    result = convert_to(image, {Format.CGZ: out}, ConvertOptions())
    assert result.generated == ()
    assert compare(without_xattrs(image_records(image)), read_records(out)) == []
    # asking for a symlink as well would silently hide the image's own /init
    with pytest.raises(ConvertError, match="has its own /init"):
        convert_to(image, {Format.CGZ: out}, INIT)


def test_a_placeholder_console_is_replaced_by_the_device(tmp_path: Path) -> None:
    # `docker export` leaves an empty regular file at /dev/console: no console for /init.
    image = image_of(tmp_path, [*SAMPLE, file("dev/console")])
    out = tmp_path / "initramfs.cpio"
    options = ConvertOptions(initramfs=InitramfsSpec("/sbin/init", ArchiveCompression.NONE))
    result = convert_to(image, {Format.CGZ: out}, options)
    assert result.generated == ("init", "dev/console")
    consoles = [h for h in headers(out) if h[0] == "dev/console"]
    assert len(consoles) == 1 and consoles[0][2] & 0o170000 == 0o020000  # one char device


def test_init_must_be_a_program_in_the_image(tmp_path: Path) -> None:
    image = image_of(tmp_path, SAMPLE)
    options = ConvertOptions(initramfs=InitramfsSpec(init="/lib/systemd/systemd"))
    with pytest.raises(ConvertError, match="not a file in the image") as caught:
        convert_to(image, {Format.CGZ: tmp_path / "i.cgz"}, options)
    assert caught.value.hint is not None and "/sbin/init" in caught.value.hint
    options = ConvertOptions(initramfs=InitramfsSpec(init="/etc/passwd"))
    with pytest.raises(ConvertError, match="not executable"):
        convert_to(image, {Format.CGZ: tmp_path / "i.cgz"}, options)


def test_init_may_point_through_symlinks(tmp_path: Path) -> None:
    members = [
        *SAMPLE,
        symlink("lib", "usr/lib"),
        file("usr/lib/systemd/systemd", b"sd", mode=0o755),
    ]
    image = image_of(tmp_path, members)
    options = ConvertOptions(initramfs=InitramfsSpec(init="/lib/systemd/systemd"))
    out = tmp_path / "i.cgz"
    convert_to(image, {Format.CGZ: out}, options)
    init = next(r for r in read_records(out) if r.path == "init")
    assert init.linkname == "/lib/systemd/systemd"


def test_xattrs_newc_cannot_hold_are_counted_in_the_log(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    image = image_of(tmp_path, SAMPLE)
    with caplog.at_level(logging.WARNING, logger="oci2disk"):
        convert_to(image, {Format.CGZ: tmp_path / "i.cgz"}, INIT)
    assert "dropped those of 1 path(s)" in caplog.text
    assert "added it to the cpio (char 5:1)" in caplog.text


@pytest.mark.parametrize(
    ("compression", "level", "name", "reader"),
    [
        (ArchiveCompression.GZIP, 9, "disk.cgz", ["gzip", "-dc"]),
        (ArchiveCompression.ZSTD, None, "disk.cpio.zst", ["zstd", "-dcq"]),
        (ArchiveCompression.XZ, 1, "disk.cpio.xz", ["xz", "-dc"]),
        (ArchiveCompression.NONE, None, "disk.cpio", ["cat"]),
    ],
)
def test_every_compression_is_read_by_its_own_tool(
    tmp_path: Path,
    compression: ArchiveCompression,
    level: int | None,
    name: str,
    reader: list[str],
) -> None:
    image = image_of(tmp_path, SAMPLE)
    options = ConvertOptions(initramfs=InitramfsSpec("/sbin/init", compression, level))
    outputs = default_outputs(tmp_path, "disk", (Format.CGZ,), options)
    assert outputs[Format.CGZ].name == name
    convert_to(image, outputs, options)
    data = subprocess.run([*reader, str(outputs[Format.CGZ])], capture_output=True, check=True)
    listing = subprocess.run(
        ["cpio", "-it", "--quiet"], input=data.stdout, capture_output=True, check=True
    )
    assert b"init" in listing.stdout.splitlines()
    if compression is ArchiveCompression.XZ:
        # the kernel's xz decoder takes CRC32 checks only
        info = subprocess.run(
            ["xz", "--robot", "--list", str(outputs[Format.CGZ])], capture_output=True, text=True
        )
        assert "CRC32" in info.stdout and "CRC64" not in info.stdout


def test_same_image_gives_the_same_bytes(tmp_path: Path) -> None:
    image = image_of(tmp_path, SAMPLE)
    first, second = tmp_path / "a.cgz", tmp_path / "b.cgz"
    convert_to(image, {Format.CGZ: first}, INIT)
    convert_to(image, {Format.CGZ: second}, INIT)
    assert first.read_bytes() == second.read_bytes()


# ------------------------------------------------------------- the real thing

DEBIAN_QEMU = "oci2disk-test/debian-qemu"


@pytest.fixture(scope="module")
def debian_qemu(base_image: str) -> str:
    """The image of recipes/debian-qemu in the local engine (built when missing)."""
    found = subprocess.run(["docker", "image", "inspect", DEBIAN_QEMU], capture_output=True)
    if found.returncode != 0:
        subprocess.run(
            ["docker", "build", "--network=host", "-t", DEBIAN_QEMU, "recipes/debian-qemu"],
            cwd=ROOT,
            check=True,
            capture_output=True,
        )
    return DEBIAN_QEMU


@pytest.mark.slow
@pytest.mark.docker
def test_debian_cgz_boots_under_qemu_with_the_images_own_kernel(
    debian_qemu: str, outdir: Path
) -> None:
    """No disk at all: -kernel vmlinuz -initrd disk.cgz, to a marker a unit prints."""
    from oci2disk.boot import BootSpec, boot
    from oci2disk.oci.source import open_image
    from oci2disk.refs import parse_ref

    options = ConvertOptions(
        initramfs=InitramfsSpec(init="/sbin/init"), kernel=KernelSpec(vmlinux=True)
    )
    outputs = default_outputs(outdir, "disk", (Format.CGZ, Format.KERNEL), options)
    with Workspace() as ws:
        image = open_image(parse_ref(f"docker-daemon:{debian_qemu}"), ws.path)
        with flatten(image, ws.subdir("flat")) as rootfs:
            started = time.monotonic()
            result = convert(image, rootfs, outputs, options, ws)
            seconds = time.monotonic() - started
            tar = ws.path / "rootfs.tar"
            with tar.open("wb") as f:
                rootfs.write_tar(f)
        expected = list(TarTree(tar).entries())
    cgz = outputs[Format.CGZ]
    print(f"cgz: {cgz.stat().st_size / 2**20:.0f} MiB in {seconds:.1f} s")
    assert {a.path.name for a in result.artifacts} == {
        "disk.cgz", "vmlinuz", "initrd.img", "vmlinux"
    }  # fmt: skip
    vmlinux = (outdir / "vmlinux").read_bytes()[:20]
    assert vmlinux[:4] == b"\x7fELF" and vmlinux[18:20] == b"\x3e\x00"  # x86-64

    # verify: the archive holds exactly the image (xattrs: the image has none)
    have = read_records(cgz)
    assert compare(expected, have, ignore=result.generated) == []
    # GNU cpio reads it too
    listing = subprocess.run(
        ["cpio", "-it", "--quiet"], input=gzip.decompress(cgz.read_bytes()), capture_output=True
    )
    assert listing.returncode == 0 and len(listing.stdout.splitlines()) == len(have)

    spec = BootSpec(
        disk=None,
        kernel=outdir / "vmlinuz",
        initrd=cgz,
        append="console=ttyS0 panic=-1",
        memory_mb=2560,
    )
    booted = boot(spec, expect="oci2disk-boot-ok", timeout=600, log_path=outdir / "boot.log")
    log = (outdir / "boot.log").read_text(errors="replace")
    print(f"boot: {booted.seconds:.0f} s ({booted.accel})")
    assert booted.matched, log[-3000:]
    assert "Run /init as init process" in log
    assert "Kernel panic" not in log


# ------------------------------------------------------------- recipe.toml


def write_recipe(path: Path, toml: str) -> Path:
    (path / "recipe.toml").write_text(toml)
    (path / "Dockerfile").write_text("FROM scratch\n")
    return path


def test_recipe_initramfs_table_reaches_the_converter(tmp_path: Path) -> None:
    rcp = load(
        write_recipe(
            tmp_path,
            '[outputs]\nformats = ["cgz"]\n\n'
            '[initramfs]\ninit = "/sbin/init"\ncompression = "zstd"\nlevel = 19\n',
        )
    )
    assert rcp.outputs.formats == (Format.CGZ,)
    assert rcp.initramfs == InitramfsSpec("/sbin/init", ArchiveCompression.ZSTD, 19)
    assert ConvertOptions.from_recipe(rcp).initramfs == rcp.initramfs
    assert load(write_recipe(tmp_path, "")).initramfs == InitramfsSpec()  # gzip, no init


@pytest.mark.parametrize(
    ("table", "message"),
    [
        ('init = "sbin/init"', "initramfs.init: expected the absolute path of the image's init"),
        ('init = "/init"', "initramfs.init: expected the absolute path"),
        ("level = 12", "initramfs.level: expected a gzip level from 1 to 9, got 12"),
        ('compression = "none"\nlevel = 3', "initramfs.level: expected no level when"),
        ('compression = "lz4"', "initramfs.compression: expected one of 'gzip' | 'zstd'"),
        ('level = "9"', "initramfs.level: expected a whole number"),
        ('inti = "/sbin/init"', "unknown key initramfs.inti"),
    ],
)
def test_recipe_initramfs_mistakes_are_named(tmp_path: Path, table: str, message: str) -> None:
    with pytest.raises(RecipeError) as caught:
        load(write_recipe(tmp_path, f"[initramfs]\n{table}\n"))
    assert str(tmp_path / "recipe.toml") in caught.value.message
    assert message in caught.value.message
