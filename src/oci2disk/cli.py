"""Command line: the only place that parses argv, prints, and picks exit codes.

Exit codes: 0 success, 1 error (or verify found differences / boot did not match),
2 usage, 130 interrupted.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import traceback
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from oci2disk import __version__
from oci2disk.errors import Oci2DiskError, RecipeError, UsageError
from oci2disk.progress import SILENT, Progress, stderr_progress
from oci2disk.recipe import (
    ArchiveCompression,
    Compression,
    DiskSpec,
    Format,
    FstabMode,
    FsType,
    InitramfsSpec,
    KernelSpec,
    Table,
    TarSpec,
    check_level,
    parse_size,
)


def _size(text: str) -> int | None:
    try:
        return parse_size(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f'expected a size like "4G", "512M" or "auto", got {text!r}'
        ) from None


def _format(text: str) -> Format:
    try:
        return Format.parse(text)
    except RecipeError as exc:
        raise argparse.ArgumentTypeError(f"{exc.message}; {exc.hint}") from None


def _formats(text: str) -> tuple[Format, ...]:
    return tuple(_format(part) for part in text.split(",") if part)


def _build_arg(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    return key, value


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="oci2disk",
        description="Turn Dockerfiles and container images into bootable disks, rootlessly.",
    )
    p.add_argument("--version", action="version", version=f"oci2disk {__version__}")
    p.add_argument("-v", "--verbose", action="store_true", help="show build logs and details")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress output")
    p.add_argument("--debug", action="store_true", help="show tracebacks and debug logs")
    p.add_argument("--json", action="store_true", help="print the run's manifest as JSON")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    b = sub.add_parser("build", help="build a recipe into its outputs")
    b.add_argument("recipe", type=Path, metavar="RECIPE_DIR")
    b.add_argument("-o", "--outdir", type=Path, help="output directory (default: out/RECIPE)")
    b.add_argument(
        "--format", type=_formats, help="outputs, e.g. raw,qcow2 (default: the recipe's)"
    )
    b.add_argument(
        "--builder",
        choices=["auto", "docker", "buildah"],
        default="auto",
        help="auto (default): the Docker Engine when one answers, else buildah",
    )
    b.add_argument("--platform", help="OS/ARCH to build for, e.g. linux/arm64 (qemu-user)")
    b.add_argument("--build-arg", type=_build_arg, action="append", default=[], metavar="K=V")
    b.add_argument("--jobs", type=int, help="outputs written at once (default: one per core)")

    c = sub.add_parser("convert", help="convert an existing image")
    c.add_argument(
        "source",
        metavar="SOURCE",
        help="docker-daemon:NAME[:TAG], oci:DIR[:TAG], docker-archive:FILE, oci-archive:FILE, "
        "containers-storage:NAME[:TAG], docker://REGISTRY/NAME[:TAG], rootfs:FILE[:CONFIG]",
    )
    c.add_argument("-f", "--format", type=_format, required=True)
    c.add_argument("-o", "--output", type=Path, required=True)
    _disk_options(c)
    _archive_options(c)
    c.add_argument("--platform", help="OS/ARCH for multi-platform images")
    c.add_argument("--jobs", type=int, help="converters run at once (default: one per core)")

    s = sub.add_parser("bootstrap", help="make a Debian base image from a mirror (mmdebstrap)")
    s.add_argument("suite", metavar="SUITE", help="bookworm, trixie, ...")
    s.add_argument(
        "--to",
        required=True,
        metavar="DEST",
        help="docker-daemon:NAME:TAG, oci:DIR:TAG, docker://REGISTRY/NAME:TAG "
        "or containers-storage:NAME:TAG",
    )
    s.add_argument("--mirror", default=None)
    s.add_argument("--variant", default="minbase")
    s.add_argument("--include", default="", help="extra packages, comma separated")
    s.add_argument("--platform", help="OS/ARCH, default: this machine's")

    v = sub.add_parser("verify", help="check that an artifact holds exactly the image's files")
    v.add_argument("artifact", type=Path, metavar="ARTIFACT")
    v.add_argument("--against", required=True, metavar="SOURCE")
    v.add_argument("--partition", type=int, help="partition number (default: the root one)")
    v.add_argument("--ignore", action="append", default=[], metavar="PATH")
    v.add_argument("--platform")

    t = sub.add_parser("boot", help="boot a disk under QEMU and watch its serial console")
    t.add_argument("artifact", type=Path, metavar="ARTIFACT")
    t.add_argument("--kernel", type=Path)
    t.add_argument("--initrd", type=Path)
    t.add_argument("--append", default="", help="extra kernel command line")
    t.add_argument("--expect", default=r"login:", help="regex to wait for (default: login:)")
    t.add_argument("--timeout", type=float, default=300.0)
    t.add_argument("--log", type=Path, help="serial log file (default: ARTIFACT.boot.log)")
    t.add_argument("--memory", type=int, default=1024, help="MiB")
    return p


def _archive_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("cgz, tar and kernel outputs")
    g.add_argument("--init", help="cgz: make /init a symlink to this init, e.g. /sbin/init")
    choices = [c.value for c in ArchiveCompression]
    g.add_argument("--cpio-compression", choices=choices, default="gzip", help="cgz compression")
    g.add_argument("--tar-compression", choices=choices, default="none", help="tar compression")
    g.add_argument("--level", type=int, help="compression level of the cgz or tar output")
    g.add_argument("--kernel-version", help="kernel: this version instead of the newest")
    g.add_argument("--vmlinux", action="store_true", help="kernel: also write an ELF vmlinux")


def _disk_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--size", type=_size, default=None, help="4G, 512M or auto (default)")
    p.add_argument("--table", choices=[t.value for t in Table], default="mbr")
    p.add_argument("--fs", choices=[f.value for f in FsType], default="ext4")
    p.add_argument("--label", default="rootfs")
    p.add_argument("--uuid", default=None)
    p.add_argument("--fstab", choices=[f.value for f in FstabMode], default="uuid")
    p.add_argument(
        "--compression",
        choices=[c.value for c in Compression],
        default="none",
        help="qcow2 compression",
    )


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.debug else logging.INFO if args.verbose else logging.WARNING,
        format="%(message)s" if not args.debug else "%(name)s: %(message)s",
        stream=sys.stderr,
    )
    progress = SILENT if args.quiet else stderr_progress()
    try:
        return COMMANDS[args.command](args, progress)
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130
    except UsageError as exc:
        _print_error(exc, args.debug)
        return 2
    except Oci2DiskError as exc:
        _print_error(exc, args.debug)
        return 1


def _print_error(exc: Oci2DiskError, debug: bool) -> None:
    if debug:
        traceback.print_exc()
    print(f"error: {exc}", file=sys.stderr)


def _emit(args: argparse.Namespace, data: dict[str, Any], progress: Progress) -> None:
    if args.json:
        print(json.dumps(data, indent=2, sort_keys=True))
        return
    for artifact in data.get("artifacts", []):
        progress.message(f"{artifact['format']:>6}  {artifact['path']}  ({artifact['size']} bytes)")


def cmd_build(args: argparse.Namespace, progress: Progress) -> int:
    from oci2disk.pipeline import build_recipe

    def show(line: str) -> None:
        if args.verbose:
            print(f"    | {line}", file=sys.stderr)

    result = build_recipe(
        args.recipe,
        outdir=args.outdir,
        formats=args.format,
        build_args=dict(args.build_arg),
        builder=args.builder,
        platform=args.platform,
        progress=progress,
        on_build_line=show,
        jobs=args.jobs,
    )
    _emit(args, result.manifest, progress)
    progress.message(f"manifest: {result.manifest_path}")
    return 0


def cmd_convert(args: argparse.Namespace, progress: Progress) -> int:
    from oci2disk.convert import ConvertOptions
    from oci2disk.oci.layout import Platform
    from oci2disk.pipeline import convert_ref, source_date_epoch

    disk = DiskSpec(
        table=Table(args.table),
        fs=FsType(args.fs),
        size=args.size,
        label=args.label,
        uuid=args.uuid,
        fstab=FstabMode(args.fstab),
    )
    cpio = ArchiveCompression(args.cpio_compression)
    tar = ArchiveCompression(args.tar_compression)
    level_of = {Format.CGZ: cpio, Format.TAR: tar}
    if args.level is not None:
        if args.format not in level_of:
            raise UsageError("--level applies to the cgz and tar formats only")
        problem = check_level(level_of[args.format], args.level)
        if problem:
            raise UsageError(f"--level {args.level}: expected {problem}")
    options = ConvertOptions(
        disk,
        Compression(args.compression),
        source_date_epoch(),
        initramfs=InitramfsSpec(args.init, cpio, args.level if args.format is Format.CGZ else None),
        tar=TarSpec(tar, args.level if args.format is Format.TAR else None),
        kernel=KernelSpec(args.kernel_version, args.vmlinux),
        jobs=args.jobs,
    )
    platform = Platform.parse(args.platform) if args.platform else None
    result = convert_ref(
        args.source, args.format, args.output, options, platform=platform, progress=progress
    )
    _emit(args, result.manifest, progress)
    return 0


def cmd_bootstrap(args: argparse.Namespace, progress: Progress) -> int:
    from oci2disk.bootstrap import DEFAULT_MIRROR, BootstrapSpec, bootstrap
    from oci2disk.oci.layout import Platform
    from oci2disk.refs import parse_ref
    from oci2disk.workspace import Workspace

    spec = BootstrapSpec(
        suite=args.suite,
        dest=parse_ref(args.to),
        mirror=args.mirror or DEFAULT_MIRROR,
        variant=args.variant,
        include=tuple(p for p in args.include.split(",") if p),
        platform=Platform.parse(args.platform) if args.platform else None,
    )
    with Workspace() as ws, progress.step(f"bootstrapping Debian {spec.suite} -> {spec.dest}"):
        result = bootstrap(spec, ws.path)
    data = {"dest": str(result.dest), "id": result.image_id, "rootfs_bytes": result.tarball_bytes}
    if args.json:
        print(json.dumps(data, indent=2))
    else:
        progress.message(f"{result.dest}  {result.image_id}")
    return 0


def cmd_verify(args: argparse.Namespace, progress: Progress) -> int:
    from oci2disk.oci.layout import Platform
    from oci2disk.pipeline import verify_artifact

    report = verify_artifact(
        args.artifact,
        args.against,
        ignore=tuple(args.ignore),
        partition=args.partition,
        platform=Platform.parse(args.platform) if args.platform else None,
        progress=progress,
    )
    if args.json:
        print(
            json.dumps(
                {
                    "equal": report.equal,
                    "checked": report.checked,
                    "ignored": list(report.ignored),
                    "differences": [d.__dict__ for d in report.differences],
                },
                indent=2,
                default=str,
            )
        )
    else:
        for d in report.differences:
            print(f"{d.what:>9}  /{d.path}  expected {d.expected}  found {d.actual}")
        verdict = "equal" if report.equal else f"{len(report.differences)} difference(s)"
        print(
            f"{args.artifact}: {verdict} ({report.checked} paths checked; "
            f"ignored: {', '.join(report.ignored)})"
        )
    return 0 if report.equal else 1


def cmd_boot(args: argparse.Namespace, progress: Progress) -> int:
    from oci2disk.pipeline import boot_artifact

    result = boot_artifact(
        args.artifact,
        kernel=args.kernel,
        initrd=args.initrd,
        append=args.append,
        expect=args.expect,
        timeout=args.timeout,
        log_path=args.log,
        memory_mb=args.memory,
        progress=progress,
        echo=(lambda line: print(f"    | {line}", file=sys.stderr)) if args.verbose else None,
    )
    if result.matched:
        print(
            f"boot: matched {args.expect!r} after {result.seconds:.1f} s "
            f"({result.accel}); log: {result.log_path}"
        )
        return 0
    tail = "\n".join(result.log_path.read_text(errors="replace").splitlines()[-30:])
    print(
        f"{tail}\nerror: {args.expect!r} did not appear within {args.timeout:.0f} s "
        f"({result.accel}); full log: {result.log_path}",
        file=sys.stderr,
    )
    return 1


COMMANDS = {
    "build": cmd_build,
    "convert": cmd_convert,
    "bootstrap": cmd_bootstrap,
    "verify": cmd_verify,
    "boot": cmd_boot,
}


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
