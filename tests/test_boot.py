"""oci2disk.boot: QEMU boots watched on the serial console, kernels read out of images.

The fast tests boot a tiny hand-made "kernel" (a Linux boot-protocol header whose
real-mode code writes a message to the serial port and halts) in under a second under
TCG. The slow test builds recipes/debian-qemu with the real Docker Engine and boots
Debian to its login prompt.
"""

from __future__ import annotations

import io
import os
import re
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest

from clikit import oci2disk
from oci2disk import boot, run
from oci2disk.boot import BootSpec, kernel_cmdline, kernel_from_disk
from oci2disk.errors import BootError
from oci2disk.pipeline import boot_artifact
from oci2disk.progress import Progress
from oci2disk.rootfs import kernels
from oci2disk.rootfs.directory import DirectoryTree

FS_UUID = "6f1c2a3e-0d4b-4c5a-9e8f-0123456789ab"
MiB = 1024 * 1024


# --- helpers --------------------------------------------------------------------------


def fake_kernel(path: Path, message: bytes) -> Path:
    """Write a bzImage-shaped file whose setup code prints ``message`` on COM1 and halts.

    QEMU loads it like a kernel (boot protocol 2.02, "HdrS" header) and jumps to the
    real-mode entry at offset 0x200, which jumps over the header to this code:
        mov $0x3f8,%dx; mov $msg,%si
    1:  lodsb; test %al,%al; jz 2f; out %al,(%dx); jmp 1b
    2:  hlt; jmp 2b
    """
    setup_sects = 4
    image = bytearray((setup_sects + 1) * 512 + 4096)
    image[0x1F1] = setup_sects
    struct.pack_into("<H", image, 0x1FE, 0xAA55)
    image[0x200:0x202] = bytes([0xEB, 0x66])  # jmp 0x268, past the setup header
    image[0x202:0x206] = b"HdrS"
    struct.pack_into("<H", image, 0x206, 0x0202)
    image[0x211] = 0x01  # LOADED_HIGH
    code_at = 0x268
    msg_at = code_at + 17
    code = (
        bytes([0xBA, 0xF8, 0x03, 0xBE])
        + struct.pack("<H", msg_at)
        + bytes([0xAC, 0x84, 0xC0, 0x74, 0x03, 0xEE, 0xEB, 0xF8, 0xF4, 0xEB, 0xFD])
    )
    image[code_at : code_at + len(code)] = code
    image[msg_at : msg_at + len(message) + 1] = message + b"\0"
    path.write_bytes(bytes(image))
    return path


