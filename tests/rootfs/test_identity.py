"""Taking one machine's identity out of an image: machine-id, SSH host keys, random seed."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

from layerkit import directory, file, hardlink, make_image, symlink
from oci2disk.rootfs.flatten import flatten
from oci2disk.rootfs.identity import SSH_DROPIN, identity_edits

DEBIAN_SSH_UNIT = b"""[Unit]
Description=OpenBSD Secure Shell server

[Service]
ExecStartPre=/usr/sbin/sshd -t
ExecStart=/usr/sbin/sshd -D $SSHD_OPTS
"""

MACHINE = [
    directory("etc"),
    file("etc/machine-id", b"0123456789abcdef0123456789abcdef\n", mode=0o444),
    directory("etc/ssh"),
    file("etc/ssh/sshd_config", b"Port 22\n"),
    file("etc/ssh/ssh_host_ed25519_key", b"PRIVATE", mode=0o600),
    file("etc/ssh/ssh_host_ed25519_key.pub", b"PUBLIC"),
    directory("etc/systemd/system"),
    file("lib/systemd/system/ssh.service", DEBIAN_SSH_UNIT),
    file("var/lib/dbus/machine-id", b"0123456789abcdef0123456789abcdef\n"),
    file("var/lib/systemd/random-seed", b"\x01" * 512, mode=0o600),
]


def test_a_machines_identity_is_taken_out_and_sshd_makes_new_keys(tmp_path: Path) -> None:
    image = make_image(tmp_path / "oci", [MACHINE])
    with flatten(image, tmp_path / "work") as rootfs:
        edits = identity_edits(rootfs)
        assert edits.paths == (
            "etc/machine-id",
            "etc/ssh/ssh_host_ed25519_key",
            "etc/ssh/ssh_host_ed25519_key.pub",
            "etc/systemd/system/ssh.service.d",
            SSH_DROPIN,
            "var/lib/dbus/machine-id",
            "var/lib/systemd/random-seed",
        )
        view = rootfs.edited(files=edits.files, dirs=edits.dirs, remove=edits.remove)
        paths = [e.path for e in view.entries()]
        for gone in ("etc/ssh/ssh_host_ed25519_key", "var/lib/systemd/random-seed"):
            assert gone not in paths and view.lookup(gone) is None
        machine_id = view.lookup("etc/machine-id")
        assert machine_id is not None and (machine_id.size, machine_id.mode) == (0, 0o444)
        with view.open("etc/machine-id") as f:
            assert f.read() == b""
        with view.open(SSH_DROPIN) as f:
            dropin = f.read().decode()
        # Keys first, then Debian's own check (which fails without keys).
        assert dropin.index("ssh-keygen -A") < dropin.index("sshd -t")
        assert "ExecStartPre=\n" in dropin
        assert paths == sorted(paths, key=lambda p: [s.encode() for s in p.split("/")])
        # The canonical tar (what mke2fs, cpio and tar outputs are written from) agrees.
        out = io.BytesIO()
        view.write_tar(out)
        with tarfile.open(fileobj=io.BytesIO(out.getvalue())) as tar:
            names = [m.name.removeprefix("./").rstrip("/") or "." for m in tar]
        assert names == paths
        # The base rootfs is untouched: other outputs of the run may keep it.
        assert rootfs.lookup("etc/ssh/ssh_host_ed25519_key") is not None
        with rootfs.open("etc/machine-id") as f:
            assert f.read().startswith(b"0123")


def test_an_image_without_identity_is_left_alone(tmp_path: Path) -> None:
    image = make_image(
        tmp_path / "oci",
        [
            [
                directory("etc"),
                file("etc/machine-id", b""),  # already first-boot
                symlink("var/lib/dbus/machine-id", "/etc/machine-id"),
                file("etc/ssh/ssh_host_rsa_key", b"K"),
                hardlink("etc/ssh/ssh_host_rsa_key.pub", "etc/ssh/ssh_host_rsa_key"),
            ]
        ],
    )
    with flatten(image, tmp_path / "work") as rootfs:
        edits = identity_edits(rootfs)
        # An empty machine-id and a symlinked D-Bus id are already right; hard-linked keys
        # are left (removing one name would change the other), no unit to fix.
        assert not edits
        assert edits.paths == ()
