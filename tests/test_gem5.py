"""recipes/gem5-ubuntu and its Debian twin: a disk image gem5 full-system simulation boots.

The fast tests run the image's boot scripts on this host (they are POSIX sh, as /bin/sh
runs them in the image) with a stand-in gem5-bridge that records its calls, so the gem5
side of the boot flow (both exit protocols, readfile, the gem5_bridge driver, the guard)
is checked without gem5, and gem5-detect reads recorded /proc/cpuinfo files
(tests/data/gem5/cpuinfo). The slow tests build recipes/gem5-debian with the real Docker
Engine (the m5 stage switched off with M5_SOURCE=none, as no gem5 source is reachable
here), read the disk it wrote, and boot it under QEMU: once as it is (outside gem5), and
once per exit protocol with gem5=1 and a stand-in m5 that prints each call on the
console (tests/data/gem5/gem5-standin).
"""

from __future__ import annotations

import gzip
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
from oci2disk.convert.disk import plan_layout
from oci2disk.convert.kernel import extract_vmlinux
from oci2disk.diskimage import extfs, partitions
from oci2disk.errors import ConvertError, RecipeError
from oci2disk.pipeline import convert_ref
from oci2disk.recipe import DiskSpec, Format, Table, load
from oci2disk.rootfs import Kind, RootfsStats

ROOT = Path(__file__).resolve().parent.parent
FILES = ROOT / "recipes" / "gem5-ubuntu" / "files"
DATA = ROOT / "tests" / "data" / "gem5"
CPUINFO = DATA / "cpuinfo"
IMAGE = "oci2disk-recipe/gem5-debian:latest"
IMAGE_V24 = "oci2disk-test/gem5-debian-v24:latest"
GiB = 1 << 30
MiB = 1 << 20

GEM5_CPUINFO = "vendor_id\t: HygonGenuine\nmodel name\t: Fake gem5 x86_64 CPU\n"
QEMU_CPUINFO = "vendor_id\t: AuthenticAMD\nmodel name\t: QEMU TCG CPU version 2.5+\n"

