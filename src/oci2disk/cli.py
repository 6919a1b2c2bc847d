"""Command line: the only place that parses argv, prints, and picks exit codes.

Exit codes: 0 success, 1 error (or verify found differences / boot did not match),
2 usage, 3 verify could not verify, 130 interrupted (Ctrl-C), 143 terminated (SIGTERM).
"""

from __future__ import annotations

import argparse
import errno
import json
import logging
import os
import signal
import sys
import tempfile
import threading
import traceback
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from oci2disk import __version__, build, manifest, run, settings
from oci2disk.convert import ConvertOptions, Format
from oci2disk.errors import Oci2DiskError, UsageError
from oci2disk.oci import cache
from oci2disk.progress import SILENT, Progress, stderr_progress
from oci2disk.settings import CliKind, Setting

if TYPE_CHECKING:
    from oci2disk.oci.add import Addition

# The settings each command takes as flags (the rest of the table is recipe-only).
BUILD_SETTINGS = (
    "outputs.formats",
    "build.platform",
    "build.args",
    "boot.firmware",
    "boot.cmdline",
)
CONVERT_SETTINGS = (
    "disk.size",
    "disk.table",
    "disk.fs",
    "disk.label",
    "disk.uuid",
    "disk.fstab",
    "disk.root_partition",
    "outputs.compression",
    "outputs.keep_identity",
    "initramfs.init",
    "initramfs.compression",
    "tar.compression",
    "initramfs.level",  # --level, for the cgz or the tar output
    "kernel.version",
    "kernel.vmlinux",
    "squashfs.compressor",
    "squashfs.block_size",
    "iso.append",
    "iso.volume_id",
    "disk.max_size",
    "build.platform",
    "boot.firmware",
    "boot.cmdline",
)
LEVEL_OF = {Format.CGZ: "initramfs.level", Format.TAR: "tar.level"}
# What verify expects is what a conversion with these options writes (given as then).
VERIFY_SETTINGS = (
    "disk.table",
    "disk.fs",
    "disk.label",
    "disk.uuid",
    "disk.fstab",
    "initramfs.init",
    "outputs.keep_identity",
    "boot.firmware",
    "boot.cmdline",
)
COULD_NOT_VERIFY = 3


def _dest(setting: Setting[Any]) -> str:
    return setting.key.replace(".", "__")


def add_setting(p: argparse.ArgumentParser | Any, key: str, *names: str, **extra: Any) -> None:
    """A flag for the setting ``key``, with its help and choices from the settings table.

    Every flag defaults to None (not given), so that a recipe-style check can tell a
    value given from a default, and the same parser checks it as recipe.toml's would.
    """
    setting = settings.BY_KEY[key]
    assert setting.flag is not None
    kwargs: dict[str, Any] = {"dest": _dest(setting), "default": None, "help": setting.help}
    if setting.cli_kind is CliKind.BOOL:
        kwargs["action"] = "store_true"
    elif setting.cli_kind is CliKind.INT:
        kwargs["type"] = int
    elif setting.cli_kind is CliKind.MAP:
        kwargs["action"] = "append"
    if setting.choices:
        kwargs["choices"] = setting.choices
    elif setting.cli_kind is not CliKind.BOOL:
        kwargs["metavar"] = setting.metavar or setting.name.upper()
    kwargs.update(extra)
    p.add_argument(*names, setting.flag, **kwargs)


def _toml_shaped(setting: Setting[Any], raw: Any) -> Any:
    """A flag's value as recipe.toml would hold it, for the setting's own parser."""
    if setting.cli_kind is CliKind.LIST and isinstance(raw, str):
        return [part for part in raw.split(",") if part]
    if setting.cli_kind is CliKind.MAP:
        pairs: dict[str, str] = {}
        for item in raw:
            key, sep, value = item.partition("=")
            if not sep or not key:
                raise UsageError(f"{setting.flag} {item!r}: expected KEY=VALUE")
            pairs[key] = value
        return pairs
    if setting.cli_kind is CliKind.BOOL:
        return bool(raw) or None  # store_true: only a given flag counts as given
    return raw


