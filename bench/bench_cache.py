"""Benchmark: what the cache saves, side by side with the loop-mount method.

One run, on the reference image (recipes/debian-qemu built from the local base), each
method in turn so machine noise hits all alike:

    loop-mount   docker export | tar -x into a loop-mounted ext4 (gem5img.py's way, root)
    cold         oci2disk convert docker-daemon:REF -f raw, empty cache
    warm         the same with the cache of an earlier run (image and disk stored;
                 the disk is copied to a new output path)
    warm-layers  the same with the image cached but not the disk (another --label):
                 no docker save, flatten and mke2fs again

and then `oci2disk build recipes/debian-qemu` with an empty cache against the same build
again with nothing changed (the no-op build of a user iterating). Prints every run, the
medians and the ratios. Not a test: timings are never asserted.

    sudo .venv/bin/python bench/bench_cache.py [--image NAME:TAG] [--runs 3]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

from bench_convert import MiB, loop_method, measure, sh

ROOT = Path(__file__).resolve().parent.parent
RECIPE = ROOT / "recipes" / "debian-qemu"


def oci2disk(*args: str) -> None:
    sh(sys.executable, "-m", "oci2disk.cli", "-q", *args)


def convert(source: str, output: Path, cache: Path | None, *extra: str) -> None:
    flags = ["--no-cache"] if cache is None else ["--cache-dir", os.fspath(cache)]
    oci2disk("convert", source, "-f", "raw", "-o", os.fspath(output), *flags, *extra)


def build(recipe: Path, outdir: Path, cache: Path) -> None:
    oci2disk("build", os.fspath(recipe), "-o", os.fspath(outdir), "--cache-dir", os.fspath(cache))


def compare(title: str, methods: dict[str, Callable[[Path], None]], runs: int, base: str) -> None:
    print(f"\n{title}")
    times: dict[str, list[float]] = {name: [] for name in methods}
    for i in range(runs):
        for name, fn in methods.items():
            # What the run before left for the kernel to write back (GiBs of disk images)
            # must not slow this one: written out first, outside the timing.
            os.sync()
            seconds, peak = measure(fn)
            times[name].append(seconds)
            print(f"  run {i + 1}  {name:<12} {seconds:6.2f} s  peak RSS {peak / 1024:6.1f} MiB")
    med = {name: statistics.median(t) for name, t in times.items()}
    for name in methods:
        ratio = f"   {med[name] / med[base]:.2f}x {base}" if name != base else ""
        print(f"  {name:<12} median {med[name]:6.2f} s{ratio}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument(
        "--image",
        default="oci2disk-recipe/debian-qemu-bench:latest",
        help="the image to convert (default: the bench's own build of recipes/debian-qemu)",
    )
    p.add_argument("--runs", type=int, default=3)
    args = p.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("the loop-mount method needs root: run this with sudo")
    for tool in ("losetup", "mkfs.ext4", "docker", "sfdisk"):
        if not shutil.which(tool):
            raise SystemExit(f"{tool} is missing")
    source = f"docker-daemon:{args.image}"
    with tempfile.TemporaryDirectory(prefix="oci2disk-bench-cache-") as tmp:
        keep = Path(tmp)
        # A copy of the recipe under a name (and so an engine tag) of its own: other runs
        # building recipes/debian-qemu at the same time cannot change the image under us.
        recipe = keep / "debian-qemu-bench"
        shutil.copytree(RECIPE, recipe)
        # The image is built (the engine's own layer cache is warm for every method), the
        # warm cache filled, and the disk size taken for the loop-mount method.
        build(recipe, keep / "built", keep / "build-cache")
        convert(source, keep / "disk.raw", keep / "cache")
        size = (keep / "disk.raw").stat().st_size
        print(f"image {args.image}, disk {size / MiB:.0f} MiB, {args.runs} runs each")
        compare(
            "raw disk from the image in the Docker Engine:",
            {
                "loop-mount": lambda w: loop_method(args.image, None, w, size, qcow2=False),
                "cold": lambda w: convert(source, w / "disk.raw", w / "cache"),
                "warm": lambda w: convert(source, w / "disk.raw", keep / "cache"),
                "warm-layers": lambda w: convert(
                    # a label of this run's own: the disk is never stored (each run forks)
                    source,
                    w / "disk.raw",
                    keep / "cache",
                    "--label",
                    f"l{os.getpid()}",
                ),
            },
            args.runs,
            base="loop-mount",
        )
        compare(
            "oci2disk build recipes/debian-qemu (raw + qcow2), image already built:",
            {
                "empty-cache": lambda w: build(recipe, w / "out", w / "cache"),
                "no-op": lambda w: build(recipe, keep / "built", keep / "build-cache"),
            },
            args.runs,
            base="empty-cache",
        )


if __name__ == "__main__":
    main()
