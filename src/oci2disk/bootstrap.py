"""Base images without a registry: a Debian suite from a mirror, via mmdebstrap.

The result goes where a Dockerfile's FROM can use it: the Docker Engine
(``docker-daemon:NAME:TAG``), buildah's and podman's storage
(``containers-storage:NAME:TAG``) or a registry (``docker://REGISTRY/NAME:TAG``); or
into an OCI layout (``oci:DIR:TAG``). A foreign architecture (``--platform linux/arm64``)
runs its maintainer scripts through qemu-user binfmt.
Host tools: mmdebstrap; dockerd for docker-daemon, skopeo for docker:// and
containers-storage destinations; qemu-user-static, binfmt-support and arch-test for
foreign architectures.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from oci2disk import engine, run
from oci2disk.arch import Arch
from oci2disk.errors import UsageError
from oci2disk.oci import transports
from oci2disk.oci.layout import Platform, host_platform, layout_from_rootfs_tar
from oci2disk.refs import ImageRef, Transport

log = logging.getLogger("oci2disk.bootstrap")

SUITES = ("bookworm", "trixie", "sid", "bullseye")
DEFAULT_MIRROR = "http://deb.debian.org/debian"
IMAGE_ENV = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
IMAGE_CONFIG = {"Env": [IMAGE_ENV], "Cmd": ["/bin/bash"]}
DESTINATIONS = (
    Transport.DOCKER_DAEMON,
    Transport.OCI,
    Transport.DOCKER,
    Transport.CONTAINERS_STORAGE,
)


@dataclass(frozen=True)
class BootstrapSpec:
    suite: str
    dest: ImageRef
    mirror: str = DEFAULT_MIRROR
    variant: str = "minbase"
    include: tuple[str, ...] = ()
    platform: Platform | None = None


@dataclass(frozen=True)
class BootstrapResult:
    dest: ImageRef
    image_id: str
    tarball_bytes: int


def bootstrap(spec: BootstrapSpec, workdir: Path) -> BootstrapResult:
    if spec.suite not in SUITES:
        raise UsageError(f"unknown suite {spec.suite!r}", hint=f"suites: {', '.join(SUITES)}")
    if spec.dest.transport not in DESTINATIONS:
        raise UsageError(
            f"bootstrap cannot write to {spec.dest.transport.value}:",
            hint="use --to docker-daemon:NAME:TAG or --to oci:DIR:TAG, "
            "or --to docker://REGISTRY/NAME:TAG or --to containers-storage:NAME:TAG",
        )
    platform = spec.platform or host_platform()
    known = Arch.lookup(platform.architecture)
    if known is None:
        raise UsageError(f"no Debian architecture for platform {platform}")
    arch = known.debian
    tarball = workdir / "rootfs.tar"
    argv = [
        "mmdebstrap",
        f"--variant={spec.variant}",
        f"--architectures={arch}",
        "--format=tar",
    ]
    if spec.include:
        argv.append("--include=" + ",".join(spec.include))
    argv += [spec.suite, str(tarball), spec.mirror]
    log.info("mmdebstrap %s (%s, %s) from %s", spec.suite, spec.variant, arch, spec.mirror)
    hint = f"check that {spec.mirror} is reachable and the suite name is right"
    if platform.architecture != host_platform().architecture:
        hint += (
            f"; building for {arch} on this machine needs qemu-user-static, binfmt-support "
            "and arch-test installed and binfmt_misc mounted (./setup.sh does both)"
        )
    run.run(argv, what=f"mmdebstrap of {spec.suite} failed", hint=hint)
    size = tarball.stat().st_size
    if spec.dest.transport is Transport.DOCKER_DAEMON:
        image_id = engine.import_rootfs(
            tarball,
            spec.dest.name,
            spec.dest.tag or "latest",
            changes=[f"ENV {IMAGE_ENV}", 'CMD ["/bin/bash"]'],
        )
    elif spec.dest.transport is Transport.OCI:
        image = layout_from_rootfs_tar(
            tarball,
            spec.dest.path,
            spec.dest.tag or spec.suite,
            platform=platform,
            config=IMAGE_CONFIG,
        )
        image_id = image.digest
    else:
        layout = workdir / "layout"
        image = layout_from_rootfs_tar(
            tarball, layout, spec.suite, platform=platform, config=IMAGE_CONFIG
        )
        tarball.unlink()  # the layout holds the only copy the push needs
        log.info("copying the image to %s", spec.dest)
        transports.push_layout(layout, spec.suite, spec.dest)
        image_id = image.digest
    return BootstrapResult(spec.dest, image_id, size)