def qemu_processes_mentioning(text: str) -> list[int]:
    """PIDs of QEMU processes whose command line contains ``text``."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        if b"qemu-system" in cmdline and text.encode() in cmdline:
            found.append(int(entry.name))
    return found


def fake_spec(kernel: Path) -> BootSpec:
    return BootSpec(
        disk=None, kernel=kernel, initrd=None, append="console=ttyS0", memory_mb=64, cpus=1
    )


def make_boot_fs(tmp_path: Path, boot_files: dict[str, bytes]) -> Path:
    """A directory tree with /boot holding ``boot_files``, for mke2fs -d."""
    tree = tmp_path / "tree"
    (tree / "boot").mkdir(parents=True)
    (tree / "etc").mkdir()
    for name, data in boot_files.items():
        (tree / "boot" / name).write_bytes(data)
    return tree


def make_disk(tmp_path: Path, tree: Path, table: str) -> Path:
    """A 16 MiB disk: ``table`` is "dos", "gpt" or "none" (a bare filesystem)."""
    disk = tmp_path / f"disk-{table}.raw"
    with disk.open("wb") as f:
        f.truncate(16 * MiB)
    offset = 0
    blocks = 16 * MiB // 4096
    if table != "none":
        run.run(["sfdisk", "-q", os.fspath(disk)], input=f"label: {table}\nstart=2048\n".encode())
        offset = MiB
        blocks = 14 * MiB // 4096
    run.run(
        ["mke2fs", "-q", "-F", "-t", "ext4", "-b", "4096", "-U", FS_UUID, "-d", os.fspath(tree),
         "-E", f"offset={offset}", os.fspath(disk), str(blocks)],
    )  # fmt: skip
    return disk


# --- KVM probe ------------------------------------------------------------------------


def test_kvm_usable_is_a_cached_bool() -> None:
    first = boot.kvm_usable()
    started = time.monotonic()
    second = boot.kvm_usable()
    assert isinstance(first, bool)
    assert second is first
    assert time.monotonic() - started < 0.1, "the probe result should be cached"


def test_kvm_unusable_without_an_openable_dev_kvm(monkeypatch: pytest.MonkeyPatch) -> None:
    def no_kvm(path: str, flags: int, mode: int = 0o777) -> int:
        raise PermissionError(13, "Permission denied", path)

    monkeypatch.setattr(os, "open", no_kvm)
    # The uncached probe: a user outside the kvm group gets TCG, not an error.
    assert boot.kvm_usable.__wrapped__() is False


# --- boot() with a tiny fake kernel ---------------------------------------------------


def test_boot_matches_console_and_stops_qemu(tmp_path: Path) -> None:
    kernel = fake_kernel(tmp_path / "vmlinuz", b"early line\r\nfake-kernel-ok 42\r\n")
    lines: list[str] = []
    result = boot.boot(
        fake_spec(kernel),
        expect=r"fake-kernel-ok \d+",
        timeout=60,
        log_path=tmp_path / "console.log",
        on_line=lines.append,
    )
    assert result.matched
    assert result.match_text == "fake-kernel-ok 42"
    assert result.accel in ("kvm", "tcg")
    assert result.seconds < 60
    assert lines == ["early line", "fake-kernel-ok 42"]
    assert b"fake-kernel-ok 42" in (tmp_path / "console.log").read_bytes()
    assert qemu_processes_mentioning(os.fspath(tmp_path)) == []


def test_boot_matches_a_prompt_that_has_no_newline(tmp_path: Path) -> None:
    kernel = fake_kernel(tmp_path / "vmlinuz", b"Debian GNU/Linux 12\r\n\r\nbox login: ")
    result = boot.boot(
        fake_spec(kernel), expect="login:", timeout=60, log_path=tmp_path / "console.log"
    )
    assert result.matched
    assert result.match_text == "login:"


def watch_script(script: str, expect: str, tmp_path: Path) -> tuple[str | None, bool]:
    """Run boot.watch_console on a Python process standing in for QEMU's console."""
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE)
    try:
        with (tmp_path / "console.log").open("wb") as log_file:
            return boot.watch_console(
                proc, re.compile(expect), time.monotonic() + 20, log_file, None
            )
    finally:
        boot.stop(proc)


def test_half_a_line_is_not_matched_while_output_flows(tmp_path: Path) -> None:
    script = (
        "import sys, time\n"
        "sys.stdout.write('fake-kernel-ok 4'); sys.stdout.flush(); time.sleep(0.02)\n"
        "sys.stdout.write('2\\n'); sys.stdout.flush(); time.sleep(30)\n"
    )
    assert watch_script(script, r"fake-kernel-ok \d+", tmp_path) == ("fake-kernel-ok 42", False)


def test_a_waiting_prompt_is_matched_and_eof_is_reported(tmp_path: Path) -> None:
    prompt = "import sys, time; sys.stdout.write('box login: '); sys.stdout.flush(); time.sleep(30)"
    assert watch_script(prompt, "login:", tmp_path) == ("login:", False)
    assert watch_script("print('bye')", "login:", tmp_path) == (None, True)


def test_boot_times_out_cleanly(tmp_path: Path) -> None:
    kernel = fake_kernel(tmp_path / "vmlinuz", b"nothing to see\r\n")
    started = time.monotonic()
    result = boot.boot(
        fake_spec(kernel), expect="login:", timeout=3, log_path=tmp_path / "console.log"
    )
    assert not result.matched
    assert result.match_text == ""
    assert 3 <= result.seconds < 30
    assert time.monotonic() - started < 30
    assert b"nothing to see" in result.log_path.read_bytes()
    assert qemu_processes_mentioning(os.fspath(tmp_path)) == []


def test_boot_stops_qemu_on_keyboard_interrupt(tmp_path: Path) -> None:
    kernel = fake_kernel(tmp_path / "vmlinuz", b"first line\r\nsecond line\r\n")

    def interrupt(line: str) -> None:
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        boot.boot(
            fake_spec(kernel),
            expect="never",
            timeout=60,
            log_path=tmp_path / "console.log",
            on_line=interrupt,
        )
    assert qemu_processes_mentioning(os.fspath(tmp_path)) == []


def test_boot_of_a_file_that_is_not_a_kernel_raises(tmp_path: Path) -> None:
    kernel = tmp_path / "vmlinuz"
    kernel.write_text("this is a text file, not a kernel\n" * 100)
    with pytest.raises(BootError) as info:
        boot.boot(fake_spec(kernel), expect="login:", timeout=60, log_path=tmp_path / "c.log")
    message = str(info.value)
    assert "QEMU exited" in message
    assert "invalid kernel header" in message  # QEMU's own words, from the log tail
    assert info.value.hint is not None and "not a bootable kernel" in info.value.hint
    assert qemu_processes_mentioning(os.fspath(tmp_path)) == []


