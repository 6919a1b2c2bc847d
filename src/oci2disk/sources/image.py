"""A rootfs :class:`Tree` from any source, wrapped as a single-layer OCI image.

The layer is the tree's canonical tar (:mod:`oci2disk.rootfs.tarwriter`), uncompressed,
in a layout inside the run's workdir; the config's architecture is the one ``--platform``
gives, else the one the tree's ELF programs are built for.

Host tools: none.
"""

from __future__ import annotations

import logging
import os
import shutil
import struct
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO

from oci2disk.arch import Arch
from oci2disk.errors import ImageError
from oci2disk.oci.layout import (
    MT_OCI_LAYER,
    LayoutWriter,
    OciImage,
    Platform,
    blob_path,
    open_layout,
)
from oci2disk.rootfs.model import Kind, Tree, follow
from oci2disk.rootfs.tarwriter import write_tree_tar

log = logging.getLogger("oci2disk.sources")

# Programs every Linux rootfs has one of; the first ELF among them names the machine.
ELF_PROBES = (
    "bin/sh",
    "usr/bin/env",
    "sbin/init",
    "lib/systemd/systemd",
    "usr/lib/systemd/systemd",
    "bin/ls",
    "usr/bin/ls",
    "bin/busybox",
)
ELF_MAGIC = b"\x7fELF"
ELF_DATA_BIG_ENDIAN = 2
DEFAULT_CONFIG = {
    "Env": ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"],
    "Cmd": ["/bin/sh"],
}


def guess_arch(tree: Tree) -> Arch | None:
    """The architecture of the first ELF program among :data:`ELF_PROBES`, or None."""
    for path in ELF_PROBES:
        entry = follow(tree, path)
        if entry is None or entry.kind is not Kind.FILE or entry.size < 20:
            continue
        with tree.open(entry.path) as program:
            head = program.read(20)
        if not head.startswith(ELF_MAGIC):
            continue  # a shell script (busybox-less /sbin/init wrappers, ...)
        order = ">" if head[5] == ELF_DATA_BIG_ENDIAN else "<"
        (machine,) = struct.unpack_from(order + "H", head, 18)
        arch = Arch.from_elf_machine(machine)
        if arch is not None:
            log.debug("/%s is an ELF program for %s", entry.path, arch.oci)
            return arch
    return None


def platform_of(tree: Tree, given: Platform | None, where: str) -> Platform:
    """``given`` (``--platform``) when set, else the platform the tree's programs name."""
    if given is not None:
        return given
    arch = guess_arch(tree)
    if arch is None:
        raise ImageError(
            f"{where}: cannot tell the architecture: none of /{', /'.join(ELF_PROBES[:3])} "
            "... is an ELF program",
            hint="give it with --platform, e.g. --platform linux/amd64",
        )
    return Platform("linux", arch.oci, arch.variant)


def image_from_tree(
    tree: Tree, workdir: Path, *, platform: Platform | None = None, where: str
) -> OciImage:
    """Write ``tree`` as a one-layer OCI layout in ``workdir``/image and open it."""
    plat = platform_of(tree, platform, where)
    return layout_from_stream(lambda out: write_tree_tar(tree, out), workdir / "image", plat)


def layout_from_stream(
    write_tar: Callable[[BinaryIO], object], layout: Path, platform: Platform
) -> OciImage:
    """A one-layer layout whose layer is what ``write_tar`` writes, stored as it streams.

    The tar goes through a pipe straight into the blob store (hashed on the way), so a
    rootfs is written to disk once, not once as a tar and again as a blob.
    """
    writer = LayoutWriter(layout)
    read_fd, write_fd = os.pipe()
    failure: list[BaseException] = []

    def produce() -> None:
        try:
            with open(write_fd, "wb") as out:
                write_tar(out)
        except BrokenPipeError:
            pass  # the reader failed: its own error is raised below
        except BaseException as exc:  # re-raised in the caller's thread
            failure.append(exc)

    producer = threading.Thread(target=produce, name="rootfs-tar", daemon=True)
    producer.start()
    try:
        with open(read_fd, "rb") as stream:
            layer = writer.add_stream(stream, MT_OCI_LAYER)
    finally:
        producer.join()
    if failure:
        raise failure[0]
    writer.add_image(image_config(platform, layer.digest), [layer], None)
    return open_layout(layout, None)


def with_platform(image: OciImage, platform: Platform, layout: Path) -> OciImage:
    """``image`` (one layer) with another platform in its config, in a new ``layout``.

    The layer blob is hard-linked, not copied.
    """
    (layer,) = image.layers
    writer = LayoutWriter(layout)
    target = blob_path(layout, layer.digest)
    try:
        os.link(image.blob_path(layer.digest), target)
    except OSError:
        shutil.copyfile(image.blob_path(layer.digest), target)
    writer.add_image(image_config(platform, image.config.diff_ids[0]), [layer], None)
    return open_layout(layout, None)


def image_config(platform: Platform, diff_id: str) -> dict[str, Any]:
    config: dict[str, Any] = {
        "architecture": platform.architecture,
        "os": platform.os,
        "rootfs": {"type": "layers", "diff_ids": [diff_id]},
        "config": DEFAULT_CONFIG,
    }
    if platform.variant:
        config["variant"] = platform.variant
    return config
