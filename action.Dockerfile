# The container the GitHub Action runs oci2disk in (see action.yml, docs/github-action.md).
#
# Hosted runners have Docker but an e2fsprogs too old for `mke2fs -d` with a tarball
# (1.47.0 on ubuntu-24.04) and no KVM, so oci2disk runs here: Debian bookworm with
# e2fsprogs from bookworm-backports, GRUB for the disks' bootloaders, QEMU and its
# firmware for the boot check (TCG), squashfs-tools-ng and xorriso, and skopeo/umoci.
# It talks to the runner's Docker Engine through the socket GitHub mounts.
#
#   docker build -f action.Dockerfile -t oci2disk-action .
#
# BASE is a build argument so that machines without Docker Hub can build it from a
# local Debian image; PIP_OPTIONS lets them install the Python dependencies from a
# wheel folder inside the context instead of PyPI.
ARG BASE=debian:bookworm
FROM ${BASE}

ARG PIP_OPTIONS=""
ENV DEBIAN_FRONTEND=noninteractive

RUN set -eux; \
    . /etc/os-release; \
    echo "deb http://deb.debian.org/debian ${VERSION_CODENAME}-backports main" \
        > /etc/apt/sources.list.d/backports.list; \
    apt-get update -q -o Acquire::Languages=none; \
    apt-get install -y -q --no-install-recommends \
        "e2fsprogs/${VERSION_CODENAME}-backports" \
        python3 python3-venv ca-certificates \
        libarchive13 fdisk cpio mtools dosfstools zstd pigz xz-utils lz4 isal util-linux \
        qemu-utils qemu-system-x86 qemu-system-arm ovmf qemu-efi-aarch64 \
        grub-common grub-pc-bin grub-efi-amd64-bin squashfs-tools-ng xorriso \
        skopeo umoci; \
    apt-get clean; \
    rm -rf /var/lib/apt/lists/*; \
    mke2fs -V 2>&1 | head -n1

COPY pyproject.toml README.md /opt/oci2disk/src/
COPY src /opt/oci2disk/src/src
# .action-wheels is optional (README.md makes the pattern match when it is absent)
COPY README.md .action-wheel[s] /opt/oci2disk/wheels/
RUN set -eux; \
    python3 -m venv /opt/oci2disk/venv; \
    /opt/oci2disk/venv/bin/pip install --no-cache-dir -q ${PIP_OPTIONS} /opt/oci2disk/src; \
    ln -s /opt/oci2disk/venv/bin/oci2disk /usr/local/bin/oci2disk; \
    oci2disk --version

ENTRYPOINT ["/opt/oci2disk/venv/bin/python", "-m", "oci2disk.action"]
