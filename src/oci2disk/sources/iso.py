"""``iso:FILE``: the root filesystem of a live ISO as a source.

Read rootless, without mounting anything: ``xorriso -osirrox`` lists the ISO and
extracts the live root, which is one of

- Debian live (``/live/filesystem.squashfs``) and Ubuntu (``/casper/filesystem.squashfs``):
  a squashfs of the root, turned into a tar by ``sqfs2tar`` (owners, devices, hard links
  and xattrs kept without root);
- Fedora, openEuler and other dracut live images (``/LiveOS/squashfs.img``): a squashfs
  that holds ``LiveOS/rootfs.img``, an ext4 image read with oci2disk's ext reader (newer
  Fedora puts the root straight into the squashfs: read as above).

An installer ISO has no root filesystem to read: that is an error saying what to do.

Host tools: xorriso (xorriso), sqfs2tar and rdsquashfs (squashfs-tools-ng).
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path
from typing import BinaryIO

from oci2disk import run
from oci2disk.errors import CommandError, ImageError
from oci2disk.oci.layout import OciImage, Platform, host_platform
from oci2disk.rootfs.flatten import flatten
from oci2disk.sources.exttree import ExtTree
from oci2disk.sources.image import (
    image_from_tree,
    layout_from_stream,
    platform_of,
    with_platform,
)

log = logging.getLogger("oci2disk.sources.iso")

for _tool, _package in (
    ("xorriso", "xorriso"),
    ("sqfs2tar", "squashfs-tools-ng"),
    ("rdsquashfs", "squashfs-tools-ng"),
):
    run.DEBIAN_PACKAGES.setdefault(_tool, _package)

# Where live ISOs keep their root, in the order they are looked for.
SQUASHFS_ROOTS = (
    "/live/filesystem.squashfs",  # Debian live-build (live-boot)
    "/casper/filesystem.squashfs",  # Ubuntu up to 22.04, and casper-based spins
    "/LiveOS/squashfs.img",  # dracut dmsquash-live: Fedora, openEuler, CentOS, RHEL
)
DRACUT_EXT_IMAGE = "/LiveOS/rootfs.img"  # inside LiveOS/squashfs.img (or beside it)
ISO9660_MAGIC_OFFSET = 0x8001
INSTALLER_MARKS = ("/images/install.img", "/.treeinfo", "/install.amd", "/pool", "/Packages")


def list_files(iso: Path) -> list[str]:
    """Every regular file of the ISO (Rock Ridge names), absolute."""
    try:
        done = run.run(
            ["xorriso", "-indev", os.fspath(iso), "-find", "/", "-type", "f"],
            what=f"xorriso cannot read {iso}",
        )
    except CommandError as exc:
        raise ImageError(
            f"iso:{iso}: xorriso cannot read it as an ISO 9660 image:\n{exc.stderr_tail}",
            hint="check that the file is a whole, undamaged ISO (compare its checksum)",
        ) from None
    files = []
    for line in done.stdout.decode("utf-8", "surrogateescape").splitlines():
        line = line.strip()
        if len(line) >= 2 and line[0] == line[-1] == "'":
            files.append(line[1:-1].replace("'\"'\"'", "'"))
    return files


def live_root(iso: Path, files: list[str]) -> str:
    """The ISO path of the live root; an error that says what to do when there is none."""
    present = set(files)
    for candidate in SQUASHFS_ROOTS:
        if candidate in present:
            return candidate
    if DRACUT_EXT_IMAGE in present:
        return DRACUT_EXT_IMAGE
    layered = sorted(f for f in files if f.startswith("/casper/") and f.endswith(".squashfs"))
    if layered:
        raise ImageError(
            f"iso:{iso}: the root is split into layered squashfs images "
            f"({', '.join(layered)}), which oci2disk does not merge",
            hint="use the ISO of a release with one filesystem.squashfs, or install it in a "
            "VM once and read that disk with disk:FILE",
        )
    installer = [mark for mark in INSTALLER_MARKS if mark in present or _under(mark, files)]
    kind = "an installer ISO" if installer else "an ISO without a live root filesystem"
    found = f" (it has {', '.join(installer)})" if installer else ""
    raise ImageError(
        f"iso:{iso}: {kind}{found}: there is no {', '.join(SQUASHFS_ROOTS)} on it, so "
        "there is no installed system to read",
        hint="install it once in a VM (virt-install, or qemu with a blank disk) and read the "
        "installed disk with disk:FILE; or use the distribution's live ISO or cloud image",
    )


def _under(directory: str, files: list[str]) -> bool:
    return any(f.startswith(directory + "/") for f in files)


def extract(iso: Path, path: str, dest: Path) -> Path:
    """Copy the file ``path`` of the ISO to ``dest`` (xorriso's osirrox, no mount)."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    run.run(
        ["xorriso", "-osirrox", "on", "-indev", os.fspath(iso), "-extract", path, os.fspath(dest)],
        what=f"xorriso could not extract {path} from {iso}",
    )
    dest.chmod(0o600)
    return dest


