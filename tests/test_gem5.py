"""recipes/gem5-ubuntu and its Debian twin: a disk image gem5 full-system simulation boots.

The fast tests run the image's boot scripts on this host (they are POSIX sh, as /bin/sh
runs them in the image) with a stand-in gem5-bridge that records its calls, so the gem5
side of the boot flow (m5 exit, readfile, the guard) is checked without gem5. The slow
tests build recipes/gem5-debian with the real Docker Engine (the m5 stage switched off
with M5_SOURCE=none, as no gem5 source is reachable here), read the disk it wrote, and
boot it once under QEMU.
"""

from __future__ import annotations

import json
import os
import re
import stat
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from clikit import oci2disk
from oci2disk.convert import ConvertOptions
from oci2disk.diskimage import extfs, partitions
from oci2disk.errors import RecipeError
from oci2disk.pipeline import convert_ref
from oci2disk.recipe import DiskSpec, Format, Table, load
from oci2disk.rootfs import Kind

ROOT = Path(__file__).resolve().parent.parent
FILES = ROOT / "recipes" / "gem5-ubuntu" / "files"
IMAGE = "oci2disk-recipe/gem5-debian:latest"
GiB = 1 << 30
MiB = 1 << 20

GEM5_CPUINFO = "vendor_id\t: HygonGenuine\nmodel name\t: Fake gem5 x86_64 CPU\n"
QEMU_CPUINFO = "vendor_id\t: AuthenticAMD\nmodel name\t: QEMU TCG CPU version 2.5+\n"

# A stand-in for gem5's m5 utility: it logs each call, answers the sum probe and hands
# out a readfile script, as gem5 would.
FAKE_BRIDGE = """#!/bin/sh
echo "$*" >> "$CALLS"
case "$1" in
    sum) echo "Sum is 21." ;;
    readfile) [ -n "${READFILE:-}" ] && cat "$READFILE" ;;
esac
exit "${BRIDGE_STATUS:-0}"
"""
# What a real CPU does with m5's magic instruction.
SIGILL_BRIDGE = """#!/bin/sh
echo "$*" >> "$CALLS"
kill -ILL $$
"""


# --- the boot scripts, on this host with a stand-in gem5 ---------------------------------


@dataclass(frozen=True)
class Ran:
    code: int
    stdout: str
    stderr: str
    calls: list[str]  # gem5-bridge calls, in order


