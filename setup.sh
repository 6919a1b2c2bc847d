#!/usr/bin/env bash
# Idempotent host setup for oci2disk on Debian bookworm (also used by CI):
#  - Debian packages, with e2fsprogs >= 1.47.1 from bookworm-backports
#  - the Python environment in .venv (from Debian's python3, so unprivileged users can run it)
#  - a running Docker Engine (there is no service manager: start dockerd and wait for it)
set -euo pipefail
cd "$(dirname "$0")"

SUDO=""
if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi

PACKAGES=(
  docker.io buildah umoci skopeo mmdebstrap
  qemu-utils qemu-system-x86 mtools fdisk cpio util-linux
  libarchive13 iptables ca-certificates debian-archive-keyring
  zstd pigz xz-utils isal lz4 python3-venv python3-dev attr libcap2-bin
  qemu-user-static binfmt-support arch-test qemu-system-arm
  grub-common grub-pc-bin grub-efi-amd64-bin dosfstools ovmf qemu-efi-aarch64 systemd-boot-efi
  squashfs-tools-ng xorriso busybox-static
)
# Test-only packages (./test.sh sets OCI2DISK_SETUP_TESTS=1): docker-compose runs the
# tests' registry container (pytest-docker), and the ssh:// engine test starts its own
# sshd on loopback. The ssh service the package would run is switched off below, so a
# machine set up for tests gets no server on port 22.
if [ "${OCI2DISK_SETUP_TESTS:-0}" = 1 ]; then
  PACKAGES+=(docker-compose openssh-server)
fi

need_apt=0
for p in "${PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || need_apt=1
done
have_e2fs=$(dpkg-query -W -f='${Version}' e2fsprogs 2>/dev/null || echo 0)
if ! dpkg --compare-versions "$have_e2fs" ge 1.47.1; then need_apt=1; fi

if [ "$need_apt" = 1 ]; then
  . /etc/os-release
  if [ "${VERSION_CODENAME:-}" = bookworm ] && ! grep -rqs "bookworm-backports" /etc/apt/sources.list /etc/apt/sources.list.d/; then
    echo "==> adding bookworm-backports (for e2fsprogs >= 1.47.1)"
    printf 'Types: deb\nURIs: http://deb.debian.org/debian\nSuites: bookworm-backports\nComponents: main\nSigned-By: /usr/share/keyrings/debian-archive-keyring.gpg\n' \
      | $SUDO tee /etc/apt/sources.list.d/oci2disk-backports.sources >/dev/null
  fi
  echo "==> installing Debian packages"
  $SUDO apt-get update -q
  e2fs="e2fsprogs"
  if [ "${VERSION_CODENAME:-}" = bookworm ]; then e2fs="e2fsprogs/bookworm-backports"; fi
  $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends \
    "${PACKAGES[@]}" "$e2fs"
  if [ "${OCI2DISK_SETUP_TESTS:-0}" = 1 ] && [ -d /run/systemd/system ]; then
    $SUDO systemctl disable --now ssh.service ssh.socket >/dev/null 2>&1 || true
  fi
fi

# Foreign-architecture builds (--platform linux/arm64) run RUN steps through qemu-user:
# binfmt_misc must be mounted and the qemu-aarch64 handler registered (the package's
# postinst cannot do that where binfmt_misc was not mounted at install time).
if [ ! -e /proc/sys/fs/binfmt_misc/status ]; then
  $SUDO mount -t binfmt_misc binfmt_misc /proc/sys/fs/binfmt_misc \
    || echo "warning: cannot mount binfmt_misc; --platform builds for other architectures will fail" >&2
fi
if [ -e /proc/sys/fs/binfmt_misc/status ] && [ ! -e /proc/sys/fs/binfmt_misc/qemu-aarch64 ]; then
  $SUDO update-binfmts --enable qemu-aarch64 \
    || echo "warning: cannot register qemu-aarch64 with binfmt_misc" >&2
fi

# An unprivileged user with subordinate ids, for the test that builds with rootless buildah.
if ! id oci2disk-builder >/dev/null 2>&1; then
  $SUDO useradd --create-home --shell /usr/sbin/nologin --comment "oci2disk rootless build tests" oci2disk-builder
fi
if ! grep -qs '^oci2disk-builder:' /etc/subuid || ! grep -qs '^oci2disk-builder:' /etc/subgid; then
  $SUDO usermod --add-subuids 1000000-1065535 --add-subgids 1000000-1065535 oci2disk-builder
fi

if [ ! -x .venv/bin/oci2disk ] || [ pyproject.toml -nt .venv/.installed ]; then
  echo "==> creating the Python environment in .venv"
  /usr/bin/python3 -m venv .venv
  .venv/bin/pip install -q --upgrade pip
  .venv/bin/pip install -q -e '.[dev]'
  touch .venv/.installed
fi

if ! timeout 10 docker info >/dev/null 2>&1; then
  echo "==> starting dockerd (log: /var/log/oci2disk-dockerd.log)"
  $SUDO sh -c 'nohup dockerd >/var/log/oci2disk-dockerd.log 2>&1 &'
  for _ in $(seq 1 60); do
    timeout 5 docker info >/dev/null 2>&1 && break
    sleep 1
  done
  if ! timeout 10 docker info >/dev/null 2>&1; then
    echo "error: dockerd did not start; see /var/log/oci2disk-dockerd.log" >&2
    tail -20 /var/log/oci2disk-dockerd.log >&2 || true
    exit 1
  fi
fi
echo "==> host ready: $(/usr/sbin/mke2fs -V 2>&1 | head -1), docker $(docker version --format '{{.Server.Version}}')"
