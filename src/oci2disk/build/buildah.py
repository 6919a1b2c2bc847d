"""buildah backend: daemonless builds through buildah's command line.

The recipe's Dockerfile is built with ``--isolation chroot`` (no runc, no cgroups, no
network namespace: it works inside containers and CI sandboxes) into containers-storage
(the vfs driver when not root, see ``oci.transports.storage_env``); the result is then
copied out as an OCI layout with skopeo. Build args, target stage and platform work as
with the Docker backend; a foreign platform runs its RUN steps through qemu-user binfmt.

Base images in loopback registries (``FROM 127.0.0.1:5000/debian:bookworm``) are pulled
first with ``--tls-verify=false``, as the Docker Engine treats such registries as
insecure by itself; every other registry keeps TLS verification.

Host tools: buildah, skopeo; qemu-user-static and binfmt-support for foreign platforms.
"""

from __future__ import annotations

import logging
import os
import re
import subprocess
import tempfile
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path

from oci2disk import run
from oci2disk.build.spec import BuilderKind, BuildSpec
from oci2disk.errors import BuildError, CommandError, Oci2DiskError
from oci2disk.oci import transports
from oci2disk.oci.layout import OciImage, open_layout
from oci2disk.refs import ImageRef, Transport, is_loopback_registry

log = logging.getLogger("oci2disk.build")

STEP_RE = re.compile(r"^STEP \d+(?:/\d+)?: ")
TAIL = 20
LOG_KEEP = 200
BASE_HINT = (
    "buildah does not see the Docker Engine's images: put the base image where buildah "
    "finds it (`oci2disk bootstrap SUITE --to containers-storage:NAME:TAG`, or a registry: "
    "`--to docker://127.0.0.1:PORT/NAME:TAG`), or build with --builder docker"
)


def available() -> bool:
    try:
        run.which("buildah")
    except Oci2DiskError:
        return False
    return True


def build(spec: BuildSpec, tag: str, *, on_line: Callable[[str], None] | None = None) -> str:
    """Build ``spec`` into containers-storage as ``tag``; return the image id.

    On failure the error names the failing step and carries the log tail.
    """
    assert spec.dockerfile is not None
    if spec.network == "none":
        raise BuildError(
            "build.network = 'none' needs a network namespace, and buildah's chroot "
            "isolation runs RUN steps in the host's network",
            hint="use --builder docker for this recipe, or set build.network = 'host'",
        )
    env = transports.storage_env()
    for base in loopback_bases(spec):
        _pull(base, spec.platform, env)
    previous = _image_id(tag, env)
    with tempfile.TemporaryDirectory(prefix="oci2disk-buildah-") as tmp:
        image_id = _build(spec, tag, env, Path(tmp) / "iid", on_line)
    if previous and previous != image_id:
        # The tag moved on; with vfs every image is a whole copy, so do not keep the old one.
        run.run(["buildah", "rmi", previous], env=env, check=False)
    return image_id


def _image_id(name: str, env: Mapping[str, str]) -> str | None:
    proc = run.run(
        ["buildah", "inspect", "--type", "image", "--format", "{{.FromImageID}}", name],
        env=env,
        check=False,
        parsed=True,
    )
    text = proc.stdout.decode().strip() if proc.returncode == 0 else ""
    return text.removeprefix("sha256:") or None


def _build(
    spec: BuildSpec,
    tag: str,
    env: Mapping[str, str],
    iidfile: Path,
    on_line: Callable[[str], None] | None,
) -> str:
    assert spec.dockerfile is not None
    argv = [
        "buildah", "build",
        "--isolation", "chroot",
        "--network", "host",
        "--pull=false",  # pull a base image only when storage lacks it, as docker's pull=False
        "--file", os.fspath(spec.dockerfile),
        "--tag", tag,
        "--iidfile", os.fspath(iidfile),
    ]  # fmt: skip
    for key, value in sorted(spec.args.items()):
        argv += ["--build-arg", f"{key}={value}"]
    if spec.target:
        argv += ["--target", spec.target]
    if spec.platform:
        argv += ["--platform", spec.platform]
    argv.append(os.fspath(spec.context))
    log.info("buildah build %s -> %s", spec.dockerfile, tag)
    _follow(argv, env, on_line)
    try:
        image_id = iidfile.read_text().strip()
    except FileNotFoundError:
        raise BuildError("buildah build ended without writing the image id") from None
    return image_id.removeprefix("sha256:")


def _follow(argv: list[str], env: Mapping[str, str], on_line: Callable[[str], None] | None) -> None:
    proc = run.start(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env)
    assert proc.stdout is not None
    lines: list[str] = []
    step = ""
    try:
        for raw in proc.stdout:
            line = raw.decode("utf-8", "replace").rstrip()
            if not line.strip():
                continue
            if STEP_RE.match(line):
                step = line
            lines.append(line)
            del lines[:-LOG_KEEP]
            if on_line:
                on_line(line)
        returncode = proc.wait()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stdout.close()
        if proc.stderr is not None:
            proc.stderr.close()
    if returncode != 0:
        tail = "\n".join(lines[-TAIL:])
        where = f"failed at {step}" if step else "failed before its first step"
        hint = "fix the failing Dockerfile step; run with -v to see the whole build log"
        if _base_missing(tail):
            hint = BASE_HINT
        raise BuildError(f"buildah build {where} (exit code {returncode})\n{tail}", hint=hint)


