"""Benchmark: flatten a multi-layer image of more than 2 GiB, beside umoci and docker export.

The image is built from bench/flatten/Dockerfile (about 2.7 GB of rootfs in five layers:
big files, 65,536 small files, a whiteout of a directory). Each method turns the same
image into its rootfs:

- oci2disk: the OCI layout (from ``docker save``) -> flatten -> canonical tar to /dev/null;
  every layer blob's sha256 is checked first, as always;
- umoci: ``umoci raw unpack`` of the same layout into a directory (it extracts);
- docker export: of a container created from the image, to /dev/null (the work is done
  in dockerd, so its peak RSS is dockerd's, measured from a reset of VmHWM).

Runs alternate between the methods so that machine noise hits all alike; the script
prints each run, then the median throughput (rootfs bytes / seconds) and the peak RSS of
each method. Not a test: nothing is asserted.

    .venv/bin/python bench/bench_flatten.py [--runs 3] [--rebuild]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
IMAGE = "oci2disk-bench/flatten:latest"
MB = 1_000_000

FLATTEN = """
import os, sys
from pathlib import Path
from oci2disk.rootfs.flatten import flatten
from oci2disk.oci.layout import open_layout
with flatten(open_layout(Path(sys.argv[1]), None), Path(sys.argv[2])) as rootfs:
    with open(os.devnull, "wb") as out:
        rootfs.write_tar(out)
"""

COUNT = """
import sys
from pathlib import Path
from oci2disk.rootfs.flatten import flatten
from oci2disk.oci.layout import open_layout

class Count:
    size = 0
    def write(self, data):
        self.size += len(data)
    def flush(self):
        pass

with flatten(open_layout(Path(sys.argv[1]), None), Path(sys.argv[2])) as rootfs:
    out = Count()
    rootfs.write_tar(out)
    print(out.size, rootfs.stats.entries)
"""


def sh(*argv: str, **kwargs: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, check=True, text=True, **kwargs)  # type: ignore[call-overload, no-any-return]


def timed(argv: list[str], stdout: int | None = subprocess.DEVNULL) -> tuple[float, int]:
    """Wall seconds and peak RSS (KiB) of one child process."""
    env = {**os.environ, "PYTHONPATH": os.fspath(ROOT / "src")}
    start = time.monotonic()
    proc = subprocess.Popen(argv, stdout=stdout, env=env)
    _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.monotonic() - start
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"failed: {argv}")
    return seconds, usage.ru_maxrss


def dockerd_pid() -> int:
    return int(sh("pidof", "dockerd", capture_output=True).stdout.split()[0])


def vm_hwm_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    raise RuntimeError("no VmHWM")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--rebuild", action="store_true")
    parser.add_argument("--workdir", type=Path, default=None)
    args = parser.parse_args()

    exists = subprocess.run(["docker", "image", "inspect", IMAGE], capture_output=True)
    if args.rebuild or exists.returncode != 0:
        print(f"building {IMAGE} (a few minutes) ...", flush=True)
        sh("docker", "build", "-q", "-t", IMAGE, os.fspath(HERE / "flatten"))

    work = Path(tempfile.mkdtemp(prefix="bench-flatten-", dir=args.workdir))
    try:
        run_benchmark(work, args.runs)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def run_benchmark(work: Path, runs: int) -> None:
    sys.path.insert(0, os.fspath(ROOT / "src"))
    from oci2disk.oci.layout import layout_from_docker_archive

    layout = work / "oci"
    start = time.monotonic()
    save = subprocess.Popen(["docker", "save", IMAGE], stdout=subprocess.PIPE)
    assert save.stdout is not None
    image = layout_from_docker_archive(save.stdout, layout, "bench")
    if save.wait() != 0:
        raise SystemExit("docker save failed")
    layer_bytes = sum(d.size for d in image.layers)
    print(
        f"docker save -> OCI layout: {time.monotonic() - start:.1f} s, "
        f"{len(image.layers)} layers, {layer_bytes / MB:.0f} MB of layer blobs"
    )

    out = sh(
        sys.executable,
        "-c",
        COUNT,
        os.fspath(layout),
        os.fspath(work / "count"),
        capture_output=True,
        env={**os.environ, "PYTHONPATH": os.fspath(ROOT / "src")},
    )
    rootfs_bytes, entries = (int(x) for x in out.stdout.split())
    print(f"rootfs: {rootfs_bytes / MB:.0f} MB of tar, {entries} entries")

    container = sh("docker", "create", IMAGE, "true", capture_output=True).stdout.strip()
    dockerd = dockerd_pid()

    def oci2disk() -> tuple[float, int]:
        return timed([sys.executable, "-c", FLATTEN, os.fspath(layout), os.fspath(work / "w")])

    def umoci() -> tuple[float, int]:
        target = work / "umoci"
        try:
            return timed(
                ["umoci", "raw", "unpack", "--image", f"{layout}:bench", os.fspath(target)]
            )
        finally:
            shutil.rmtree(target, ignore_errors=True)

    def docker_export() -> tuple[float, int]:
        Path(f"/proc/{dockerd}/clear_refs").write_text("5")  # reset dockerd's VmHWM
        seconds, _ = timed(["docker", "export", container])
        return seconds, vm_hwm_kib(dockerd)

    methods: dict[str, Callable[[], tuple[float, int]]] = {
        "oci2disk flatten": oci2disk,
        "umoci raw unpack": umoci,
        "docker export": docker_export,
    }
    results: dict[str, list[tuple[float, int]]] = {name: [] for name in methods}
    try:
        for run in range(1, runs + 1):
            for name, method in methods.items():
                seconds, rss = method()
                results[name].append((seconds, rss))
                print(
                    f"run {run}  {name:18} {seconds:6.1f} s  "
                    f"{rootfs_bytes / MB / seconds:6.0f} MB/s  peak RSS {rss / 1024:6.0f} MiB",
                    flush=True,
                )
    finally:
        sh("docker", "rm", container, capture_output=True)

    print(f"\nmedian of {runs} runs, {rootfs_bytes / MB:.0f} MB rootfs ({entries} entries):")
    print(f"{'method':18} {'seconds':>8} {'MB/s':>7} {'peak RSS MiB':>13}")
    for name, values in results.items():
        median = statistics.median(s for s, _ in values)
        peak = max(r for _, r in values) / 1024
        note = " (dockerd)" if name == "docker export" else ""
        print(f"{name:18} {median:8.1f} {rootfs_bytes / MB / median:7.0f} {peak:13.0f}{note}")


if __name__ == "__main__":
    main()