def test_boot_names_a_missing_kernel(tmp_path: Path) -> None:
    with pytest.raises(BootError, match=r"kernel .*vmlinuz does not exist"):
        boot.boot(
            fake_spec(tmp_path / "vmlinuz"), expect="x", timeout=5, log_path=tmp_path / "c.log"
        )


def test_qemu_command_never_writes_the_disk_and_has_no_network(tmp_path: Path) -> None:
    spec = BootSpec(
        disk=tmp_path / "a,b.qcow2",
        kernel=tmp_path / "k",
        initrd=tmp_path / "i",
        append=kernel_cmdline("UUID=x"),
        disk_format="qcow2",
    )
    argv = boot.qemu_argv(spec, "tcg")
    drive = argv[argv.index("-drive") + 1]
    assert drive == f"file={tmp_path}/a,,b.qcow2,format=qcow2,if=virtio,snapshot=on"
    assert argv[argv.index("-nic") + 1] == "none"
    assert argv[argv.index("-append") + 1] == "console=ttyS0 root=UUID=x rw panic=-1"
    with_net = BootSpec(
        disk=None, kernel=tmp_path / "k", initrd=None, append="", extra_args=("-nic", "user")
    )
    argv = boot.qemu_argv(with_net, "tcg")
    assert argv[-2:] == ["-nic", "user"]
    assert argv.count("-nic") == 1


# --- kernel_from_disk -----------------------------------------------------------------

BOOT_FILES = {
    "vmlinuz-6.1.0-9-amd64": b"old kernel",
    "initrd.img-6.1.0-9-amd64": b"old initrd",
    "vmlinuz-6.1.0-10-amd64": b"new kernel" * 1000,
    "initrd.img-6.1.0-10-amd64": b"new initrd" * 3000,
    "config-6.1.0-10-amd64": b"CONFIG_EXT4_FS=m\n",
}


@pytest.mark.parametrize("table", ["dos", "gpt", "none"])
def test_kernel_from_disk_takes_the_newest_kernel(tmp_path: Path, table: str) -> None:
    disk = make_disk(tmp_path, make_boot_fs(tmp_path, BOOT_FILES), table)
    kernel, initrd, root = kernel_from_disk(disk, tmp_path / "work")
    assert kernel.name == "vmlinuz-6.1.0-10-amd64"  # version order: 10 is newer than 9
    assert kernel.read_bytes() == BOOT_FILES["vmlinuz-6.1.0-10-amd64"]
    assert initrd is not None
    assert initrd.read_bytes() == BOOT_FILES["initrd.img-6.1.0-10-amd64"]
    assert root == f"UUID={FS_UUID}"


def test_kernel_from_a_qcow2_disk(tmp_path: Path) -> None:
    raw = make_disk(tmp_path, make_boot_fs(tmp_path, BOOT_FILES), "dos")
    qcow2 = tmp_path / "disk.qcow2"
    run.run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", os.fspath(raw), os.fspath(qcow2)])
    work = tmp_path / "work"
    kernel, initrd, root = kernel_from_disk(qcow2, work)
    assert kernel.read_bytes() == BOOT_FILES["vmlinuz-6.1.0-10-amd64"]
    assert initrd is not None and initrd.name == "initrd.img-6.1.0-10-amd64"
    assert root == f"UUID={FS_UUID}"
    assert sorted(p.name for p in work.iterdir()) == [initrd.name, kernel.name]


def test_kernel_without_initrd(tmp_path: Path) -> None:
    tree = make_boot_fs(tmp_path, {"vmlinuz-6.6.1": b"kernel"})
    kernel, initrd, _ = kernel_from_disk(make_disk(tmp_path, tree, "gpt"), tmp_path / "work")
    assert kernel.name == "vmlinuz-6.6.1"
    assert initrd is None


def test_image_without_a_kernel_says_how_to_get_one(tmp_path: Path) -> None:
    disk = make_disk(tmp_path, make_boot_fs(tmp_path, {"grub.cfg": b"#"}), "dos")
    with pytest.raises(BootError, match="has no kernel") as info:
        kernel_from_disk(disk, tmp_path / "work")
    assert info.value.hint is not None
    assert "linux-image" in info.value.hint
    assert "--kernel" in info.value.hint


def test_disk_without_an_ext_filesystem_is_a_clear_error(tmp_path: Path) -> None:
    disk = tmp_path / "zeros.raw"
    disk.write_bytes(bytes(4 * MiB))
    with pytest.raises(BootError, match="no ext2/3/4 filesystem"):
        kernel_from_disk(disk, tmp_path / "work")


