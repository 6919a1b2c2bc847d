"""Build-time noise: files that record when an image was built, not what it holds.

Two ``docker build --no-cache`` runs of one Dockerfile write these differently even
when every package is the same: logs stamped with the build's clock, and caches of
inode numbers and times. With ``SOURCE_DATE_EPOCH`` set (a reproducible build asked
for), the disks, initramfs and directories oci2disk writes have them neutralised, and
the manifest lists each path under ``build_noise``:

- logs are emptied (the file stays, with its owner and mode, for the tools that append
  to it): ``/var/log/dpkg.log``, ``/var/log/alternatives.log``, apt's
  ``history.log`` and ``term.log``, debootstrap's ``bootstrap.log``;
- caches that their tools rebuild are removed: ldconfig's ``aux-cache`` (inode numbers
  and times of the libraries), apt's ``pkgcache.bin`` and ``srcpkgcache.bin``, apt's
  solver dump ``eipp.log.xz``.

What cannot be fixed afterwards is left to the Dockerfile (docs/reproducible.md): an
initrd whose cpio carries the build's times needs ``ARG SOURCE_DATE_EPOCH`` before the
step that installs the kernel. The tar output, the image as it is, keeps everything.

Host tools: none.
"""

from __future__ import annotations

from oci2disk.rootfs.identity import IdentityEdits, plain_file
from oci2disk.rootfs.model import ExtraFile, Tree

LOGS = (
    "var/log/alternatives.log",
    "var/log/apt/history.log",
    "var/log/apt/term.log",
    "var/log/bootstrap.log",
    "var/log/dpkg.log",
)
CACHES = (
    "var/cache/apt/pkgcache.bin",
    "var/cache/apt/srcpkgcache.bin",
    "var/cache/ldconfig/aux-cache",
    "var/log/apt/eipp.log.xz",
)


def build_noise(tree: Tree) -> IdentityEdits:
    """The edits that take the build's clock out of ``tree`` (see the module's text)."""
    files: list[ExtraFile] = []
    for path in LOGS:
        entry = tree.lookup(path)
        if plain_file(entry) and entry is not None and entry.size:
            files.append(ExtraFile(path, b"", mode=entry.mode, uid=entry.uid, gid=entry.gid))
    remove = [path for path in CACHES if plain_file(tree.lookup(path))]
    return IdentityEdits(files=tuple(files), remove=tuple(remove))