class Guest:
    """A fake guest: its /proc/cmdline, /proc/cpuinfo, architecture and gem5-bridge."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.bin = root / "bin"
        self.bin.mkdir()
        self.calls = root / "calls"
        self.cmdline = "console=ttyS0 root=/dev/sda2"
        self.cpuinfo = GEM5_CPUINFO
        self.arch = "x86_64"
        self.env: dict[str, str] = {}

    def bridge(self, script: str = FAKE_BRIDGE) -> None:
        path = self.bin / "gem5-bridge"
        path.write_text(script)
        path.chmod(0o755)

    def run(self, name: str, *args: str) -> Ran:
        (self.root / "cmdline").write_text(self.cmdline + "\n")
        (self.root / "cpuinfo").write_text(self.cpuinfo)
        env = {
            "PATH": f"{self.bin}:{FILES}:/usr/bin:/bin",
            "CALLS": os.fspath(self.calls),
            "GEM5_DETECT_CMDLINE": os.fspath(self.root / "cmdline"),
            "GEM5_DETECT_CPUINFO": os.fspath(self.root / "cpuinfo"),
            "GEM5_DETECT_ARCH": self.arch,
            "TMPDIR": os.fspath(self.root),
            **self.env,
        }
        proc = subprocess.run(
            ["sh", os.fspath(FILES / name), *args],
            capture_output=True,
            text=True,
            env=env,
            timeout=60,
            check=False,
        )
        calls = self.calls.read_text().splitlines() if self.calls.exists() else []
        self.calls.unlink(missing_ok=True)
        return Ran(proc.returncode, proc.stdout, proc.stderr, calls)


@pytest.fixture
def guest(tmp_path: Path) -> Guest:
    return Guest(tmp_path)


def test_detect_on_x86_trusts_cpuinfo_and_never_runs_m5(guest: Guest) -> None:
    """On x86 m5 reads physical memory: outside gem5 it must not run at all."""
    guest.bridge()
    in_gem5 = guest.run("gem5-detect")
    assert (in_gem5.code, in_gem5.calls) == (0, [])
    assert "Fake gem5 x86_64 CPU" in in_gem5.stdout
    guest.cpuinfo = QEMU_CPUINFO
    outside = guest.run("gem5-detect")
    assert (outside.code, outside.calls) == (1, [])
    assert outside.stdout.startswith("not gem5: the CPU is QEMU TCG CPU")


def test_detect_honours_the_kernel_command_line(guest: Guest) -> None:
    guest.bridge()
    guest.cmdline += " gem5=0"
    assert guest.run("gem5-detect").code == 1
    guest.cpuinfo = QEMU_CPUINFO
    guest.cmdline = "console=ttyS0 gem5=1"
    forced = guest.run("gem5-detect", "-q")
    assert (forced.code, forced.stdout) == (0, "")


def test_detect_without_m5_cannot_talk_to_gem5(guest: Guest) -> None:
    ran = guest.run("gem5-detect")
    assert ran.code == 2
    assert "gem5-bridge (m5) is not installed" in ran.stdout


def test_detect_on_other_isas_survives_sigill(guest: Guest) -> None:
    """Elsewhere the probe is m5's magic instruction: SIGILL outside gem5 kills only it."""
    guest.arch = "aarch64"
    guest.bridge(SIGILL_BRIDGE)
    outside = guest.run("gem5-detect")
    assert outside.code == 1
    assert outside.calls == ["sum 1 2 3 4 5 6"]
    assert "Illegal instruction" not in outside.stderr + outside.stdout
    guest.bridge()
    assert guest.run("gem5-detect").code == 0


def test_after_boot_in_gem5_runs_the_readfile_script_between_two_exits(guest: Guest) -> None:
    guest.bridge()
    script = guest.root / "readfile"
    # no "#!": gem5 scripts are often bare commands, run with bash as gem5-resources does
    script.write_text('[[ -n "$BASH_VERSION" ]] && echo "script ran in bash"\nexit 3\n')
    guest.env["READFILE"] = os.fspath(script)
    ran = guest.run("gem5-after-boot")
    assert ran.code == 0, ran.stderr
    assert ran.calls == ["exit", "readfile", "exit"]
    assert "script ran in bash" in ran.stdout
    assert "the readfile script ended with status 3; m5 exit" in ran.stdout
    assert not list(guest.root.glob("gem5-readfile.*")), "the script file is removed"


def test_after_boot_interactive_stops_at_the_shell(guest: Guest) -> None:
    guest.bridge()
    guest.cmdline += " interactive"
    ran = guest.run("gem5-after-boot")
    assert ran.calls == ["exit"]
    assert "interactive: leaving you at the shell" in ran.stdout


def test_after_boot_exits_the_simulation_when_readfile_fails(guest: Guest) -> None:
    guest.bridge()
    guest.env["BRIDGE_STATUS"] = "1"
    ran = guest.run("gem5-after-boot")
    assert ran.calls == ["exit", "readfile", "exit"]
    assert "m5 readfile failed" in ran.stdout


def test_after_boot_outside_gem5_calls_no_m5(guest: Guest) -> None:
    guest.bridge()
    guest.cpuinfo = QEMU_CPUINFO
    ran = guest.run("gem5-after-boot")
    assert (ran.code, ran.calls) == (0, [])
    assert "gem5-after-boot: not running under gem5" in ran.stdout


def test_init_signals_gem5_then_starts_systemd(guest: Guest) -> None:
    guest.bridge()
    systemd = guest.bin / "systemd"
    systemd.write_text('#!/bin/sh\necho "systemd $*" >> "$CALLS"\n')
    systemd.chmod(0o755)
    guest.env["GEM5_INIT_SYSTEMD"] = os.fspath(systemd)
    ran = guest.run("gem5-init")
    assert ran.code == 0, ran.stderr
    assert ran.calls == ["exit", "systemd "]
    assert "gem5-init: the kernel is up; telling gem5 (m5 exit)" in ran.stdout
    guest.cpuinfo = QEMU_CPUINFO
    assert guest.run("gem5-init").calls == ["systemd "]


