"""The ``squashfs`` output boots as the root filesystem: ``root=/dev/vda``, squashfs
and virtio from the initrd (Debian builds them as modules), under QEMU TCG."""

from __future__ import annotations

from pathlib import Path

import pytest

from bootkit import boot_until, busybox_base, debian_kernel, qemu, script
from layerkit import directory, file, make_image
from oci2disk.convert.cpio import write_cgz
from oci2disk.convert.options import SquashfsCompressor, SquashfsSpec
from oci2disk.convert.squashfs import write_squashfs
from oci2disk.recipe import InitramfsSpec
from oci2disk.rootfs.flatten import flatten

MARKER = "oci2disk-squashfs-root-ok"
MODULES = ("squashfs", "virtio_pci", "virtio_blk")

LOADER = """\
B=/bin/busybox
$B mount -t proc proc /proc
$B mount -t devtmpfs dev /dev
for m in $($B cat /modules/order); do $B insmod /modules/$m; done
root=$($B sed -n 's/.*root=\\([^ ]*\\).*/\\1/p' /proc/cmdline)
i=0
while [ ! -b "$root" ] && [ $i -lt 100 ]; do $B sleep 0.1; i=$((i+1)); done
$B mkdir -p /newroot
$B mount -t squashfs -o ro "$root" /newroot || $B sh
$B umount /proc
exec $B switch_root /newroot /sbin/init
"""

ROOT_INIT = f"""\
/bin/busybox mount -t proc proc /proc
/bin/busybox grep ' / ' /proc/mounts
if /bin/busybox grep -q '^/dev/vda / squashfs ro' /proc/mounts; then echo {MARKER}; fi
/bin/busybox poweroff -f
"""


@pytest.mark.slow
def test_the_kernel_boots_the_squashfs_as_root(tmp_path: Path) -> None:
    kernel = debian_kernel(tmp_path, MODULES)
    root = make_image(
        tmp_path / "root-layout",
        [[*busybox_base(), script("sbin/init", ROOT_INIT), directory("etc")]],
    )
    squashfs = tmp_path / "root.squashfs"
    with flatten(root, tmp_path / "f1", source_date_epoch=0) as rootfs:
        write_squashfs(rootfs.write_tar, squashfs, SquashfsSpec(SquashfsCompressor.ZSTD))
    loader = make_image(
        tmp_path / "loader-layout",
        [
            [
                *busybox_base(),
                script("init", LOADER),
                directory("modules"),
                file("modules/order", "\n".join(kernel.modules).encode() + b"\n"),
                *(file(f"modules/{name}", data) for name, data in kernel.modules.items()),
            ]
        ],
    )
    initrd = tmp_path / "loader.cgz"
    with flatten(loader, tmp_path / "f2") as rootfs:
        write_cgz(rootfs, initrd, InitramfsSpec(), mtime=0)
    argv = qemu(
        "-kernel",
        str(kernel.vmlinuz),
        "-initrd",
        str(initrd),
        "-append",
        "console=ttyS0 root=/dev/vda rootfstype=squashfs ro panic=-1",
        "-drive",
        f"file={squashfs},if=virtio,format=raw,readonly=on",
    )
    boot = boot_until(argv, MARKER, tmp_path / "console.log")
    print(f"squashfs root boot to the marker: {boot.seconds:.1f} s, {squashfs.stat().st_size} B")
