"""The transports that need a helper program: registries and buildah/podman storage.

``docker://REGISTRY/NAME:TAG`` is copied with skopeo into an OCI layout (or, without
skopeo, pulled by the Docker Engine and saved); ``containers-storage:NAME:TAG`` is copied
with skopeo out of buildah's and podman's storage. ``rootfs:FILE[:CONFIG]`` wraps a flat
tarball, with the Env/Cmd/... of an optional image config JSON. ``push_layout`` goes the
other way, for ``oci2disk bootstrap --to docker://...`` and ``--to containers-storage:``.

Loopback registries (localhost, 127.0.0.0/8, ::1) are spoken to over plain HTTP, as the
Docker Engine does without being told; every other registry keeps TLS verification.

Host tools: skopeo; dockerd only when skopeo is missing.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from oci2disk import engine, run
from oci2disk.errors import CommandError, ImageError, Oci2DiskError, ToolMissingError
from oci2disk.oci.layout import OciImage, Platform, layout_from_rootfs_tar, open_layout
from oci2disk.refs import ImageRef, Transport, is_loopback_registry

log = logging.getLogger("oci2disk.transports")

STORAGE_HINT = (
    "`buildah images` (as the same user) lists what the storage holds; rootless storage is "
    "per user, and oci2disk uses the vfs driver for it unless STORAGE_DRIVER says otherwise"
)


def storage_env() -> dict[str, str]:
    """Environment for buildah and skopeo so both see the same containers-storage.

    Rootless, the vfs driver works everywhere (no fuse-overlayfs, no kernel overlay in
    a user namespace needed); an explicit STORAGE_DRIVER is kept.
    """
    env: dict[str, str] = {}
    if os.geteuid() != 0 and not os.environ.get("STORAGE_DRIVER"):
        env["STORAGE_DRIVER"] = "vfs"
    return env


def tls_flag(option: str, registry: str) -> list[str]:
    """``--{option}=false`` for a loopback registry, nothing otherwise."""
    return [f"--{option}=false"] if is_loopback_registry(registry) else []


def platform_flags(platform: Platform | None) -> list[str]:
    if platform is None:
        return []
    flags = ["--override-os", platform.os, "--override-arch", platform.architecture]
    if platform.variant:
        flags += ["--override-variant", platform.variant]
    return flags


def check_platform(image: OciImage, platform: Platform | None, where: str) -> OciImage:
    """The image is for ``platform``, or an error naming both."""
    if platform is not None and not image.config.platform.matches(platform):
        raise ImageError(
            f"{where} is an image for {image.config.platform}, not {platform}",
            hint=f"name an image built for {platform}, or leave out --platform",
        )
    return image


def from_registry(ref: ImageRef, workdir: Path, platform: Platform | None) -> OciImage:
    """``docker://REGISTRY/NAME:TAG`` as an OCI layout in ``workdir/image``."""
    dest = workdir / "image"
    try:
        run.which("skopeo")
    except ToolMissingError:
        return _pull_with_engine(ref, dest, platform)
    argv = [
        "skopeo", "copy", "--quiet",
        *tls_flag("src-tls-verify", ref.registry),
        *platform_flags(platform),
        str(ref), f"oci:{os.fspath(dest)}",
    ]  # fmt: skip
    log.info("skopeo copy %s", ref)
    try:
        run.run(argv, parsed=True, what=f"could not copy {ref} from its registry")
    except CommandError as exc:
        raise _registry_error(ref, exc) from None
    return check_platform(open_layout(dest, None), platform, str(ref))


def connection_hint(text: str, registry: str) -> str | None:
    """What to do when skopeo could not talk to ``registry`` at all (pulls and pushes)."""
    if "connection refused" in text or "no such host" in text or "i/o timeout" in text:
        return f"no registry answers at {registry}; check the address and that it runs"
    if "server gave HTTP response to HTTPS client" in text:
        return (
            f"{registry} speaks plain HTTP; mark it insecure in "
            "/etc/containers/registries.conf ([[registry]] location=... insecure=true)"
        )
    return None


def _registry_error(ref: ImageRef, exc: CommandError) -> Oci2DiskError:
    text = exc.stderr_tail
    registry = ref.registry or "docker.io"
    if "manifest unknown" in text or "name unknown" in text or "not found" in text:
        hint = f"the registry {registry} has no image {ref.image_name}; check name and tag"
    elif connected := connection_hint(text, registry):
        hint = connected
    elif "no image found in manifest list" in text or "no matching manifest" in text:
        hint = "the image has no variant for this platform; pass --platform OS/ARCH"
    else:
        hint = "check the reference and that the registry is reachable"
    return ImageError(exc.message, hint=hint)


