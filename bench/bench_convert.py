"""Benchmark: oci2disk's rootless conversion vs the classic loop-mount method.

Both start from the same image in the Docker Engine and end with a raw disk (MBR, one
ext4 partition at 1 MiB) plus a qcow2 made from it. The classic method is what gem5's
gem5img.py and diskimage-builder do, and it needs root:

    docker export | tar -> truncate, sfdisk, losetup -o, mkfs.ext4, mount, tar -x, umount,
    losetup -d, qemu-img convert

Runs alternate between the methods (A B A B ...) so that machine noise hits both alike;
the script prints each run, the medians, their ratio and the peak RSS of each method's
largest process. Not a test: timings are never asserted.

    sudo .venv/bin/python bench/bench_convert.py [--image NAME:TAG] [--runs 5]
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

MiB = 1 << 20


def sh(*argv: str, stdin: int | None = None, stdout: int | None = None) -> None:
    subprocess.run(argv, check=True, stdin=stdin, stdout=stdout or subprocess.DEVNULL)


def oci2disk_method(source: str, work: Path) -> None:
    raw = work / "disk.raw"
    sh(sys.executable, "-m", "oci2disk.cli", "-q", "convert", source, "-f", "raw", "-o", str(raw))
    sh("qemu-img", "convert", "-f", "raw", "-O", "qcow2", str(raw), str(work / "disk.qcow2"))


def docker_export(image: str, tar: Path) -> None:
    container = subprocess.run(
        ["docker", "create", image, "/bin/true"], check=True, capture_output=True, text=True
    ).stdout.strip()
    try:
        with tar.open("wb") as f:
            sh("docker", "export", container, stdout=f.fileno())
    finally:
        sh("docker", "rm", container)


def loop_method(
    image: str, tar: Path | None, work: Path, size_bytes: int, *, qcow2: bool = True
) -> None:
    """The classic way; with ``tar`` given, start from that export instead of the engine."""
    raw, mnt = work / "disk.raw", work / "mnt"
    if tar is None:
        tar = work / "rootfs.tar"
        docker_export(image, tar)
    sh("truncate", "-s", str(size_bytes), str(raw))
    subprocess.run(
        ["sfdisk", "-q", str(raw)], input=b"start=2048, type=83\n", check=True, capture_output=True
    )
    loop = subprocess.run(
        ["losetup", "-f", "--show", "-o", str(MiB), str(raw)],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    try:
        sh("mkfs.ext4", "-q", loop)
        mnt.mkdir()
        sh("mount", loop, str(mnt))
        try:
            sh(
                "tar",
                "-C",
                str(mnt),
                "--numeric-owner",
                "--xattrs",
                "--xattrs-include=*",
                "-xpf",
                str(tar),
            )
        finally:
            sh("umount", str(mnt))
    finally:
        sh("losetup", "-d", loop)
    if qcow2:
        sh("qemu-img", "convert", "-f", "raw", "-O", "qcow2", str(raw), str(work / "disk.qcow2"))


def measure(fn: Callable[[Path], None]) -> tuple[float, int]:
    """Wall seconds and the peak RSS (KiB) of the largest child process of one run."""
    with tempfile.TemporaryDirectory(prefix="oci2disk-bench-") as tmp:
        read_fd, write_fd = os.pipe()
        start = time.monotonic()
        pid = os.fork()
        if pid == 0:  # the child runs the method, so its rusage covers only this run
            os.close(read_fd)
            code = 0
            try:
                fn(Path(tmp))
            except Exception as exc:
                print(f"run failed: {exc}", file=sys.stderr)
                code = 1
            os.write(write_fd, str(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss).encode())
            os._exit(code)
        os.close(write_fd)
        _, status, _ = os.wait4(pid, 0)
        seconds = time.monotonic() - start
        peak = int(os.read(read_fd, 64) or b"0")
        os.close(read_fd)
        if os.waitstatus_to_exitcode(status) != 0:
            raise SystemExit("a benchmark run failed")
        return seconds, peak


def compare(title: str, methods: dict[str, Callable[[Path], None]], runs: int) -> None:
    print(f"\n{title}")
    results: dict[str, list[tuple[float, int]]] = {name: [] for name in methods}
    for i in range(runs):
        for name, fn in methods.items():
            seconds, peak = measure(fn)
            results[name].append((seconds, peak))
            print(f"  run {i + 1}  {name:<10}  {seconds:6.2f} s  peak RSS {peak / 1024:6.1f} MiB")
    med = {name: statistics.median(s for s, _ in r) for name, r in results.items()}
    peaks = {name: max(p for _, p in r) for name, r in results.items()}
    for name in results:
        print(f"  {name:<10} median {med[name]:6.2f} s   peak RSS {peaks[name] / 1024:6.1f} MiB")
    first, second = list(methods)
    print(f"  ratio {first} / {second} (median wall time): {med[first] / med[second]:.2f}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--image", default="oci2disk-recipe/debian-qemu:latest")
    p.add_argument("--runs", type=int, default=5)
    args = p.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("the loop-mount method needs root: run this with sudo")
    for tool in ("losetup", "mkfs.ext4", "qemu-img", "docker", "sfdisk", "skopeo"):
        if not shutil.which(tool):
            raise SystemExit(f"{tool} is missing")
    with tempfile.TemporaryDirectory(prefix="oci2disk-bench-src-") as tmp:
        src = Path(tmp)
        # Same disk size for both: what oci2disk picks with --size auto.
        oci2disk_method(f"docker-daemon:{args.image}", src)
        size = (src / "disk.raw").stat().st_size
        # Each method's own export, made once, for the conversion-only comparison.
        docker_export(args.image, src / "rootfs.tar")
        sh("skopeo", "copy", f"docker-daemon:{args.image}", f"oci:{src / 'layout'}:img")
        print(f"image {args.image}, disk {size / MiB:.0f} MiB, {args.runs} runs each, alternating")
        compare(
            "from the image in the Docker Engine (docker save vs docker export included):",
            {
                "oci2disk": lambda w: oci2disk_method(f"docker-daemon:{args.image}", w),
                "loop-mount": lambda w: loop_method(args.image, None, w, size),
            },
            args.runs,
        )
        compare(
            "conversion only (from an OCI layout vs from the docker export tar, both on disk):",
            {
                "oci2disk": lambda w: oci2disk_method(f"oci:{src / 'layout'}:img", w),
                "loop-mount": lambda w: loop_method(args.image, src / "rootfs.tar", w, size),
            },
            args.runs,
        )


if __name__ == "__main__":
    main()
