"""What makes an image one machine's rather than everyone's, and how to take it out.

Many Dockerfiles leave a machine-id, SSH host keys and a random seed in the image, so
every VM booted from one disk would share them. Like virt-sysprep's ``machine-id``,
``ssh-hostkeys`` and ``random-seed`` operations, but in the rootfs stream and rootless:

- ``/etc/machine-id`` is emptied (systemd then makes a new one at the first boot);
  ``/var/lib/dbus/machine-id`` as a file of its own is removed (D-Bus reads
  /etc/machine-id when it is missing);
- SSH host keys (``/etc/ssh/ssh_host_*``) are removed. Where the image's ssh.service
  would fail without them (Debian and Ubuntu have no key generator unit), a drop-in
  runs ``ssh-keygen -A`` before the unit's own checks, so sshd comes up with new keys;
- the saved random seed (``/var/lib/systemd/random-seed``, ``/var/lib/urandom/random-seed``)
  is removed.

Host tools: none.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass

from oci2disk.rootfs.model import Entry, ExtraFile, Kind, Tree

log = logging.getLogger("oci2disk.identity")

RANDOM_SEEDS = ("var/lib/systemd/random-seed", "var/lib/urandom/random-seed")
SSH_UNITS = ("usr/lib/systemd/system/ssh.service", "lib/systemd/system/ssh.service")
SSH_DROPIN_DIR = "etc/systemd/system/ssh.service.d"
SSH_DROPIN = f"{SSH_DROPIN_DIR}/oci2disk-host-keys.conf"
# Units that make host keys at boot by themselves (Fedora, openSUSE, Arch).
KEYGEN_UNITS = (
    "usr/lib/systemd/system/sshd-keygen@.service",
    "usr/lib/systemd/system/sshdgenkeys.service",
)
_HOST_KEY = re.compile(r"^ssh_host_.*_key(\.pub)?$")


@dataclass(frozen=True)
class IdentityEdits:
    """The changes that make an image everyone's; ``paths`` lists them for the manifest."""

    files: tuple[ExtraFile, ...] = ()
    dirs: tuple[str, ...] = ()
    remove: tuple[str, ...] = ()

    @property
    def paths(self) -> tuple[str, ...]:
        return tuple(sorted({*(f.path for f in self.files), *self.dirs, *self.remove}))

    def __bool__(self) -> bool:
        return bool(self.files or self.dirs or self.remove)

    def __add__(self, other: IdentityEdits) -> IdentityEdits:
        return IdentityEdits(
            self.files + other.files, self.dirs + other.dirs, self.remove + other.remove
        )


def identity_edits(tree: Tree) -> IdentityEdits:
    """What to change in ``tree`` so that each machine booted from it is its own."""
    files: list[ExtraFile] = []
    dirs: list[str] = []
    remove: list[str] = []

    machine_id = tree.lookup("etc/machine-id")
    if plain_file(machine_id) and machine_id is not None and machine_id.size:
        files.append(ExtraFile("etc/machine-id", b"", mode=machine_id.mode, uid=0, gid=0))
    dbus_id = tree.lookup("var/lib/dbus/machine-id")
    if plain_file(dbus_id):
        remove.append("var/lib/dbus/machine-id")
    remove += [path for path in RANDOM_SEEDS if plain_file(tree.lookup(path))]

    ssh = tree.lookup("etc/ssh")
    keys: list[str] = []
    if ssh is not None and ssh.kind is Kind.DIR:
        keys = [
            e.path
            for e in tree.entries()
            if e.path.startswith("etc/ssh/")
            and "/" not in e.path[len("etc/ssh/") :]
            and _HOST_KEY.match(e.path[len("etc/ssh/") :])
            and plain_file(e)
        ]
    if keys:
        remove += keys
        dropin = _ssh_dropin(tree)
        if dropin is not None:
            if tree.lookup(SSH_DROPIN_DIR) is None:
                dirs.append(SSH_DROPIN_DIR)
            files.append(ExtraFile(SSH_DROPIN, dropin))
    return IdentityEdits(tuple(files), tuple(dirs), tuple(remove))


def plain_file(entry: Entry | None) -> bool:
    """A regular file with one name (removing one name of a hard-link set, or
    changing it, would change the others)."""
    return entry is not None and entry.kind is Kind.FILE and not entry.link_group


def _ssh_dropin(tree: Tree) -> bytes | None:
    """A drop-in that makes host keys before ssh.service's own ExecStartPre checks."""
    if any(tree.lookup(path) is not None for path in KEYGEN_UNITS):
        return None
    unit = next((path for path in SSH_UNITS if tree.lookup(path) is not None), None)
    if unit is None:
        return None
    if tree.lookup("etc/systemd/system") is None:
        return None
    with tree.open(unit) as f:
        text = f.read().decode("utf-8", "replace")
    checks = [line for line in text.splitlines() if line.startswith("ExecStartPre=")]
    # "ExecStartPre=" (empty) resets the list; then keys first, the unit's checks after.
    lines = ["[Service]", "ExecStartPre=", "ExecStartPre=/usr/bin/ssh-keygen -A", *checks]
    return (
        "# Written by oci2disk: the image's SSH host keys were removed so that every\n"
        "# machine booted from it makes its own at the first boot.\n" + "\n".join(lines) + "\n"
    ).encode()
