"""Boot helpers of the squashfs and iso output tests: a Debian kernel and its modules
from the debian-qemu recipe's image, tiny busybox images, and QEMU (TCG) watched for a
marker on the serial console."""

from __future__ import annotations

import io
import os
import re
import subprocess
import tarfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from layerkit import Member, device, directory, file, symlink

ROOT = Path(__file__).resolve().parent.parent
KERNEL_IMAGE = "oci2disk-recipe/debian-qemu:latest"
OVMF = Path("/usr/share/ovmf/OVMF.fd")
BUSYBOX = Path("/bin/busybox")  # Debian busybox-static


@dataclass(frozen=True)
class Kernel:
    version: str
    vmlinuz: Path
    modules: dict[str, bytes]  # module file name -> content, in insmod order


def debian_kernel(dest: Path, wanted: tuple[str, ...]) -> Kernel:
    """The kernel of the debian-qemu image and the modules ``wanted`` need, in load order."""
    if subprocess.run(["docker", "image", "inspect", KERNEL_IMAGE], capture_output=True).returncode:
        subprocess.run(
            ["docker", "build", "-t", KERNEL_IMAGE, str(ROOT / "recipes" / "debian-qemu")],
            check=True,
            capture_output=True,
        )
    cid = subprocess.run(
        ["docker", "create", KERNEL_IMAGE, "/bin/true"], capture_output=True, text=True, check=True
    ).stdout.strip()
    try:
        boot = _docker_cp(cid, "/boot")
        names = [n for n in boot if re.fullmatch(r"boot/vmlinuz-.*", n)]
        assert names, "the debian-qemu image has no kernel"
        version = sorted(names)[-1].removeprefix("boot/vmlinuz-")
        vmlinuz = dest / "vmlinuz"
        vmlinuz.write_bytes(boot[f"boot/vmlinuz-{version}"])
        base = f"/usr/lib/modules/{version}"
        dep_text = _docker_cp(cid, f"{base}/modules.dep")["modules.dep"].decode()
        deps = {
            line.partition(":")[0]: line.partition(":")[2].split() for line in dep_text.splitlines()
        }
        by_name = {Path(p).name.removesuffix(".ko"): p for p in deps}
        order: list[str] = []

        def visit(path: str) -> None:
            for dep in deps[path]:
                visit(dep)
            if path not in order:
                order.append(path)

        for name in wanted:
            visit(by_name[name])
        modules = {Path(p).name: _docker_cp(cid, f"{base}/{p}")[Path(p).name] for p in order}
        return Kernel(version, vmlinuz, modules)
    finally:
        subprocess.run(["docker", "rm", cid], capture_output=True, check=False)


def _docker_cp(cid: str, path: str) -> dict[str, bytes]:
    tar_bytes = subprocess.run(
        ["docker", "cp", f"{cid}:{path}", "-"], capture_output=True, check=True
    ).stdout
    out: dict[str, bytes] = {}
    with tarfile.open(fileobj=io.BytesIO(tar_bytes)) as tar:
        for member in tar:
            if member.isfile():
                extracted = tar.extractfile(member)
                assert extracted is not None
                out[member.name] = extracted.read()
    return out


def busybox_base() -> list[Member]:
    """/bin/busybox, the mount points and /dev/console."""
    return [
        directory("bin"),
        file("bin/busybox", BUSYBOX.read_bytes(), mode=0o755),
        symlink("bin/sh", "busybox"),
        directory("dev"),
        device("dev/console", 5, 1, mode=0o600),
        directory("proc"),
        directory("sys"),
        directory("sbin"),
    ]


def script(name: str, text: str) -> Member:
    return file(name, ("#!/bin/busybox sh\n" + text).encode(), mode=0o755)


@dataclass(frozen=True)
class Boot:
    seconds: float
    console: str


def boot_until(argv: list[str], marker: str, log: Path, timeout: float = 300) -> Boot:
    """Run QEMU until ``marker`` shows on the serial console (stdio); then stop it."""
    start = time.monotonic()
    proc = subprocess.Popen(
        argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )
    assert proc.stdout is not None
    seen = threading.Event()
    chunks: list[bytes] = []

    def read() -> None:
        assert proc.stdout is not None
        while data := os.read(proc.stdout.fileno(), 4096):
            chunks.append(data)
            if marker.encode() in b"".join(chunks[-64:]):
                seen.set()
        seen.set()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    seen.wait(timeout)
    elapsed = time.monotonic() - start
    if proc.poll() is None:
        proc.kill()
    proc.wait()
    reader.join(5)
    console = b"".join(chunks).decode("utf-8", "replace")
    log.write_text(console)
    assert marker in console, f"no {marker!r} after {elapsed:.0f} s; console in {log}"
    return Boot(elapsed, console)


def qemu(*args: str, memory: str = "512") -> list[str]:
    return [
        "qemu-system-x86_64",
        "-accel",
        "tcg",
        "-m",
        memory,
        "-nographic",
        "-no-reboot",
        "-nic",
        "none",
        *args,
    ]