def setting_values(args: argparse.Namespace, keys: Sequence[str]) -> dict[str, Any]:
    """The settings given on the command line, parsed and checked by the settings table."""
    values: dict[str, Any] = {}
    for key in keys:
        setting = settings.BY_KEY[key]
        given = getattr(args, _dest(setting), None)
        raw = None if given is None else _toml_shaped(setting, given)
        if raw is None:
            continue
        try:
            values[key] = setting.parse(raw)
        except settings.Invalid as exc:
            raise UsageError(f"{setting.flag} {given!r}: expected {exc.expected}") from None
    return values


def _problem(exc: settings.Problem) -> UsageError:
    flag = settings.BY_KEY[exc.key].flag or exc.key
    return UsageError(f"{flag}: expected {exc.expected}")


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
    add_setting(b, "outputs.formats", help="outputs, e.g. raw,qcow2 (default: the recipe's)")
    b.add_argument(
        "--builder",
        choices=build.CHOICES,
        default=build.AUTO,
        help="auto (default): the Docker Engine when one answers, else buildah",
    )
    add_setting(b, "build.platform")
    add_setting(b, "build.args")
    add_setting(b, "outputs.keep_identity")
    add_setting(b, "boot.firmware")
    add_setting(b, "boot.cmdline")
    b.add_argument("--jobs", type=int, help="outputs written at once (default: one per core)")
    b.add_argument(
        "--force",
        action="store_true",
        help="replace a non-empty directory output that oci2disk made before",
    )
    _image_flags(b)
    _cache_flags(b)

    c = sub.add_parser("convert", help="convert an existing image")
    c.add_argument(
        "source",
        metavar="SOURCE",
        help="docker-daemon:NAME[:TAG], oci:DIR[:TAG], docker-archive:FILE, oci-archive:FILE, "
        "containers-storage:NAME[:TAG], docker://REGISTRY/NAME[:TAG], rootfs:FILE[:CONFIG], "
        "disk:FILE[:PARTITION], iso:FILE",
    )
    add_setting(
        c, "outputs.formats", "-f", required=True, help="the output format: " + Format.names()
    )
    c.add_argument("-o", "--output", type=Path, required=True)
    disk = c.add_argument_group("disk outputs (raw, fs, qcow2, vmdk, vhdx, vpc, vdi)")
    for key in CONVERT_SETTINGS:
        if key.startswith(("disk.", "outputs.", "boot.")):
            add_setting(disk, key)
    archive = c.add_argument_group("cgz, tar and kernel outputs")
    for key in CONVERT_SETTINGS:
        if key.startswith(("initramfs.", "tar.", "kernel.")):
            add_setting(archive, key)
    live = c.add_argument_group("squashfs and iso outputs")
    for key in CONVERT_SETTINGS:
        if key.startswith(("squashfs.", "iso.")):
            add_setting(live, key)
    add_setting(c, "build.platform", help="OS/ARCH for multi-platform images")
    c.add_argument("--jobs", type=int, help="converters run at once (default: one per core)")
    c.add_argument(
        "--force",
        action="store_true",
        help="replace a non-empty directory output that oci2disk made before",
    )
    _image_flags(c)
    _cache_flags(c)

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
    v.add_argument(
        "--recipe",
        type=Path,
        metavar="RECIPE_DIR",
        help="expect what `build RECIPE_DIR` writes (its label, UUID, fstab, init ...)",
    )
    for key in VERIFY_SETTINGS:
        add_setting(v, key)
    _cache_flags(v)

    k = sub.add_parser("cache", help="show, verify or prune the cache of layers and outputs")
    k.add_argument("--cache-dir", type=Path, help="the cache folder (default: ~/.cache/oci2disk)")
    k.add_argument("--prune", action="store_true", help="evict down to the size limit")
    k.add_argument("--max-size", help="the size limit for --prune, e.g. 5G (default: 10G)")
    k.add_argument("--clear", action="store_true", help="remove every entry")
    k.add_argument("--verify", action="store_true", help="rehash every entry, drop bad ones")

    t = sub.add_parser("boot", help="boot a disk under QEMU and watch its serial console")
    t.add_argument("artifact", type=Path, metavar="ARTIFACT")
    t.add_argument("--kernel", type=Path)
    t.add_argument("--initrd", type=Path)
    t.add_argument("--append", default="", help="extra kernel command line")
    t.add_argument("--expect", default=r"login:", help="regex to wait for (default: login:)")
    t.add_argument("--timeout", type=float, default=300.0)
    t.add_argument("--log", type=Path, help="serial log file (default: ARTIFACT.boot.log)")
    t.add_argument("--memory", type=int, default=1024, help="MiB")
    t.add_argument(
        "--firmware",
        choices=("bios", "uefi", "none"),
        help="boot through the disk's own bootloader with SeaBIOS (bios) or UEFI (OVMF, "
        "AAVMF on arm64), or give QEMU the kernel (none); default: the disk's bootloader "
        "when it has one (SeaBIOS first) and no --kernel or --append is given",
    )
    return p


