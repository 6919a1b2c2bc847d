"""With SOURCE_DATE_EPOCH set, the logs and caches that record the build's clock are
neutralised in disks, initramfs and dirs, listed in the manifest as build_noise, and
expected so by verify; without it, and in the tar, the image stays as it is."""

from __future__ import annotations

import json
from pathlib import Path

from clikit import oci2disk
from layerkit import TAG, directory, file, hardlink, make_image
from oci2disk.diskimage import extfs
from oci2disk.rootfs.archives import TarTree

EPOCH = "1700000000"
MEMBERS = [
    directory("var/log/apt"),
    directory("var/cache/ldconfig"),
    file("var/log/dpkg.log", b"2026-11-30 06:27:26 install base-files\n", mode=0o644),
    file("var/log/apt/term.log", b"Log started: 2026-11-30\n", mode=0o640, gid=4),
    file("var/log/alternatives.log", b"update-alternatives 2026-11-30 06:27:30\n"),
    file("var/cache/ldconfig/aux-cache", b"\x01inode and time\x02" * 40, mode=0o600),
    file("var/log/syslog", b"kept: not build noise\n"),
    file("var/cache/apt/pkgcache.bin", b"keep me: my other name is hard linked"),
    hardlink("var/cache/apt/pkgcache.again", "var/cache/apt/pkgcache.bin"),
]
NOISE = {
    "var/log/dpkg.log",
    "var/log/apt/term.log",
    "var/log/alternatives.log",
    "var/cache/ldconfig/aux-cache",
}


def test_a_reproducible_disk_has_the_build_noise_neutralised_and_listed(tmp_path: Path) -> None:
    make_image(tmp_path / "layout", [MEMBERS])
    source = f"oci:{tmp_path / 'layout'}:{TAG}"
    disk, tar = tmp_path / "disk.img", tmp_path / "rootfs.tar"
    env = {"SOURCE_DATE_EPOCH": EPOCH}
    result = oci2disk("--json", "convert", source, "-f", "fs", "-o", str(disk), env=env)
    assert result.code == 0, result.stderr
    assert set(json.loads(result.stdout)["build_noise"]) == NOISE
    with extfs.open_filesystem(disk) as fs:
        dpkg_log, term_log = fs.lookup("var/log/dpkg.log"), fs.lookup("var/log/apt/term.log")
        assert dpkg_log is not None and dpkg_log.size == 0 and dpkg_log.mode == 0o644
        assert term_log is not None and term_log.size == 0 and term_log.mode == 0o640
        assert term_log.gid == 4
        assert fs.lookup("var/cache/ldconfig/aux-cache") is None
        syslog, pkgcache = fs.lookup("var/log/syslog"), fs.lookup("var/cache/apt/pkgcache.bin")
        assert syslog is not None and syslog.size > 0
        assert pkgcache is not None and pkgcache.size > 0  # hard linked: left alone
    # verify, told the same epoch, expects exactly these edits
    same = oci2disk("verify", str(disk), "--against", source, env=env)
    assert same.code == 0, same.stdout + same.stderr
    # the tar is the image as it is
    result = oci2disk("--json", "convert", source, "-f", "tar", "-o", str(tar), env=env)
    assert result.code == 0, result.stderr
    assert json.loads(result.stdout)["build_noise"] == []
    entries = {e.path: e for e in TarTree(tar).entries()}
    assert entries["var/log/dpkg.log"].size > 0 and "var/cache/ldconfig/aux-cache" in entries


def test_without_an_epoch_nothing_is_touched(tmp_path: Path) -> None:
    make_image(tmp_path / "layout", [MEMBERS])
    source = f"oci:{tmp_path / 'layout'}:{TAG}"
    disk = tmp_path / "disk.img"
    result = oci2disk("--json", "convert", source, "-f", "fs", "-o", str(disk))
    assert result.code == 0, result.stderr
    assert json.loads(result.stdout)["build_noise"] == []
    with extfs.open_filesystem(disk) as fs:
        dpkg_log = fs.lookup("var/log/dpkg.log")
        assert dpkg_log is not None and dpkg_log.size > 0
        assert fs.lookup("var/cache/ldconfig/aux-cache") is not None