# --- the root partition number -------------------------------------------------------


def write_recipe(tmp_path: Path, disk: str) -> Path:
    (tmp_path / "Dockerfile").write_text("FROM scratch\n")
    (tmp_path / "recipe.toml").write_text(f"[disk]\n{disk}\n")
    return tmp_path


def test_root_partition_is_read_from_the_recipe(tmp_path: Path) -> None:
    rcp = load(write_recipe(tmp_path, 'table = "gpt"\nroot_partition = 2'))
    assert rcp.disk.root_partition == 2
    assert load(write_recipe(tmp_path, 'table = "mbr"')).disk.root_partition == 1


@pytest.mark.parametrize(
    ("disk", "expected"),
    [
        ('table = "mbr"\nroot_partition = 5', 'a mbr partition from 1 to 4 (table = "gpt"'),
        ('table = "gpt"\nroot_partition = 0', "a gpt partition from 1 to 128"),
        ('table = "none"\nroot_partition = 1', 'no root_partition with table = "none"'),
        ('root_partition = "2"', "a whole number"),
    ],
)
def test_a_root_partition_the_table_cannot_hold_is_refused(
    tmp_path: Path, disk: str, expected: str
) -> None:
    with pytest.raises(RecipeError, match=r"disk\.root_partition") as info:
        load(write_recipe(tmp_path, disk))
    assert expected in str(info.value)


# --- recipes/gem5-debian, built with the real Docker Engine ----------------------------