def _addition(text: str) -> Addition:
    from oci2disk.oci.add import Addition

    try:
        return Addition.parse(text)
    except Oci2DiskError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _image_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--add",
        type=_addition,
        action="append",
        default=[],
        metavar="SRC:DEST[:UID:GID]",
        help="add a host file or directory to the image as a new layer (repeatable)",
    )
    p.add_argument(
        "--push",
        metavar="REF",
        help="push the disk as a KubeVirt containerDisk to REF and every output as an OCI "
        "artifact to REF's tag + '-artifact' (credentials: the docker config)",
    )


def _push(args: argparse.Namespace, manifest_path: Path, progress: Progress) -> list[Any]:
    """``--push``: after the outputs are complete, send them to the registry."""
    if not args.push:
        return []
    from oci2disk.publish import push_outputs

    with (
        progress.step(f"pushing to {args.push}"),
        tempfile.TemporaryDirectory(prefix=".oci2disk-push-", dir=manifest_path.parent) as work,
    ):
        pushed = push_outputs(manifest_path, args.push, Path(work))
    for item in pushed:
        progress.message(
            f"pushed {item.shape.value} {item.ref}@{item.digest} "
            f"({len(item.sent)} blob(s) sent, {len(item.reused)} already there)"
        )
    return [item.to_json() for item in pushed]


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.debug else logging.INFO if args.verbose else logging.WARNING,
        format="%(message)s" if not args.debug else "%(name)s: %(message)s",
        stream=sys.stderr,
    )
    progress = SILENT if args.quiet else stderr_progress()
    _stop_on_signals()
    try:
        with cache.using(_cache(args)):
            return COMMANDS[args.command](args, progress)
    except Terminated:
        print("\nterminated", file=sys.stderr)
        return 143
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130
    except UsageError as exc:
        _print_error(exc, args.debug)
        return 2
    except Oci2DiskError as exc:
        _print_error(exc, args.debug)
        return 1
    except OSError as exc:  # what the system refused: said plainly, not as a traceback
        _print_error(_os_error(exc, args), args.debug)
        return 1


def _os_error(exc: OSError, args: argparse.Namespace) -> Oci2DiskError:
    from oci2disk.workspace import temp_base

    name = exc.filename if isinstance(exc.filename, str) else ""  # not a descriptor
    if len(name) > 200:  # a path too long to use is too long to read whole
        name = f"{name[:80]}...{name[-80:]} ({len(name.encode())} bytes)"
    where = f": {name}" if name else ""
    text = f"{exc.strerror or exc}{where}"
    if exc.errno == errno.ENOSPC:
        out = getattr(args, "output", None) or getattr(args, "outdir", None) or Path(".")
        out = Path(out).absolute()
        folders = {"the output directory": out if out.is_dir() else out.parent}
        folders["the temporary files (OCI2DISK_TMPDIR)"] = temp_base()
        free = "; ".join(f"{what} {path}: {_free(path)} free" for what, path in folders.items())
        return Oci2DiskError(
            f"a filesystem is full ({text}); {free}{_needed(args)}",
            hint="free space there, or write the outputs (-o) or the temporary files "
            "(OCI2DISK_TMPDIR) to a filesystem with more room",
        )
    if exc.errno == errno.ENAMETOOLONG:
        return Oci2DiskError(f"{text} (a name holds at most 255 bytes, a path 4096)")
    if exc.errno == errno.EFBIG:
        return Oci2DiskError(
            f"{text}: larger than its filesystem allows", hint="choose a smaller --size"
        )
    return Oci2DiskError(text)


def _needed(args: argparse.Namespace) -> str:
    """What the temporary files need at least: the image's layers, unpacked once."""
    source = getattr(args, "source", None)
    if not isinstance(source, str) or ":" not in source:
        return ""
    transport, _, rest = source.partition(":")
    path = Path(rest)
    if transport not in ("oci-archive", "docker-archive", "rootfs", "disk", "iso"):
        return ""
    if transport in ("disk", "iso", "rootfs") and not path.is_file():
        path = Path(rest.rsplit(":", 1)[0])
    if not path.is_file():
        return ""
    size = path.stat().st_size
    return (
        f"; the source {path} is {size / (1 << 20):.0f} MiB, and its layers take at least "
        "that much in the temporary files"
    )