def squashfs_has(squashfs: Path, path: str) -> bool:
    return run.run(["rdsquashfs", "--stat", path, os.fspath(squashfs)], check=False).returncode == 0


def image_from_iso(iso: Path, workdir: Path, *, platform: Platform | None = None) -> OciImage:
    """The live root of ``iso`` as a one-layer OCI image in ``workdir``."""
    if not iso.is_file():
        raise ImageError(f"iso:{iso}: {iso} is not a file")
    where = f"iso:{iso}"
    with iso.open("rb") as handle:
        handle.seek(ISO9660_MAGIC_OFFSET)
        if handle.read(5) != b"CD001":
            raise ImageError(
                f"{where}: not an ISO 9660 image (no CD001 volume descriptor at byte 32769)",
                hint="check that the file is a whole, undamaged ISO (compare its checksum); "
                "a disk image is read with disk:FILE",
            )
    root = live_root(iso, list_files(iso))
    log.info("%s: the live root is %s", where, root)
    scratch = workdir / "iso"
    try:
        if root == DRACUT_EXT_IMAGE:
            ext = extract(iso, root, scratch / "rootfs.img")
            return _image_from_ext(ext, workdir, platform, f"{where}{root}")
        squashfs = extract(iso, root, scratch / "root.squashfs")
        if squashfs_has(squashfs, DRACUT_EXT_IMAGE):
            unpacked = scratch / "unpacked"
            unpacked.mkdir()
            # The whole squashfs (dracut puts only LiveOS/ in it): rdsquashfs 1.2 cannot
            # unpack a sub-path. It writes sparse files, so an 8 GiB rootfs.img costs
            # its data only.
            run.run(
                [
                    "rdsquashfs",
                    "--unpack-path",
                    "/",
                    "--unpack-root",
                    os.fspath(unpacked),
                    "--no-dev",
                    "--no-sock",
                    "--no-fifo",
                    os.fspath(squashfs),
                ],
                what=f"rdsquashfs could not unpack {DRACUT_EXT_IMAGE} from {root}",
            )
            squashfs.unlink()
            ext = unpacked / DRACUT_EXT_IMAGE.lstrip("/")
            return _image_from_ext(ext, workdir, platform, f"{where}{root}{DRACUT_EXT_IMAGE}")
        return image_from_squashfs(squashfs, workdir, platform=platform, where=f"{where}{root}")
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _image_from_ext(ext: Path, workdir: Path, platform: Platform | None, where: str) -> OciImage:
    with ExtTree(ext) as tree:
        return image_from_tree(tree, workdir / "rootfs", platform=platform, where=where)


def image_from_squashfs(
    squashfs: Path, workdir: Path, *, platform: Platform | None = None, where: str
) -> OciImage:
    """A squashfs root (``sqfs2tar``'s tar) as a one-layer OCI image in ``workdir``.

    The tar streams into the layout. Without ``platform`` the layout is first made for
    the host's platform and flattened (an index, no copy) to read the ELF header of
    /bin/sh; when that names another machine the config is rewritten beside it.
    """
    argv = ["sqfs2tar", "--root-becomes", ".", "--no-skip", os.fspath(squashfs)]

    def write_tar(out: BinaryIO) -> None:
        proc = run.start(argv, stdout=out)
        _, stderr = proc.communicate()
        if proc.returncode != 0:
            raise run.command_error(
                argv, proc.returncode, stderr, what=f"sqfs2tar could not read {where}"
            )

    image = layout_from_stream(write_tar, workdir / "image", platform or host_platform())
    if platform is not None:
        return image
    with flatten(image, workdir / "probe") as rootfs:
        guessed = platform_of(rootfs, None, where)
    shutil.rmtree(workdir / "probe", ignore_errors=True)
    if guessed.matches(image.config.platform):
        return image
    return with_platform(image, guessed, workdir / f"image-{guessed.architecture}")