# A stand-in for gem5's m5 utility: it logs each call, answers the sum probe and hands
# out a readfile script, as gem5 would.
FAKE_BRIDGE = """#!/bin/sh
echo "$*" >> "$CALLS"
case "$1" in --*) shift ;; esac  # the call type (--addr=..., --inst)
case "$1" in
    sum) echo "Sum is 21." ;;
    readfile) [ -n "${READFILE:-}" ] && cat "$READFILE" ;;
esac
exit "${BRIDGE_STATUS:-0}"
"""
# What modprobe says when the image has no gem5_bridge module for its kernel.
FAILING_MODPROBE = """#!/bin/sh
echo "modprobe $*" >> "$CALLS"
echo "modprobe: FATAL: Module gem5_bridge not found in directory /lib/modules/6.8.0-gem5"
exit 1
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
        self.env: dict[str, str] = {"GEM5_M5_CONF": os.fspath(root / "m5.conf")}
        # never the host's modprobe or systemd: gem5-init loads a driver, then execs systemd
        self.tool("modprobe", FAILING_MODPROBE)
        self.tool("systemd", '#!/bin/sh\necho "systemd $*" >> "$CALLS"\n')
        self.env["GEM5_INIT_SYSTEMD"] = os.fspath(self.bin / "systemd")

    def tool(self, name: str, script: str) -> None:
        path = self.bin / name
        path.write_text(script)
        path.chmod(0o755)

    def built_for(self, gem5_ref: str, protocol: str, driver: bool) -> None:
        """The m5.conf the Dockerfile writes for GEM5_REF."""
        (self.root / "m5.conf").write_text(
            f"GEM5_REF={gem5_ref}\nGEM5_PROTOCOL={protocol}\n"
            f"GEM5_BRIDGE_DRIVER={'yes' if driver else 'no'}\n"
        )

    def bridge(self, script: str = FAKE_BRIDGE) -> None:
        self.tool("gem5-bridge", script)

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


GEM5_CPUS = sorted(p.name for p in CPUINFO.glob("gem5-*"))
OTHER_CPUS = sorted(
    p.name for p in CPUINFO.iterdir() if not p.name.startswith(("gem5-", "renamed-", "README"))
)


def test_every_recorded_cpu_is_classified() -> None:
    assert len(GEM5_CPUS) == 3  # before v22.1, v22.1-v23.0, v23.1 and later
    assert {"qemu-tcg", "real-intel-core-i7", "real-hygon-c86"} <= set(OTHER_CPUS)


@pytest.mark.parametrize("cpu", GEM5_CPUS)
def test_detect_knows_the_cpuid_of_every_gem5_generation(guest: Guest, cpu: str) -> None:
    """gem5 v22.1-v23.0 says "HygonGenuine" / "Fake M5 x86_64 CPU": missed, it hung."""
    guest.bridge()
    guest.cpuinfo = (CPUINFO / cpu).read_text()
    ran = guest.run("gem5-detect")
    assert (ran.code, ran.calls) == (0, []), ran.stdout
    assert ran.stdout.startswith("gem5: the CPU is gem5's: Fake ")


@pytest.mark.parametrize("cpu", OTHER_CPUS)
def test_detect_says_no_for_qemu_and_real_cpus_without_running_m5(guest: Guest, cpu: str) -> None:
    guest.bridge()
    guest.cpuinfo = (CPUINFO / cpu).read_text()
    ran = guest.run("gem5-detect")
    assert (ran.code, ran.calls) == (1, []), ran.stdout
    assert ran.stdout.startswith("not gem5: the CPU is ")


def test_detect_asks_m5_when_cpuid_is_unknown(guest: Guest) -> None:
    """A config that renames gem5's CPU: CPUID cannot tell, so the harmless sum probe
    (a ROM read outside gem5) decides instead of skipping m5 and hanging the run."""
    guest.cpuinfo = (CPUINFO / "renamed-gem5-custom-strings").read_text()
    guest.bridge()
    in_gem5 = guest.run("gem5-detect")
    assert (in_gem5.code, in_gem5.calls) == (0, ["sum 1 2 3 4 5 6"])
    assert "gem5 answered the m5 sum probe" in in_gem5.stdout
    guest.bridge('#!/bin/sh\necho "$*" >> "$CALLS"\necho "Sum is -1094795586."\n')  # ROM junk
    outside = guest.run("gem5-detect")
    assert (outside.code, outside.calls) == (1, ["sum 1 2 3 4 5 6"])
    guest.cmdline += " gem5=0"  # the override comes first: no probe at all
    assert guest.run("gem5-detect").calls == []


# GEM5_REF -> what the boot scripts call, as gem5 sees it (classic: gem5 <= v24.1).
PROTOCOLS = {
    "v24.1.0.3": ("classic", ["exit", "exit", "readfile", "exit"]),
    "v25.1.0.0": ("hypercall", ["hypercall 1", "hypercall 2", "readfile", "hypercall 3"]),
}


def boot_calls(guest: Guest) -> list[str]:
    """gem5-init then gem5-after-boot (systemd stood in for), their gem5-bridge calls."""
    init = guest.run("gem5-init")
    assert init.code == 0, init.stderr
    after = guest.run("gem5-after-boot")
    assert after.code == 0, after.stderr
    assert "readfile script ran" in after.stdout
    return [c for c in init.calls + after.calls if not c.startswith(("modprobe", "systemd"))]


@pytest.mark.parametrize("gem5_ref", sorted(PROTOCOLS))
def test_boot_signals_gem5_in_the_protocol_of_its_version(guest: Guest, gem5_ref: str) -> None:
    protocol, expected = PROTOCOLS[gem5_ref]
    guest.built_for(gem5_ref, protocol, driver=False)
    guest.bridge()
    script = guest.root / "readfile"
    script.write_text("echo readfile script ran\n")
    guest.env["READFILE"] = os.fspath(script)
    assert boot_calls(guest) == expected


def test_v25_loads_the_gem5_bridge_driver_before_the_first_call(guest: Guest) -> None:
    guest.built_for("v25.1.0.0", "hypercall", driver=True)
    guest.bridge()
    # the driver's node appears when it loads (here a link to a character device)
    guest.tool("modprobe", '#!/bin/sh\necho "modprobe $*" >> "$CALLS"\nln -s /dev/null "$DEV"\n')
    guest.env["GEM5_BRIDGE_DEV"] = guest.env["DEV"] = os.fspath(guest.root / "gem5_bridge")
    guest.cmdline += " gem5_bridge_baseaddr=0xfeed0000"
    ran = guest.run("gem5-init")
    assert ran.calls[0] == (
        "modprobe gem5_bridge gem5_bridge_baseaddr=0xfeed0000 gem5_bridge_rangesize=0x10000"
    )
    assert ran.calls[1] == "hypercall 1"  # through /dev/gem5_bridge: no call type added
    assert "loaded the gem5_bridge driver" in ran.stdout


def test_v25_without_the_driver_falls_back_to_dev_mem_and_says_so(guest: Guest) -> None:
    """m5 of gem5 v25 has no fallback of its own: without /dev/gem5_bridge every call
    would fail and the run would never end."""
    guest.built_for("v25.1.0.0", "hypercall", driver=True)
    guest.bridge()
    guest.env["GEM5_BRIDGE_DEV"] = os.fspath(guest.root / "no-such-device")
    script = guest.root / "readfile"
    script.write_text("echo readfile script ran\n")
    guest.env["READFILE"] = os.fspath(script)
    init = guest.run("gem5-init")
    assert "gem5-init: cannot load the gem5_bridge driver (modprobe: FATAL: Module" in init.stdout
    assert "m5 calls go through /dev/mem instead (--addr=0xffff0000)" in init.stdout
    assert boot_calls(guest) == [f"--addr=0xffff0000 {c}" for c in PROTOCOLS["v25.1.0.0"][1]]
    # /sbin/m5 of a legacy rcS script that names its own call type: left alone
    assert guest.run("gem5-m5", "--addr=0x10010000", "exit").calls == ["--addr=0x10010000 exit"]
    guest.arch = "riscv64"  # no magic address there: m5's magic instruction
    guest.cmdline += " gem5=1"
    assert guest.run("gem5-after-boot").calls[0] == "--inst hypercall 2"


def test_gem5_0_never_loads_the_driver(guest: Guest) -> None:
    guest.built_for("v25.1.0.0", "hypercall", driver=True)
    guest.bridge()
    guest.cmdline += " gem5=0"
    ran = guest.run("gem5-init")
    assert not [c for c in ran.calls if c.startswith(("modprobe", "hypercall"))]


@pytest.mark.parametrize("gem5_ref", sorted(PROTOCOLS))
def test_interactive_stops_after_the_second_signal(guest: Guest, gem5_ref: str) -> None:
    protocol, expected = PROTOCOLS[gem5_ref]
    guest.built_for(gem5_ref, protocol, driver=False)
    guest.bridge()
    guest.cmdline += " interactive=true"
    ran = guest.run("gem5-after-boot")
    assert ran.calls == [expected[1]]
    assert "interactive: leaving you at the shell" in ran.stdout


def test_m5_wrapper_refuses_an_unknown_event(guest: Guest) -> None:
    guest.bridge()
    ran = guest.run("gem5-m5", "event", "rebooted")
    assert ran.code == 2 and ran.calls == []
    assert "usage: gem5-m5 event booted|started|done" in ran.stderr


@pytest.mark.parametrize(
    ("gem5_ref", "conf"),
    [
        ("v22.1.0.0", "GEM5_PROTOCOL=classic\nGEM5_BRIDGE_DRIVER=no"),
        ("v24.1.0.3", "GEM5_PROTOCOL=classic\nGEM5_BRIDGE_DRIVER=no"),
        ("v25.0.0.1", "GEM5_PROTOCOL=hypercall\nGEM5_BRIDGE_DRIVER=yes"),
        ("v25.1.0.0", "GEM5_PROTOCOL=hypercall\nGEM5_BRIDGE_DRIVER=yes"),
        ("develop", "GEM5_PROTOCOL=hypercall\nGEM5_BRIDGE_DRIVER=yes"),
    ],
)
def test_gem5_ref_picks_the_protocol(tmp_path: Path, gem5_ref: str, conf: str) -> None:
    out = tmp_path / "etc" / "m5.conf"
    ran = subprocess.run(
        ["sh", os.fspath(FILES / "m5-conf"), gem5_ref, os.fspath(out)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert ran.returncode == 0, ran.stderr
    assert f"GEM5_REF={gem5_ref}\n{conf}\n" in out.read_text()


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


# --- kernels and disks gem5 can use --------------------------------------------------


def arm64_image() -> bytes:
    """The start of an arm64 kernel Image: the header of Documentation/arch/arm64/booting.rst."""
    header = bytearray(0x40)
    header[0x38:0x3C] = b"ARM\x64"
    return bytes(header) + b"\0" * 4096


def riscv64_image() -> bytes:
    header = bytearray(0x40)
    header[0x30:0x38] = b"RISCV\0\0\0"
    header[0x38:0x3C] = b"RSC\x05"
    return bytes(header) + b"\0" * 4096


def efi_zboot(payload: bytes) -> bytes:
    """An EFI zboot kernel (arm64/riscv64 vmlinuz.efi): "MZ", "zimg", then the payload."""
    header = bytearray(64)
    header[0:2] = b"MZ"
    header[4:8] = b"zimg"
    return bytes(header) + b"\0" * 1000 + gzip.compress(payload)


@pytest.mark.parametrize(
    ("vmlinuz", "kind"),
    [
        (gzip.compress(arm64_image()), "an arm64 Image"),  # Debian's and Ubuntu's arm64 vmlinuz
        (arm64_image(), "an arm64 Image"),
        (riscv64_image(), "a riscv64 Image"),
        (efi_zboot(arm64_image()), "an EFI zboot image (a compressed arm64/riscv64 Image)"),
    ],
)
def test_vmlinux_of_an_arm64_or_riscv_kernel_says_there_is_no_elf_inside(
    tmp_path: Path, vmlinuz: bytes, kind: str
) -> None:
    """gem5 loads ELF kernels only; an Image is not one, whatever its compression."""
    with pytest.raises(ConvertError) as info:
        extract_vmlinux(vmlinuz, tmp_path)
    assert f"the kernel image is {kind}, which has no ELF kernel (vmlinux) inside" in str(
        info.value
    )
    hint = info.value.hint or ""
    assert "gem5 a vmlinux from a kernel build" in hint
    assert "drop vmlinux = true" in hint
    assert "lzo" not in str(info.value) + hint


@pytest.mark.parametrize("recipe", ["gem5-ubuntu", "gem5-debian"])
def test_gem5_recipes_cap_the_disk_at_what_ide_addresses(recipe: str) -> None:
    assert load(ROOT / "recipes" / recipe).disk.max_size == 128 * GiB  # LBA28: 2**28 sectors


def test_a_gem5_disk_over_128_gib_is_an_error(tmp_path: Path) -> None:
    # the [disk] section of recipes/gem5-debian, with a fixed size
    toml = (ROOT / "recipes" / "gem5-debian" / "recipe.toml").read_text()
    disk = toml.split("[disk]\n", 1)[1].split("\n[", 1)[0]
    big = disk.replace('size = "auto"', 'size = "200G"')
    with pytest.raises(RecipeError, match=r"disk\.size: expected at most disk\.max_size \(128G"):
        load(write_recipe(tmp_path, big))
    exact = disk.replace('size = "auto"', 'size = "128G"')
    assert load(write_recipe(tmp_path, exact)).disk.size == 128 * GiB  # the limit itself is fine
    # size = "auto" grows with the content: a 130 GiB image is refused before writing
    stats = RootfsStats(
        entries=10, files=9, dirs=1, symlinks=0, hardlinks=0, specials=0, data_bytes=130 * GiB
    )
    spec = DiskSpec(table=Table.GPT, root_partition=2, max_size=128 * GiB)
    with pytest.raises(ConvertError, match=r"more than the recipe's disk\.max_size 128\.0 GiB"):
        plan_layout(stats, spec)
    small = RootfsStats(
        entries=10, files=9, dirs=1, symlinks=0, hardlinks=0, specials=0, data_bytes=GiB
    )
    assert plan_layout(small, spec).disk_bytes < 2 * GiB


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
    # verify expects what the recipe writes: its label, its UUID, its fstab
    recipe = str(ROOT / "recipes" / "gem5-debian")
    result = oci2disk(
        "verify", str(gem5_build / "disk.raw"), "--against", f"docker-daemon:{IMAGE}",
        "--recipe", recipe,
    )  # fmt: skip
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
    # the post-boot step is the last line of the gem5 user's .bashrc, as in gem5-resources
    bashrc = read(rootfs, "/home/gem5/.bashrc").rstrip("\n").splitlines()
    assert bashrc[-1] == "[ -x /usr/local/bin/gem5-after-boot ] && /usr/local/bin/gem5-after-boot"
    assert rootfs.lookup("etc/profile.d/gem5-after-boot.sh") is None
    # the default GEM5_REF is the newest gem5 release: hypercalls through gem5_bridge
    m5_conf = read(rootfs, "/usr/local/etc/gem5/m5.conf")
    assert "GEM5_REF=v25.1.0.0\nGEM5_PROTOCOL=hypercall\nGEM5_BRIDGE_DRIVER=yes\n" in m5_conf
    assert read(rootfs, "/usr/local/bin/gem5-m5") == (FILES / "gem5-m5").read_text()
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
    for name in ("usr/local/bin/gem5-bridge", "usr/local/bin/m5", "usr/sbin/m5"):
        assert rootfs.lookup(name) is None
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


@pytest.mark.slow
@pytest.mark.docker
@pytest.mark.parametrize(
    ("gem5_ref", "message"),
    [
        ("main", "GEM5_REF=main: not a gem5 release tag"),
        ("v20.1.0.5", "GEM5_REF=v20.1.0.5: gem5 before v21.0 is not supported"),
    ],
)
def test_a_gem5_ref_the_recipe_cannot_support_fails_the_build(
    base_image: str, tmp_path: Path, gem5_ref: str, message: str
) -> None:
    result = oci2disk(
        "build",
        str(ROOT / "recipes" / "gem5-debian"),
        "-o",
        str(tmp_path),
        "--build-arg",
        f"BASE={base_image}",
        "--build-arg",
        "M5_SOURCE=none",
        "--build-arg",
        f"GEM5_REF={gem5_ref}",
    )
    assert result.code == 1
    assert message in result.stderr
    assert not list(tmp_path.iterdir())


def standin_disk(image: str, out: Path) -> Path:
    """tests/data/gem5/gem5-standin on top of ``image``: the recording m5 stand-in."""
    result = oci2disk(
        "build", str(DATA / "gem5-standin"), "-o", str(out), "--build-arg", f"IMAGE={image}"
    )
    assert result.code == 0, result.stderr
    return out / "disk.raw"


def boot_console(disk: Path, append: str) -> str:
    log = disk.with_name("boot.log")
    result = oci2disk(
        "boot",
        str(disk),
        "--append",
        append,
        "--expect",
        r"gem5@gem5:~\$",
        "--timeout",
        "300",
        "--log",
        str(log),
    )
    console = ANSI.sub("", log.read_text(errors="replace")).replace("\r", "")
    assert result.code == 0, f"{result.stderr}\nconsole tail:\n{console[-3000:]}"
    print(f"\n{result.stdout.strip()}")
    return console


def check_readfile_run(console: str, calls: list[str]) -> None:
    """What gem5 would see: the stand-in's calls in order, the readfile script's whole
    output between the readfile call and the last signal, then the shell."""
    found = [(m.start(), m[1]) for m in re.finditer(r"^gem5-standin: m5 (.*)$", console, re.M)]
    assert [call for _, call in found] == calls
    at = [start for start, _ in found]
    first = console.index("readfile script: user gem5, STANDIN_FROM_BASHRC=yes")
    last = console.index("readfile script: the last line")
    ended = console.index("gem5-after-boot: the readfile script ended with status 0")
    prompt = console.index("gem5@gem5:~$", at[3])
    assert at[1] < at[2] < first < last < ended < at[3] < prompt
    for bad in ("Kernel panic", "emergency mode", "command not found", "Illegal instruction"):
        assert bad not in console


@pytest.mark.slow
@pytest.mark.docker
def test_gem5_v24_boot_gives_gem5_three_exits_around_the_readfile_script(
    gem5_build: Path, base_image: str, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """GEM5_REF=v24.1.0.3, systemd: a QEMU boot with gem5=1 and a stand-in m5."""
    # the recipe's own Dockerfile, built for gem5 v24 (the image oci2disk build would make)
    built = subprocess.run(
        [
            "docker",
            "build",
            "-q",
            "-t",
            IMAGE_V24,
            "--build-arg",
            f"BASE={base_image}",
            "--build-arg",
            "M5_SOURCE=none",
            "--build-arg",
            "GEM5_REF=v24.1.0.3",
            os.fspath(ROOT / "recipes" / "gem5-ubuntu"),
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    assert built.returncode == 0, built.stderr
    disk = standin_disk(IMAGE_V24, tmp_path_factory.mktemp("gem5-v24-standin"))
    console = boot_console(disk, "gem5=1")
    check_readfile_run(console, ["exit", "exit", "readfile", "exit"])
    init = console.index("gem5-init: the kernel is up; telling gem5 (m5 exit): gem5: gem5=1")
    assert init < console.index("gem5-standin: m5 exit")
    assert "gem5_bridge" not in console  # gem5 v24's m5 needs no driver
    systemd = console.index("gem5-init: starting systemd")
    target = console.index("Reached target multi-user.target")
    login = console.index("gem5 login: gem5 (automatic login)")
    assert init < systemd < target < login < console.index("gem5-after-boot: started")


@pytest.mark.slow
@pytest.mark.docker
def test_gem5_v25_boot_gives_gem5_hypercalls_without_systemd(
    gem5_build: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """The default GEM5_REF (v25): hypercalls 1, 2, 3; no gem5_bridge module in this
    image (M5_SOURCE=none), so the console says m5 goes through /dev/mem instead."""
    disk = standin_disk(IMAGE, tmp_path_factory.mktemp("gem5-v25-standin"))
    console = boot_console(disk, "gem5=1 no_systemd")
    addr = "--addr=0xffff0000"
    calls = [
        f"{addr} hypercall 1",
        f"{addr} hypercall 2",
        f"{addr} readfile",
        f"{addr} hypercall 3",
    ]
    check_readfile_run(console, calls)
    fallback = console.index(
        "gem5-init: cannot load the gem5_bridge driver (modprobe: FATAL: Module gem5_bridge"
    )
    assert f"m5 calls go through /dev/mem instead ({addr})" in console[fallback:]
    init = console.index("gem5-init: the kernel is up; telling gem5 (m5 hypercall 1)")
    no_systemd = console.index("gem5-init: no_systemd: logging in gem5 on the console")
    assert fallback < init < console.index(f"gem5-standin: m5 {calls[0]}") < no_systemd
    assert "Reached target" not in console and "automatic login" not in console