def _free(path: Path) -> str:
    try:
        st = os.statvfs(path)
    except OSError:
        return "unknown"
    return f"{st.f_bavail * st.f_frsize / (1 << 30):.1f} GiB"


class Terminated(KeyboardInterrupt):
    """SIGTERM: stopped like Ctrl-C (every cleanup runs), with exit code 143."""


def _stop_on_signals() -> None:
    """SIGTERM and SIGINT kill the children first, then unwind like Ctrl-C.

    Only oci2disk gets a SIGTERM (timeout, CI cancellation, docker stop), not its
    children: they are killed here so that none writes on, and the exception that
    follows removes the temporary outputs and the workspace.
    """
    if threading.current_thread() is not threading.main_thread():
        return

    def stop(signum: int, frame: object) -> None:
        run.stop_children()
        raise Terminated() if signum == signal.SIGTERM else KeyboardInterrupt()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)


def _cache_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--cache-dir",
        type=Path,
        help="the cache of layers and outputs (default: ${XDG_CACHE_HOME:-~/.cache}/oci2disk)",
    )
    p.add_argument("--no-cache", action="store_true", help="read and write everything afresh")


def _cache(args: argparse.Namespace) -> cache.Cache | None:
    """The cache a command uses: on by default for build, convert and verify."""
    if args.command not in ("build", "convert", "verify") or args.no_cache:
        return None
    return cache.Cache(args.cache_dir or cache.default_root(), cache.default_max_bytes())


def cmd_cache(args: argparse.Namespace, progress: Progress) -> int:
    limit = cache.parse_size(args.max_size) if args.max_size else cache.default_max_bytes()
    store = cache.Cache(args.cache_dir or cache.default_root(), limit)
    with store.exclusive():
        if args.verify:
            for bad in store.verify_all():
                print(f"removed (did not match its digest): {bad}")
        if args.clear or args.prune:
            freed = store.evict(0 if args.clear else limit)
            print(f"freed {freed / (1 << 20):.0f} MiB")
        use = store.usage()
    print(f"cache: {use.root}")
    print(f"  blobs:     {use.blobs} ({use.blob_bytes / (1 << 20):.0f} MiB)")
    print(f"  images:    {use.images}")
    print(f"  artifacts: {use.artifacts} ({use.artifact_bytes / (1 << 20):.0f} MiB)")
    print(f"  total:     {use.total / (1 << 20):.0f} MiB of {limit / (1 << 30):.1f} GiB")
    return 0


def _print_error(exc: Oci2DiskError, debug: bool) -> None:
    if debug:
        traceback.print_exc()
    print(f"error: {exc}", file=sys.stderr)


def _emit(
    args: argparse.Namespace,
    made: manifest.RunManifest,
    progress: Progress,
    pushed: list[Any] | None = None,
) -> None:
    if args.json:
        data = manifest.to_json(made)
        if pushed:
            data["pushed"] = pushed
        print(json.dumps(data, indent=2, sort_keys=True))
        return
    for artifact in made.artifacts:
        progress.message(f"{artifact.format:>6}  {artifact.path}  ({artifact.size} bytes)")


def _warn(made: manifest.RunManifest) -> None:
    """What the outputs could not keep; shown once, whatever the progress setting."""
    for warning in made.warnings:
        print(f"warning: {warning}", file=sys.stderr)


def cmd_build(args: argparse.Namespace, progress: Progress) -> int:
    from oci2disk.pipeline import build_recipe

    def show(line: str) -> None:
        if args.verbose:
            print(f"    | {line}", file=sys.stderr)

    values = setting_values(args, BUILD_SETTINGS)
    result = build_recipe(
        args.recipe,
        outdir=args.outdir,
        formats=values.get("outputs.formats"),
        build_args=values.get("build.args"),
        builder=args.builder,
        platform=values.get("build.platform"),
        progress=progress,
        on_build_line=show,
        jobs=_jobs(args.jobs),
        force=args.force,
        keep_identity=bool(args.outputs__keep_identity),
        source_date_epoch=settings.source_date_epoch(),
        additions=args.add,
        firmware=values.get("boot.firmware"),
        cmdline=values.get("boot.cmdline"),
    )
    _warn(result.manifest)
    pushed = _push(args, result.manifest_path, progress)
    _emit(args, result.manifest, progress, pushed)
    progress.message(f"manifest: {result.manifest_path}")
    return 0