def test_boot_takes_the_kernel_that_the_kernel_output_takes(tmp_path: Path) -> None:
    """One finder for `boot` and `-f kernel`: a Fedora-style image keeps its newest
    kernel only in /usr/lib/modules/VERSION/vmlinuz, next to an older one in /boot."""
    tree = make_boot_fs(
        tmp_path,
        {"vmlinuz-6.7.0": b"older kernel", "initramfs-6.7.0.img": b"older initrd"},
    )
    modules = tree / "usr" / "lib" / "modules" / "6.8.0"
    modules.mkdir(parents=True)
    (modules / "vmlinuz").write_bytes(b"newest kernel")
    (tree / "boot" / "initramfs-6.8.0.img").write_bytes(b"newest initrd")
    chosen = kernels.choose(DirectoryTree(tree))
    kernel, initrd, _ = kernel_from_disk(make_disk(tmp_path, tree, "gpt"), tmp_path / "work")
    assert chosen.version == "6.8.0"
    assert kernel.read_bytes() == b"newest kernel"
    assert initrd is not None and initrd.read_bytes() == b"newest initrd"
    assert kernel.name == "vmlinuz-6.8.0"


def test_the_accelerator_shown_is_the_one_used(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """KVM is decided once per boot: a probe asked twice (it can hang on one call and
    answer on the next on nested hosts) must not make the boot say TCG and run KVM."""
    answers = iter([False, True])
    asked: list[bool] = []

    def probe() -> bool:
        asked.append(next(answers, True))
        return asked[-1]

    monkeypatch.setattr(boot, "kvm_usable", probe)
    disk = make_disk(tmp_path, make_boot_fs(tmp_path, {}), "dos")
    kernel = fake_kernel(tmp_path / "vmlinuz", b"fake-kernel-ok\r\n")
    shown = io.StringIO()
    result = boot_artifact(
        disk,
        kernel=kernel,
        expect="fake-kernel-ok",
        timeout=60,
        log_path=tmp_path / "console.log",
        progress=Progress(shown, live=False),
    )
    assert result.matched
    assert "booting under QEMU, TCG (no working KVM)" in shown.getvalue()
    assert result.accel == "tcg"
    assert asked == [False]


# --- end to end: recipes/debian-qemu boots to a login prompt ----------------------------


@pytest.mark.slow
@pytest.mark.docker
def test_debian_qemu_boots_to_a_login_prompt(debian_qemu_build: Path) -> None:
    """The main job: `oci2disk build recipes/debian-qemu`, then `oci2disk boot` to login."""
    disk = debian_qemu_build / "disk.qcow2"
    before = disk.stat().st_mtime_ns
    log = debian_qemu_build / "boot.log"
    result = oci2disk(
        "boot", str(disk), "--expect", "login:", "--timeout", "300", "--log", str(log)
    )
    console = log.read_text(errors="replace")
    assert result.code == 0, f"{result.stderr}\nconsole tail:\n{console[-3000:]}"
    assert "Debian GNU/Linux 12" in console
    # the hostname comes from the image's layers (docker export would show a placeholder)
    assert "debian-qemu login:" in console
    assert "oci2disk-boot-ok" in console  # the recipe's marker unit ran
    # the fstab oci2disk wrote names the root it made, and systemd mounted it
    assert "EXT4-fs (vda1): mounted filesystem" in console
    # systemd must see a VM, not a container (else no serial getty, units skipped).
    assert "Detected virtualization docker" not in console
    assert "Kernel panic" not in console
    print(f"\n{result.stdout.strip()}")
    assert disk.stat().st_mtime_ns == before, "snapshot=on must keep the disk intact"
    assert qemu_processes_mentioning(os.fspath(disk)) == []


@pytest.mark.slow
@pytest.mark.docker
def test_kvm_probe_agrees_with_a_real_kernel(debian_qemu_build: Path, tmp_path: Path) -> None:
    """Where kvm_usable() says False, a Debian kernel must not reach its console under KVM."""
    kernel, initrd, root = kernel_from_disk(debian_qemu_build / "disk.raw", tmp_path / "kernel")
    spec = BootSpec(disk=None, kernel=kernel, initrd=initrd, append=kernel_cmdline(root))
    argv = boot.qemu_argv(spec, "kvm")
    proc = run.start(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        output, _ = proc.communicate(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        output, _ = proc.communicate()
    kernel_ran = re.search(rb"Linux version \d", output) is not None
    assert kernel_ran == boot.kvm_usable(), output.decode(errors="replace")[-2000:]