def _pull_with_engine(ref: ImageRef, dest: Path, platform: Platform | None) -> OciImage:
    api = engine.client()
    name = ref.image_name
    log.info("docker pull %s (skopeo is not installed)", name)
    try:
        repository, _, tag = name.rpartition(":") if ref.tag else (name, "", "")
        api.pull(repository, tag=tag or None, platform=str(platform) if platform else None)
    except Exception as exc:
        raise ImageError(
            f"the Docker Engine could not pull {name}: {_last_line(exc)}",
            hint="install skopeo (Debian package skopeo), or check the registry",
        ) from None
    return check_platform(engine.save_to_layout(name, dest), platform, str(ref))


def from_containers_storage(ref: ImageRef, workdir: Path, platform: Platform | None) -> OciImage:
    """``containers-storage:NAME:TAG`` (buildah/podman) as an OCI layout in ``workdir``.

    A short name is looked up as containers-image spells it (``docker.io/library/NAME``)
    and then as buildah and podman name what they build (``localhost/NAME``).
    """
    dest = workdir / "image"
    names = [ref.image_name]
    if not ref.registry and not ref.name.startswith("localhost/"):
        names.append(f"localhost/{ref.image_name}")
    last: CommandError | None = None
    for name in names:
        argv = ["skopeo", "copy", "--quiet", f"containers-storage:{name}", f"oci:{os.fspath(dest)}"]
        try:
            run.run(
                argv,
                env=storage_env(),
                parsed=True,
                what=f"could not copy {ref} out of containers-storage",
            )
        except CommandError as exc:
            if "does not resolve to an image ID" not in exc.stderr_tail:
                raise ImageError(exc.message, hint=STORAGE_HINT) from None
            last = exc
            continue
        return check_platform(open_layout(dest, None), platform, str(ref))
    assert last is not None
    raise ImageError(
        f"containers-storage has no image {ref.image_name} (looked for {' and '.join(names)})",
        hint=STORAGE_HINT,
    )


def push_layout(layout: Path, tag: str | None, dest: ImageRef) -> None:
    """Copy the image ``tag`` of an OCI layout to a registry or to containers-storage."""
    source = f"oci:{os.fspath(layout)}" + (f":{tag}" if tag else "")
    if dest.transport is Transport.DOCKER:
        target = str(dest)
        flags = tls_flag("dest-tls-verify", dest.registry)
        env: Mapping[str, str] = {}
    elif dest.transport is Transport.CONTAINERS_STORAGE:
        # buildah and podman find their own images by short name under localhost/.
        name = dest.image_name if dest.registry else f"localhost/{dest.image_name}"
        target, flags, env = f"containers-storage:{name}", [], storage_env()
    else:  # pragma: no cover - callers pass only these two
        raise ImageError(f"cannot push to {dest.transport.value}:")
    log.info("skopeo copy %s %s", source, target)
    run.run(
        ["skopeo", "copy", "--quiet", *flags, source, target],
        env=env,
        what=f"could not copy the image to {dest}",
        hint="check that the registry runs and accepts pushes"
        if dest.transport is Transport.DOCKER
        else STORAGE_HINT,
    )


def from_rootfs(ref: ImageRef, workdir: Path, platform: Platform | None) -> OciImage:
    """``rootfs:FILE[:CONFIG]``: a flat tarball (mmdebstrap, debootstrap + tar) as an image.

    CONFIG is a JSON file: a whole OCI/Docker image config (its ``config`` section and
    ``architecture``/``os`` are used) or just the ``config`` section (Env, Cmd, ...).
    """
    if not ref.path.is_file():
        raise ImageError(f"{ref}: {ref.path} is not a file")
    config: dict[str, Any] | None = None
    if ref.config is not None:
        config, config_platform = _read_config(Path(ref.config))
        if platform and config_platform and not config_platform.matches(platform):
            raise ImageError(
                f"{ref.config} says the rootfs is for {config_platform}, not {platform}",
                hint="fix the config's architecture or leave out --platform",
            )
        platform = platform or config_platform
    return layout_from_rootfs_tar(
        ref.path, workdir / "image", None, platform=platform, config=config
    )


def _read_config(path: Path) -> tuple[dict[str, Any], Platform | None]:
    try:
        data = json.loads(path.read_bytes())
    except FileNotFoundError:
        raise ImageError(f"image config {path} does not exist") from None
    except (OSError, ValueError) as exc:
        raise ImageError(f"image config {path} is not readable JSON ({exc})") from None
    if not isinstance(data, dict):
        raise ImageError(f"image config {path} is not a JSON object")
    if "config" in data or "architecture" in data or "rootfs" in data:
        section = data.get("config") or {}
        if not isinstance(section, dict):
            raise ImageError(f"image config {path}: config is not a JSON object")
        platform = None
        if data.get("architecture"):
            platform = Platform(
                str(data.get("os") or "linux"),
                str(data["architecture"]),
                str(data.get("variant") or ""),
            )
        return section, platform
    return data, None


def _last_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return lines[-1] if lines else type(exc).__name__