def _jobs(jobs: int | None) -> int | None:
    if jobs is not None and jobs < 1:
        raise UsageError(f"--jobs {jobs}: expected at least 1")
    return jobs


def convert_options(args: argparse.Namespace) -> tuple[tuple[Format, ...], ConvertOptions]:
    """The formats and options of ``oci2disk convert``, checked as a recipe's would be."""
    values = setting_values(args, [k for k in CONVERT_SETTINGS if k != "initramfs.level"])
    formats = _formats(args.outputs__formats)
    if args.initramfs__level is not None:
        keys = [LEVEL_OF[f] for f in formats if f in LEVEL_OF]
        if len(keys) != 1:
            raise UsageError("--level applies to one cgz or tar output")
        values[keys[0]] = settings.whole_number(args.initramfs__level)
    try:
        options = ConvertOptions(
            settings.disk_spec(values),
            settings.get(values, "outputs.compression"),
            settings.source_date_epoch(),
            initramfs=settings.initramfs_spec(values),
            tar=settings.tar_spec(values),
            kernel=settings.kernel_spec(values),
            squashfs=settings.squashfs_spec(values),
            iso=settings.iso_spec(values),
            boot=settings.boot_spec(values),
            jobs=_jobs(args.jobs),
            replace=args.force,
            keep_identity=settings.get(values, "outputs.keep_identity"),
        )
    except settings.Problem as exc:
        raise _problem(exc) from None
    return formats, options


def _formats(text: str) -> tuple[Format, ...]:
    setting = settings.BY_KEY["outputs.formats"]
    try:
        found: tuple[Format, ...] = tuple(setting.parse(_toml_shaped(setting, text)))
    except settings.Invalid as exc:
        raise UsageError(f"-f/--format {text!r}: expected {exc.expected}") from None
    return found


def cmd_convert(args: argparse.Namespace, progress: Progress) -> int:
    from oci2disk.oci.layout import Platform
    from oci2disk.pipeline import convert_ref

    formats, options = convert_options(args)
    platform = Platform.parse(args.build__platform) if args.build__platform else None
    result = convert_ref(
        args.source,
        formats[0] if len(formats) == 1 else formats,
        args.output,
        options,
        platform=platform,
        progress=progress,
        additions=args.add,
    )
    _warn(result.manifest)
    pushed = _push(args, result.manifest_path, progress)
    _emit(args, result.manifest, progress, pushed)
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


def verify_options(args: argparse.Namespace) -> ConvertOptions:
    """The options the artifact was made with: the recipe's, or the flags' (not both)."""
    values = setting_values(args, VERIFY_SETTINGS)
    if args.recipe is not None:
        if values:
            raise UsageError("verify takes --recipe or conversion flags, not both")
        from oci2disk import recipe

        return ConvertOptions.from_recipe(recipe.load(args.recipe))
    try:
        return ConvertOptions(
            settings.disk_spec(values),
            source_date_epoch=settings.source_date_epoch(),
            initramfs=settings.initramfs_spec(values),
            keep_identity=settings.get(values, "outputs.keep_identity"),
            boot=settings.boot_spec(values),
        )
    except settings.Problem as exc:
        raise _problem(exc) from None


def cmd_verify(args: argparse.Namespace, progress: Progress) -> int:
    from oci2disk.oci.layout import Platform
    from oci2disk.pipeline import verify_artifact

    options = verify_options(args)
    try:
        report = verify_artifact(
            args.artifact,
            args.against,
            ignore=tuple(args.ignore),
            partition=args.partition,
            platform=Platform.parse(args.platform) if args.platform else None,
            progress=progress,
            options=options,
        )
    except UsageError:
        raise
    except (Oci2DiskError, OSError) as exc:  # not "different": nothing could be compared
        _print_error(exc if isinstance(exc, Oci2DiskError) else _os_error(exc, args), args.debug)
        print(f"{args.artifact}: could not verify", file=sys.stderr)
        return COULD_NOT_VERIFY
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
        firmware=args.firmware,
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
    "cache": cmd_cache,
}


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