@pytest.fixture(scope="module")
def gem5_build(base_image: str, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`oci2disk build recipes/gem5-debian` with the m5 stage off (no gem5 source here)."""
    out = tmp_path_factory.mktemp("gem5-debian")
    result = oci2disk(
        "build",
        str(ROOT / "recipes" / "gem5-debian"),
        "-o",
        str(out),
        "--build-arg",
        f"BASE={base_image}",
        "--build-arg",
        "M5_SOURCE=none",
    )
    assert result.code == 0, result.stderr
    return out


@pytest.fixture(scope="module")
def manifest(gem5_build: Path) -> dict[str, object]:
    data: dict[str, object] = json.loads((gem5_build / "disk.manifest.json").read_text())
    return data


@pytest.fixture(scope="module")
def rootfs(gem5_build: Path) -> Iterator[extfs.ExtFs]:
    with extfs.open_filesystem(gem5_build / "disk.raw", partition=2) as fs:
        yield fs


def resolve(fs: extfs.ExtFs, path: str) -> str:
    """``path`` with every symlink in it followed, inside the image."""
    done: list[str] = []
    todo = [p for p in path.split("/") if p]
    for _ in range(40):
        if not todo:
            return "/" + "/".join(done)
        part = todo.pop(0)
        entry = fs.lookup("/".join([*done, part]))
        assert entry is not None, f"/{'/'.join([*done, part])} is missing"
        if entry.kind is Kind.SYMLINK:
            target = entry.linkname
            done = [] if target.startswith("/") else done
            todo = [p for p in target.split("/") if p] + todo
        elif part == "..":
            done = done[:-1]
        elif part != ".":
            done.append(part)
    raise AssertionError(f"symlink loop at {path}")


def read(fs: extfs.ExtFs, path: str) -> str:
    with fs.open(resolve(fs, path).lstrip("/")) as f:
        return f.read().decode()


@pytest.mark.slow
@pytest.mark.docker
def test_gem5_disk_holds_exactly_the_image(gem5_build: Path) -> None:
    result = oci2disk("verify", str(gem5_build / "disk.raw"), "--against", f"docker-daemon:{IMAGE}")
    assert result.code == 0, result.stdout + result.stderr
    assert "equal" in result.stdout + result.stderr


@pytest.mark.slow
@pytest.mark.docker
def test_gem5_root_is_on_the_partition_the_manifest_names(
    gem5_build: Path, manifest: dict[str, object]
) -> None:
    assert manifest["root_partition"] == 2  # DiskImageResource(root_partition="2")
    filesystem = manifest["filesystem"]
    assert isinstance(filesystem, dict)
    parts = {p.number: p for p in partitions.read_partitions(gem5_build / "disk.raw")}
    assert sorted(parts) == [1, 2]
    # partition 1: an empty 1 MiB BIOS boot partition, as in gem5-resources' images
    assert parts[1].type == "21686148-6449-6e6f-744e-656564454649"
    assert (parts[1].start, parts[1].size) == (MiB, MiB)
    assert parts[2].is_linux
    assert parts[2].start == filesystem["offset"] == 2 * MiB
    with extfs.open_filesystem(gem5_build / "disk.raw") as fs:  # what verify/boot pick
        assert fs.uuid == filesystem["uuid"]
    out = subprocess.run(
        ["sfdisk", "--json", os.fspath(gem5_build / "disk.raw")],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    table = json.loads(out)["partitiontable"]["partitions"]
    assert table[1]["uuid"].lower() == manifest["root_partuuid"]  # root=PARTUUID=...


@pytest.mark.slow
@pytest.mark.docker
def test_gem5_boot_flow_is_in_the_image(rootfs: extfs.ExtFs, manifest: dict[str, object]) -> None:
    # /sbin/init is the init wrapper; the distribution's init is diverted beside it
    assert resolve(rootfs, "/sbin/init") == "/usr/local/sbin/gem5-init"
    assert read(rootfs, "/sbin/init") == (FILES / "gem5-init").read_text()
    assert "/sbin/init.systemd" in read(rootfs, "/var/lib/dpkg/diversions")
    assert resolve(rootfs, "/sbin/init.systemd") == "/usr/lib/systemd/systemd"
    for path in ("usr/local/sbin/gem5-init", "usr/local/bin/gem5-detect"):
        entry = rootfs.lookup(path)
        assert entry is not None and stat.S_IMODE(entry.mode) == 0o755
    hook = read(rootfs, "/etc/profile.d/gem5-after-boot.sh")
    assert "/usr/local/bin/gem5-after-boot" in hook
    # the serial console logs the gem5 user in
    getty = read(rootfs, "/etc/systemd/system/serial-getty@.service.d/autologin.conf")
    assert "--autologin gem5" in getty
    passwd = read(rootfs, "/etc/passwd")
    assert re.search(r"^gem5:x:1000:1000:[^:]*:/home/gem5:/bin/bash$", passwd, re.M)
    sudoers = rootfs.lookup("etc/sudoers.d/gem5")
    assert sudoers is not None and stat.S_IMODE(sudoers.mode) == 0o440
    assert "d /run/gem5 0755 gem5 gem5" in read(rootfs, "/usr/lib/tmpfiles.d/gem5.conf")
    # systemd boots to multi-user, with networking and periodic jobs off
    assert resolve(rootfs, "/etc/systemd/system/default.target").endswith("/multi-user.target")
    for unit in ("systemd-networkd-wait-online.service", "systemd-networkd.service"):
        assert rootfs.read_symlink(f"etc/systemd/system/{unit}") == "/dev/null"
    # names: fstab by UUID so /dev/hda2, /dev/sda2 and root=PARTUUID= all match it
    filesystem = manifest["filesystem"]
    assert isinstance(filesystem, dict)
    fstab = read(rootfs, "/etc/fstab")
    assert re.search(rf"^UUID={filesystem['uuid']}\s+/\s+ext4\s", fstab, re.M)
    assert read(rootfs, "/etc/hostname") == "gem5\n"
    assert re.search(r"^127\.0\.1\.1\s+gem5$", read(rootfs, "/etc/hosts"), re.M)
    # M5_SOURCE=none: no m5 at all, nothing that pretends to be one
    for name in ("gem5-bridge", "m5"):
        assert rootfs.lookup(f"usr/local/bin/{name}") is None
    assert rootfs.lookup("usr/local/lib/libm5.a") is None


ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


@pytest.mark.slow
@pytest.mark.docker
def test_gem5_image_boots_normally_outside_gem5(gem5_build: Path) -> None:
    """The one QEMU boot: systemd, the autologin, and a post-boot step that does nothing."""
    disk = gem5_build / "disk.raw"
    log = gem5_build / "boot.log"
    result = oci2disk(
        "boot", str(disk), "--expect", r"gem5@gem5:~\$", "--timeout", "300", "--log", str(log)
    )
    console = ANSI.sub("", log.read_text(errors="replace")).replace("\r", "")
    assert result.code == 0, f"{result.stderr}\nconsole tail:\n{console[-3000:]}"
    init = console.index("gem5-init: the kernel is up; not calling m5: not gem5: the CPU is")
    target = console.index("Reached target multi-user.target")
    login = console.index("gem5 login: gem5 (automatic login)")
    after = console.index("gem5-after-boot: not running under gem5")
    prompt = console.index("gem5@gem5:~$")
    assert init < target < login < after < prompt
    assert "gem5-bridge (m5) is not installed" in console[after:prompt]
    assert "EXT4-fs (vda2): mounted filesystem" in console  # root on partition 2
    for bad in ("Illegal instruction", "invalid opcode", "Kernel panic", "emergency mode"):
        assert bad not in console
    print(f"\n{result.stdout.strip()}")


ELF = b"\x7fELF"


def bzimage_version(vmlinuz: bytes) -> str:
    """The version string an x86 bzImage carries in its setup header (what `file` shows)."""
    assert vmlinuz[0x202:0x206] == b"HdrS", "not an x86 bzImage"
    start = int.from_bytes(vmlinuz[0x20E:0x210], "little") + 0x200
    return vmlinuz[start : vmlinuz.index(b"\0", start)].decode()


@pytest.mark.slow
@pytest.mark.docker
def test_vmlinux_is_the_elf_kernel_of_the_images_vmlinuz(gem5_build: Path) -> None:
    """[kernel] vmlinux = true: gem5 loads an uncompressed ELF vmlinux, as extract-vmlinux
    makes from vmlinuz; it must be that very kernel."""
    vmlinux = (gem5_build / "vmlinux").read_bytes()
    assert vmlinux.startswith(ELF)
    assert vmlinux[4] == 2 and int.from_bytes(vmlinux[18:20], "little") == 0x3E  # x86-64
    # bzImage: "6.1.0-18-amd64 (debian-kernel@lists.debian.org) #1 SMP ... Debian 6.1.76-1 (...)"
    # linux_banner: "Linux version 6.1.0-18-amd64 (debian-kernel@...) (gcc-12 ...) #1 SMP ..."
    version = bzimage_version((gem5_build / "vmlinuz").read_bytes())
    release, build = version.split(" ", 1)[0], version.rsplit(") ", 1)[1]
    # (Debian's vmlinux also holds a copy of the banner without the build number)
    banners = re.findall(rb"Linux version (\S+) \(.*?\) (#[^\n]*)\n", vmlinux)
    assert (release.encode(), build.encode()) in banners, banners
    assert (gem5_build / "vmlinux").stat().st_size > 4 * (gem5_build / "vmlinuz").stat().st_size


@pytest.mark.slow
@pytest.mark.docker
def test_gem5_layout_works_beyond_8_gib(
    gem5_build: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """gem5img.py caps images near 8 GiB; a 10 GiB disk with root on partition 2 works
    (and stays sparse: only the written blocks take space)."""
    out = tmp_path_factory.mktemp("gem5-10g") / "disk.raw"
    spec = DiskSpec(table=Table.GPT, size=10 * GiB, label="gem5-root", root_partition=2)
    run = convert_ref(f"docker-daemon:{IMAGE}", Format.RAW, out, ConvertOptions(disk=spec))
    assert out.stat().st_size == 10 * GiB
    assert out.stat().st_blocks * 512 < 2 * GiB
    assert run.manifest.filesystem is not None
    assert run.manifest.filesystem.root_partition == 2
    with extfs.open_filesystem(out, partition=2) as fs:
        assert fs.size > 9 * GiB
        assert fs.lookup("usr/local/sbin/gem5-init") is not None
    fsck = subprocess.run(
        ["e2fsck", "-fn", f"{out}?offset={2 * MiB}"], capture_output=True, text=True, check=False
    )
    assert fsck.returncode == 0, fsck.stdout + fsck.stderr