def _base_missing(tail: str) -> bool:
    return any(
        text in tail
        for text in (
            "initializing source docker://",
            "pinging container registry",
            "short-name resolution",
            "did not resolve to an alias",
            "image not known",
        )
    )


def _pull(name: str, platform: str | None, env: Mapping[str, str]) -> None:
    """Pull a base image from a loopback registry (plain HTTP) unless storage has it."""
    ref = ImageRef(Transport.DOCKER, *_name_and_tag(name))
    argv = ["buildah", "pull", "--quiet", "--policy", "missing", "--tls-verify=false"]
    if platform:
        argv += ["--platform", platform]
    argv.append(f"docker://{ref.image_name}")
    log.info("buildah pull %s (loopback registry, plain HTTP)", ref.image_name)
    try:
        run.run(argv, env=env, what=f"could not pull the base image {ref.image_name}")
    except CommandError as exc:
        raise BuildError(
            exc.message, hint=f"check that the registry at {ref.registry} runs and has the image"
        ) from None


def _name_and_tag(name: str) -> tuple[str, str | None]:
    if "@" in name:
        return name, None
    head, colon, tail = name.rpartition(":")
    if colon and "/" not in tail:
        return head, tail
    return name, "latest"


def export(image_id: str, layout: Path) -> OciImage:
    """Copy a built image out of containers-storage into an OCI layout."""
    run.run(
        ["skopeo", "copy", "--quiet", f"containers-storage:{image_id}", f"oci:{os.fspath(layout)}"],
        env=transports.storage_env(),
        what=f"could not copy image {image_id[:12]} out of containers-storage",
        hint=transports.STORAGE_HINT,
    )
    return open_layout(layout, None)


# ---------------------------------------------------------------- FROM lines

_ARG_RE = re.compile(r"\$(?:\{(\w+)(?::?[-+][^}]*)?\}|(\w+))")


def loopback_bases(spec: BuildSpec) -> list[str]:
    """Base images of the Dockerfile that live in a loopback registry."""
    assert spec.dockerfile is not None
    text = spec.dockerfile.read_text(errors="replace")
    return [
        name
        for name in base_images(text, spec.args)
        if is_loopback_registry(ImageRef(Transport.DOCKER, name).registry)
    ]


def base_images(dockerfile: str, build_args: Mapping[str, str]) -> list[str]:
    """The images named by FROM, with global ARGs (and build args) substituted.

    Stages that start FROM an earlier stage, ``scratch`` and names that still hold an
    unknown variable are left out.
    """
    global_args: dict[str, str] = {}
    stages: set[str] = set()
    found: list[str] = []
    seen_from = False
    for instruction in _instructions(dockerfile):
        keyword, _, rest = instruction.partition(" ")
        keyword = keyword.upper()
        if keyword == "ARG" and not seen_from:
            for item in rest.split():
                key, eq, default = item.partition("=")
                value = build_args.get(key, default.strip("\"'") if eq else "")
                global_args[key] = value
        elif keyword == "FROM":
            seen_from = True
            words = [w for w in rest.split() if not w.startswith("--")]
            if not words:
                continue
            name = _substitute(words[0], global_args)
            if len(words) >= 3 and words[1].lower() == "as":
                stages.add(words[2].lower())
            if name is None or name.lower() in stages or name == "scratch":
                continue
            if name not in found:
                found.append(name)
    return found


def _substitute(text: str, values: Mapping[str, str]) -> str | None:
    missing = False

    def one(match: re.Match[str]) -> str:
        nonlocal missing
        key = match.group(1) or match.group(2)
        if key not in values:
            missing = True
            return ""
        return values[key]

    result = _ARG_RE.sub(one, text)
    return None if missing or not result else result


def _instructions(dockerfile: str) -> Iterator[str]:
    """Instructions with line continuations joined and comments dropped."""
    current = ""
    for line in dockerfile.splitlines():
        stripped = line.strip()
        if stripped.startswith("#") and not current:
            continue
        if stripped.endswith("\\"):
            current += stripped[:-1] + " "
            continue
        current += stripped
        if current.strip():
            yield current.strip()
        current = ""
    if current.strip():
        yield current.strip()


class BuildahBuilder:
    kind = BuilderKind.BUILDAH

    def available(self) -> bool:
        return available()

    def build(
        self, spec: BuildSpec, tag: str, *, on_line: Callable[[str], None] | None = None
    ) -> str:
        return build(spec, tag, on_line=on_line)

    def export(self, tag: str, image_id: str, layout: Path) -> OciImage:
        return export(image_id, layout)

    def source(self, tag: str) -> str:
        return f"containers-storage:localhost/{tag}"


BUILDER = BuildahBuilder()
