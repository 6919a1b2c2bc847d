"""Disks, initramfs and dirs made from one image do not share the image's identity:
machine-id emptied, SSH host keys and random seed gone, listed in the manifest;
the tar stays the image as it is, and --keep-identity keeps everything."""

from __future__ import annotations

import json
from pathlib import Path

from clikit import oci2disk
from layerkit import TAG, directory, file, make_image
from oci2disk.diskimage import extfs
from oci2disk.recipe import Format
from oci2disk.rootfs.archives import TarTree
from outputkit import convert_to, image_of

SSH_UNIT = b"[Service]\nExecStartPre=/usr/sbin/sshd -t\nExecStart=/usr/sbin/sshd -D\n"
MEMBERS = [
    directory("etc/ssh"),
    directory("etc/systemd/system"),
    file("etc/machine-id", b"0123456789abcdef0123456789abcdef\n", mode=0o444),
    file("etc/ssh/ssh_host_ed25519_key", b"PRIVATE", mode=0o600),
    file("etc/ssh/ssh_host_ed25519_key.pub", b"PUBLIC"),
    file("etc/ssh/sshd_config", b"PermitRootLogin no\n"),
    file("lib/systemd/system/ssh.service", SSH_UNIT),
    file("var/lib/systemd/random-seed", b"\x01" * 512, mode=0o600),
    file("var/lib/dbus/machine-id", b"0123456789abcdef0123456789abcdef\n"),
]
TAKEN = {
    "etc/machine-id",
    "etc/ssh/ssh_host_ed25519_key",
    "etc/ssh/ssh_host_ed25519_key.pub",
    "etc/systemd/system/ssh.service.d",
    "etc/systemd/system/ssh.service.d/oci2disk-host-keys.conf",
    "var/lib/dbus/machine-id",
    "var/lib/systemd/random-seed",
}


def test_a_dir_output_is_everyones_and_the_tar_stays_the_image(tmp_path: Path) -> None:
    image = image_of(tmp_path, MEMBERS)
    root, tar = tmp_path / "nfsroot", tmp_path / "rootfs.tar"
    result = convert_to(image, {Format.DIR: root, Format.TAR: tar})
    assert set(result.identity) == TAKEN
    assert (root / "etc/machine-id").read_bytes() == b""
    assert not (root / "etc/ssh/ssh_host_ed25519_key").exists()
    assert not (root / "var/lib/systemd/random-seed").exists()
    assert (root / "etc/ssh/sshd_config").is_file()
    dropin = (root / "etc/systemd/system/ssh.service.d/oci2disk-host-keys.conf").read_text()
    assert "ssh-keygen -A" in dropin
    paths = {e.path for e in TarTree(tar).entries()}
    assert "etc/ssh/ssh_host_ed25519_key" in paths and "var/lib/systemd/random-seed" in paths


def test_a_disk_lists_what_it_took_out_and_keep_identity_keeps_it(tmp_path: Path) -> None:
    make_image(tmp_path / "layout", [MEMBERS])
    source = f"oci:{tmp_path / 'layout'}:{TAG}"
    for name, extra in (("plain.img", []), ("kept.img", ["--keep-identity"])):
        result = oci2disk(
            "--json", "convert", source, "-f", "fs", "-o", str(tmp_path / name), *extra
        )
        assert result.code == 0, result.stderr
        listed = set(json.loads(result.stdout)["identity"])
        with extfs.open_filesystem(tmp_path / name) as fs:
            machine_id = fs.lookup("etc/machine-id")
            host_key = fs.lookup("etc/ssh/ssh_host_ed25519_key")
        assert machine_id is not None
        if extra:
            assert listed == set() and machine_id.size == 33 and host_key is not None
        else:
            assert listed == TAKEN and machine_id.size == 0 and host_key is None


def test_verify_expects_the_same_edits(tmp_path: Path) -> None:
    make_image(tmp_path / "layout", [MEMBERS])
    source = f"oci:{tmp_path / 'layout'}:{TAG}"
    disk = tmp_path / "disk.img"
    assert oci2disk("-q", "convert", source, "-f", "fs", "-o", str(disk)).code == 0
    same = oci2disk("verify", str(disk), "--against", source)
    assert same.code == 0, same.stdout + same.stderr
    # the options say the identity was kept: the emptied machine-id is a difference
    kept = oci2disk("verify", str(disk), "--against", source, "--keep-identity")
    assert kept.code == 1 and "/etc/machine-id" in kept.stdout
    assert "/etc/ssh/ssh_host_ed25519_key" in kept.stdout
