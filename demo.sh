#!/usr/bin/env bash
# The main job, end to end on a fresh machine: set up the host, bootstrap a Debian base
# from the mirror, build recipes/debian-qemu into raw + qcow2, verify it, boot it under QEMU.
set -euo pipefail
cd "$(dirname "$0")"
./setup.sh
O=.venv/bin/oci2disk
$O bootstrap bookworm --to docker-daemon:oci2disk/debian:bookworm
$O build recipes/debian-qemu -o out/debian-qemu
$O verify out/debian-qemu/disk.qcow2 --against docker-daemon:oci2disk-recipe/debian-qemu:latest
# the disk boots on its own: SeaBIOS -> the GRUB oci2disk wrote into it (no -kernel)
$O boot out/debian-qemu/disk.qcow2 --firmware bios --expect 'login:' --timeout 600
