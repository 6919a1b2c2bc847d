"""Benchmark: one run that writes raw+qcow2+cgz+tar at once vs single-format runs.

Each run is a fresh process doing what ``oci2disk build`` does once its image is built:
open the image (``docker save`` from the engine for a docker-daemon: source), flatten
it once, and run the converters (at the same time, as ``convert()`` does). Compared:

    all   raw+qcow2+cgz+tar in one run
    raw   raw alone (the baseline: the target is all / raw < 1.6)
    sep   the four formats as four separate runs (qcow2 alone includes its raw disk)

Rounds alternate (all, raw, sep, all, raw, sep ...) so that machine noise hits each
alike; the script prints every run, the medians and their ratios, and the peak memory:
the largest sum of RSS over the run's whole process tree (Python, mke2fs, igzip,
qemu-img ...), sampled every 20 ms. Not a test: timings are never asserted.

    .venv/bin/python bench/bench_outputs.py [--source docker-daemon:oci2disk-test/debian-qemu]
                                            [--runs 3] [--jobs N]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

MiB = 1 << 20
ALL = ("raw", "qcow2", "cgz", "tar")


@dataclass(frozen=True)
class Sample:
    seconds: float
    peak_rss: int  # bytes, whole process tree


def worker(formats: str, source: str, out: Path, jobs: int | None) -> None:
    """One run: open, flatten once, convert to every format in ``formats``."""
    from oci2disk.convert import ConvertOptions, convert, default_outputs
    from oci2disk.oci.source import open_image
    from oci2disk.recipe import Format, InitramfsSpec
    from oci2disk.refs import parse_ref
    from oci2disk.rootfs.flatten import flatten
    from oci2disk.workspace import Workspace

    wanted = tuple(Format.parse(f) for f in formats.split(","))
    options = ConvertOptions(initramfs=InitramfsSpec(init="/sbin/init"), jobs=jobs)
    with Workspace() as ws:
        image = open_image(parse_ref(source), ws.path)
        with flatten(image, ws.subdir("flatten")) as rootfs:
            convert(image, rootfs, default_outputs(out, "disk", wanted, options), options, ws)


def _tree_rss(root: int) -> int:
    """Sum of VmRSS (bytes) of ``root`` and all its descendants."""
    parents: dict[int, int] = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as f:
                fields = f.read().rsplit(b")", 1)[1].split()
            parents[int(name)] = int(fields[1])
        except (OSError, IndexError, ValueError):
            continue
    tree = {root}
    changed = True
    while changed:
        changed = False
        for pid, ppid in parents.items():
            if ppid in tree and pid not in tree:
                tree.add(pid)
                changed = True
    total = 0
    for pid in tree:
        try:
            with open(f"/proc/{pid}/status") as f:
                for line in f:
                    if line.startswith("VmRSS:"):
                        total += int(line.split()[1]) * 1024
        except OSError:
            continue
    return total


def measure(formats: str, source: str, jobs: int | None) -> Sample:
    with tempfile.TemporaryDirectory(prefix="oci2disk-bench-", dir=os.environ.get("TMPDIR")) as d:
        argv = [sys.executable, __file__, "--worker", formats, "--source", source, "--out", d]
        if jobs:
            argv += ["--jobs", str(jobs)]
        start = time.monotonic()
        proc = subprocess.Popen(argv)
        peak = 0
        done = threading.Event()

        def sample() -> None:
            nonlocal peak
            while not done.is_set():
                peak = max(peak, _tree_rss(proc.pid))
                done.wait(0.02)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        code = proc.wait()
        seconds = time.monotonic() - start
        done.set()
        sampler.join()
        if code != 0:
            raise SystemExit(f"run {formats} failed with exit code {code}")
        return Sample(seconds, peak)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--source", default="docker-daemon:oci2disk-test/debian-qemu")
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--jobs", type=int, default=None, help="converters at once (default: cores)")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        worker(args.worker, args.source, args.out, args.jobs)
        return 0
    for tool in ("mke2fs", "qemu-img"):
        if not shutil.which(tool) and not os.path.exists(f"/usr/sbin/{tool}"):
            raise SystemExit(f"{tool} is missing")
    print(f"source: {args.source}; {args.runs} round(s); {os.cpu_count()} cores")
    measure("raw", args.source, args.jobs)  # warm the page cache and the engine
    results: dict[str, list[Sample]] = {"all": [], "raw": [], "sep": []}
    for round_ in range(1, args.runs + 1):
        everything = measure(",".join(ALL), args.source, args.jobs)
        results["all"].append(everything)
        raw = measure("raw", args.source, args.jobs)
        results["raw"].append(raw)
        parts = [raw if fmt == "raw" else measure(fmt, args.source, args.jobs) for fmt in ALL]
        separate = Sample(sum(s.seconds for s in parts), max(s.peak_rss for s in parts))
        results["sep"].append(separate)
        print(
            f"round {round_}: all at once {everything.seconds:6.1f} s "
            f"{everything.peak_rss / MiB:6.0f} MiB | raw alone {raw.seconds:6.1f} s "
            f"{raw.peak_rss / MiB:6.0f} MiB | separately "
            + " + ".join(f"{fmt} {s.seconds:.1f}" for fmt, s in zip(ALL, parts, strict=True))
            + f" = {separate.seconds:.1f} s",
            flush=True,
        )
    med = {k: statistics.median(s.seconds for s in v) for k, v in results.items()}
    mem = {k: statistics.median(s.peak_rss for s in v) for k, v in results.items()}
    print(
        f"median wall: all {med['all']:.1f} s, raw {med['raw']:.1f} s, separate {med['sep']:.1f} s"
    )
    print(
        f"peak tree RSS (median): all {mem['all'] / MiB:.0f} MiB, raw {mem['raw'] / MiB:.0f} MiB, "
        f"largest single-format run {mem['sep'] / MiB:.0f} MiB"
    )
    ratio = med["all"] / med["raw"]
    print(f"all at once / raw alone: {ratio:.2f}x (target < 1.6x)")
    print(f"all at once / four separate runs: {med['all'] / med['sep']:.2f}x")
    print(f"peak memory all / raw: {mem['all'] / mem['raw']:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
