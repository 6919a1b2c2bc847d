"""Push a run's outputs to an OCI registry (``--push REF``), in two shapes.

- **containerDisk**: the qcow2 (or raw) disk as ``/disk/NAME`` owned by 107:107 in a
  one-layer image, the shape KubeVirt boots (``containerDisk: image: REF``) and that
  ``docker pull`` / ``docker create`` take like any image.
- **OCI artifact**: one layer per artifact file (the file's bytes as they are, so each
  layer digest is the sha256 the run's manifest lists) plus the manifest JSON itself,
  an ``artifactType``, and the manifest's digests as annotations. ORAS, ``skopeo copy``
  and ``crane`` read it back.

Both are written as an OCI layout in a work folder and copied with ``skopeo copy``,
which asks the registry for every blob before it sends it: a blob already there (an
earlier or interrupted push, the same disk under another tag) is not sent again.
Nothing needs root. Credentials come from the usual files (``docker login`` /
``skopeo login`` write them): REGISTRY_AUTH_FILE, ``$DOCKER_CONFIG/config.json``,
containers' ``auth.json``, ``~/.docker/config.json`` (see :func:`auth_file`).
Loopback registries are spoken to over plain HTTP, as the Docker Engine does.

Host tools: skopeo.
"""

from __future__ import annotations

import enum
import json
import logging
import os
import re
import shutil
import tarfile
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from oci2disk import run
from oci2disk.bytestreams import HashingWriter, sha256_file
from oci2disk.errors import CommandError, Oci2DiskError, RefError
from oci2disk.oci.layout import (
    MT_OCI_LAYER,
    MT_OCI_LAYER_GZIP,
    MT_OCI_MANIFEST,
    Descriptor,
    LayoutWriter,
    Platform,
    canonical_json,
    remember_verified,
)
from oci2disk.oci.transports import connection_hint, tls_flag
from oci2disk.refs import ImageRef, Transport, parse_ref

log = logging.getLogger("oci2disk.publish")

KUBEVIRT_UID = 107  # the qemu user of KubeVirt's virt-launcher
DISK_DIR = "disk"
ARTIFACT_TYPE = "application/vnd.oci2disk.artifacts.v1"
MT_EMPTY = "application/vnd.oci.empty.v1+json"
MT_RUN_MANIFEST = "application/vnd.oci2disk.manifest.v1+json"
ANNOTATION_PREFIX = "io.oci2disk."
TITLE = "org.opencontainers.image.title"
CREATED = "org.opencontainers.image.created"
ARTIFACT_TAG_SUFFIX = "-artifact"
# Preferred order for the containerDisk: KubeVirt takes qcow2 and raw only.
CONTAINERDISK_FORMATS = ("qcow2", "raw")

_SENT = re.compile(r"Copying blob (sha256:[0-9a-f]{64})")
_REUSED = re.compile(r"Skipping blob (sha256:[0-9a-f]{64}) \(already present\)")


class PushError(Oci2DiskError):
    """A push to a registry could not be prepared or did not go through."""


class Shape(enum.Enum):
    """What a push puts into the registry."""

    CONTAINERDISK = "containerdisk"
    ARTIFACT = "artifact"


@dataclass(frozen=True)
class PushResult:
    shape: Shape
    ref: str  # docker://REGISTRY/NAME:TAG as pushed
    digest: str  # the manifest digest in the registry
    sent: tuple[str, ...]  # blob digests uploaded by this push
    reused: tuple[str, ...]  # blob digests the registry had already

    def to_json(self) -> dict[str, Any]:
        return {
            "shape": self.shape.value,
            "ref": self.ref,
            "digest": self.digest,
            "sent": list(self.sent),
            "reused": list(self.reused),
        }


@dataclass(frozen=True)
class RunArtifact:
    """One entry of a run manifest's ``artifacts``."""

    path: Path
    format: str
    size: int
    sha256: str  # hex, as the manifest writes it

    @property
    def digest(self) -> str:
        return f"sha256:{self.sha256}"


@dataclass(frozen=True)
class RunManifest:
    """The parts of ``NAME.manifest.json`` a push needs."""

    file: Path
    source_ref: str
    source_digest: str
    platform: Platform
    artifacts: tuple[RunArtifact, ...]


def read_run_manifest(file: Path) -> RunManifest:
    """Read ``NAME.manifest.json`` as written by build/convert."""
    try:
        data = json.loads(Path(file).read_bytes())
        source = data["source"]
        artifacts = tuple(
            RunArtifact(Path(a["path"]), str(a["format"]), int(a["size"]), str(a["sha256"]))
            for a in data["artifacts"]
        )
        platform = Platform.parse(str(source.get("platform") or "linux/amd64"))
        return RunManifest(
            Path(file), str(source["ref"]), str(source["digest"]), platform, artifacts
        )
    except FileNotFoundError:
        raise PushError(f"{file} does not exist", hint="push the manifest a run wrote") from None
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise PushError(
            f"{file} is not a manifest written by oci2disk ({exc})",
            hint="name the NAME.manifest.json beside the outputs of a build or convert",
        ) from None


def parse_destination(text: str) -> ImageRef:
    """``docker://REGISTRY/NAME:TAG`` (or the same without ``docker://``) to push to."""
    scheme = text.partition(":")[0]
    other_transport = scheme in {t.value for t in Transport} and scheme != "docker"
    candidate = text if text.startswith("docker://") else f"docker://{text}"
    try:
        ref = None if other_transport else parse_ref(candidate)
    except RefError:
        ref = None
    if ref is None or ref.transport is not Transport.DOCKER or not ref.registry:
        raise PushError(
            f"cannot push to {text!r}: not a registry reference",
            hint="write it as REGISTRY/NAME:TAG, e.g. ghcr.io/me/disk:v1 or "
            "127.0.0.1:5000/disk:latest",
        )
    if ref.tag is None or ref.tag.startswith("sha256:") or "@" in ref.name:
        if ref.tag is None:
            return ImageRef(Transport.DOCKER, ref.name, "latest")
        raise PushError(f"cannot push to a digest ({text})", hint="push to a tag")
    return ref


def artifact_destination(dest: ImageRef) -> ImageRef:
    """Where :func:`push_outputs` puts the OCI artifact beside a containerDisk: TAG-artifact."""
    return ImageRef(Transport.DOCKER, dest.name, f"{dest.tag or 'latest'}{ARTIFACT_TAG_SUFFIX}")


# ---------------------------------------------------------------- layouts


def _epoch(source_date_epoch: int | None) -> int:
    if source_date_epoch is not None:
        return source_date_epoch
    text = os.environ.get("SOURCE_DATE_EPOCH", "")
    return int(text) if text.isdigit() else 0


def _iso(epoch: int) -> str:
    import datetime

    return datetime.datetime.fromtimestamp(epoch, datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def containerdisk_layout(
    disk: Path,
    layout: Path,
    *,
    tag: str = "latest",
    platform: Platform,
    annotations: Mapping[str, str] | None = None,
    compress: bool = True,
    source_date_epoch: int | None = None,
) -> Descriptor:
    """Write a KubeVirt containerDisk of ``disk`` into the OCI layout ``layout``.

    One layer: ``disk/`` (0555) and ``disk/NAME`` (0444), both owned by 107:107,
    gzip-compressed (deterministically: gzip mtime 0, tar mtimes from
    SOURCE_DATE_EPOCH), so the same disk gives the same blobs and a second push sends
    nothing. Returns the manifest descriptor.
    """
    disk = Path(disk)
    if not disk.is_file():
        raise PushError(f"{disk} is not a disk image file")
    epoch = _epoch(source_date_epoch)
    writer = LayoutWriter(layout)
    tmp = layout / "blobs" / "sha256" / ".containerdisk-layer"
    with tmp.open("wb") as raw_out:
        blob = HashingWriter(raw_out)
        gz: Any = None
        if compress:
            from isal import igzip

            # level 1: a qcow2 hardly compresses further; the time goes into reading it
            gz = igzip.IGzipFile(fileobj=blob, mode="wb", compresslevel=1, mtime=0)  # type: ignore[no-untyped-call]
        plain = HashingWriter(gz if gz is not None else blob)
        tar_out: Any = plain
        with tarfile.open(fileobj=tar_out, mode="w|", format=tarfile.PAX_FORMAT) as tar:
            tar.addfile(_tar_info(f"{DISK_DIR}/", tarfile.DIRTYPE, 0o555, 0, epoch))
            info = _tar_info(f"{DISK_DIR}/{disk.name}", tarfile.REGTYPE, 0o444, 0, epoch)
            info.size = disk.stat().st_size
            with disk.open("rb") as f:
                tar.addfile(info, f)
        if gz is not None:
            gz.close()
    layer_digest = "sha256:" + blob.sha.hexdigest()
    target = layout / "blobs" / "sha256" / layer_digest.removeprefix("sha256:")
    os.replace(tmp, target)
    remember_verified(target, layer_digest)
    layer = Descriptor(MT_OCI_LAYER_GZIP if compress else MT_OCI_LAYER, layer_digest, blob.size)
    config: dict[str, Any] = {
        "architecture": platform.architecture,
        "os": platform.os,
        "created": _iso(epoch),
        "rootfs": {"type": "layers", "diff_ids": ["sha256:" + plain.sha.hexdigest()]},
        "config": {},
        "history": [{"created": _iso(epoch), "created_by": f"oci2disk containerDisk {disk.name}"}],
    }
    if platform.variant:
        config["variant"] = platform.variant
    return _add_manifest(writer, config, [layer], tag, annotations or {})


def _tar_info(name: str, kind: bytes, mode: int, size: int, mtime: int) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.mode = mode
    info.size = size
    info.mtime = mtime
    info.uid = info.gid = KUBEVIRT_UID
    info.uname = info.gname = ""
    return info


def _add_manifest(
    writer: LayoutWriter,
    config: Mapping[str, Any],
    layers: Sequence[Descriptor],
    tag: str,
    annotations: Mapping[str, str],
) -> Descriptor:
    config_desc = writer.add_bytes(
        canonical_json(config), "application/vnd.oci.image.config.v1+json"
    )
    manifest: dict[str, Any] = {
        "schemaVersion": 2,
        "mediaType": MT_OCI_MANIFEST,
        "config": config_desc.to_json(),
        "layers": [layer.to_json() for layer in layers],
    }
    if annotations:
        manifest["annotations"] = dict(annotations)
    return _index(writer, writer.add_bytes(canonical_json(manifest), MT_OCI_MANIFEST), tag)


def _index(writer: LayoutWriter, desc: Descriptor, tag: str) -> Descriptor:
    tagged = Descriptor(
        desc.media_type, desc.digest, desc.size, {"org.opencontainers.image.ref.name": tag}
    )
    writer._add_to_index(tagged)
    return desc


def artifact_layout(
    run_manifest: RunManifest,
    layout: Path,
    *,
    tag: str = "latest",
    source_date_epoch: int | None = None,
) -> Descriptor:
    """Write the run's artifacts as one OCI artifact into the layout ``layout``.

    Each file artifact is a layer of its own bytes, media type
    ``application/vnd.oci2disk.FORMAT``, titled with its file name and annotated with
    its format and sha256; the run manifest is the last layer. A file whose sha256 is
    no longer what the manifest says is an error (it changed since the run). Directory
    outputs (``dir``) are left out: a registry holds files. Returns the manifest
    descriptor.
    """
    writer = LayoutWriter(layout)
    layers: list[Descriptor] = []
    annotations: dict[str, str] = {
        CREATED: _iso(_epoch(source_date_epoch)),
        f"{ANNOTATION_PREFIX}source.ref": run_manifest.source_ref,
        f"{ANNOTATION_PREFIX}source.digest": run_manifest.source_digest,
        f"{ANNOTATION_PREFIX}platform": str(run_manifest.platform),
    }
    for item in run_manifest.artifacts:
        if not item.path.is_file():
            if item.path.is_dir():
                log.info("not pushing %s: a directory output is not a file", item.path)
                continue
            raise PushError(
                f"{item.path} (listed in {run_manifest.file}) does not exist",
                hint="push right after the run, before moving its outputs",
            )
        blob = _link_blob(layout, item)
        layers.append(
            Descriptor(
                f"application/vnd.oci2disk.{item.format}",
                item.digest,
                blob.stat().st_size,
                {
                    TITLE: item.path.name,
                    f"{ANNOTATION_PREFIX}format": item.format,
                    f"{ANNOTATION_PREFIX}sha256": item.sha256,
                },
            )
        )
        annotations[f"{ANNOTATION_PREFIX}artifact.{item.path.name}.sha256"] = item.sha256
    if not layers:
        raise PushError(f"{run_manifest.file} lists no file to push")
    manifest_blob = writer.add_bytes(run_manifest.file.read_bytes(), MT_RUN_MANIFEST)
    layers.append(
        Descriptor(
            MT_RUN_MANIFEST,
            manifest_blob.digest,
            manifest_blob.size,
            {TITLE: run_manifest.file.name},
        )
    )
    empty = writer.add_bytes(b"{}", MT_EMPTY)
    manifest: dict[str, Any] = {
        "schemaVersion": 2,
        "mediaType": MT_OCI_MANIFEST,
        "artifactType": ARTIFACT_TYPE,
        "config": empty.to_json(),
        "layers": [layer.to_json() for layer in layers],
        "annotations": annotations,
    }
    return _index(writer, writer.add_bytes(canonical_json(manifest), MT_OCI_MANIFEST), tag)


def _link_blob(layout: Path, item: RunArtifact) -> Path:
    """The artifact as a blob of the layout: a hard link when it can be one, else a copy,
    checked against the manifest's sha256 either way."""
    target = layout / "blobs" / "sha256" / item.sha256
    if not target.exists():
        tmp = target.with_name(target.name + ".tmp")
        try:
            os.link(item.path, tmp)
        except OSError:
            shutil.copyfile(item.path, tmp)
        os.replace(tmp, target)
    actual = "sha256:" + sha256_file(target)
    if actual != item.digest:
        raise PushError(
            f"{item.path} has {actual}, its manifest says sha256:{item.sha256}",
            hint="the file changed after the run; build or convert it again",
        )
    remember_verified(target, actual)
    return target


# ---------------------------------------------------------------- pushing


def push_layout(layout: Path, tag: str, dest: ImageRef, shape: Shape) -> PushResult:
    """``skopeo copy`` one tagged image of a layout to a registry, blobs it has skipped."""
    digest_file = layout / f".{tag}.digest"
    argv = [
        "skopeo", "--debug", "copy", "--preserve-digests", "--retry-times", "3",
        "--digestfile", os.fspath(digest_file),
        *tls_flag("dest-tls-verify", dest.registry),
        "--dest-authfile", os.fspath(auth_file(layout)),
        f"oci:{os.fspath(layout)}:{tag}", str(dest),
    ]  # fmt: skip
    log.info("pushing the %s to %s", shape.value, dest)
    try:
        proc = run.run(argv, what=f"could not push the {shape.value} to {dest}")
    except CommandError as exc:
        raise _push_error(dest, exc) from None
    text = (proc.stdout + proc.stderr).decode("utf-8", "replace")
    reused = _unique(_REUSED.findall(text))
    sent = _unique(d for d in _SENT.findall(text) if d not in reused)
    log.info("%s: %d blob(s) sent, %d already in the registry", dest, len(sent), len(reused))
    return PushResult(shape, str(dest), digest_file.read_text().strip(), sent, reused)


def _unique(items: Iterable[str]) -> tuple[str, ...]:
    return tuple(dict.fromkeys(items))


def auth_file(workdir: Path) -> Path:
    """The credentials file skopeo is given: the first readable one of REGISTRY_AUTH_FILE,
    $DOCKER_CONFIG/config.json, containers' auth.json ($XDG_RUNTIME_DIR/containers,
    ~/.config/containers) and ~/.docker/config.json; else an empty one in ``workdir``.

    Always naming one keeps skopeo from its own default, /run/containers/UID/auth.json,
    which a user without XDG_RUNTIME_DIR may not read ("permission denied"); and
    containers-image would not look at DOCKER_CONFIG at all.
    """
    env = os.environ
    home = Path.home() if env.get("HOME") else None
    candidates = [
        env.get("REGISTRY_AUTH_FILE"),
        env.get("DOCKER_CONFIG") and os.path.join(env["DOCKER_CONFIG"], "config.json"),
        env.get("XDG_RUNTIME_DIR") and os.path.join(env["XDG_RUNTIME_DIR"], "containers/auth.json"),
        home and os.fspath(home / ".config/containers/auth.json"),
        home and os.fspath(home / ".docker/config.json"),
    ]
    for candidate in candidates:
        if candidate and os.path.isfile(candidate) and os.access(candidate, os.R_OK):
            return Path(candidate)
    anonymous = workdir / ".anonymous-auth.json"
    anonymous.write_text('{"auths": {}}\n')
    return anonymous


def _push_error(dest: ImageRef, exc: CommandError) -> PushError:
    text = exc.stderr_tail
    if "unauthorized" in text or "authentication required" in text or "denied" in text:
        hint = f"log in first: `docker login {dest.registry}` (or skopeo login)"
    elif connected := connection_hint(text, dest.registry or "docker.io"):
        hint = connected
    else:
        hint = "check the reference and that the registry accepts pushes"
    tail = "\n".join(line for line in text.splitlines() if "level=debug" not in line)
    return PushError(f"could not push to {dest}\n{tail[-2000:]}".rstrip(), hint=hint)


def push_containerdisk(
    disk: Path,
    dest: str | ImageRef,
    workdir: Path,
    *,
    platform: Platform,
    annotations: Mapping[str, str] | None = None,
    compress: bool = True,
) -> PushResult:
    """Push ``disk`` (qcow2 or raw) to ``dest`` as a KubeVirt containerDisk."""
    ref = dest if isinstance(dest, ImageRef) else parse_destination(dest)
    layout = Path(workdir) / "containerdisk"
    containerdisk_layout(
        disk, layout, tag="push", platform=platform, annotations=annotations, compress=compress
    )
    return push_layout(layout, "push", ref, Shape.CONTAINERDISK)


def push_artifact(manifest_file: Path, dest: str | ImageRef, workdir: Path) -> PushResult:
    """Push every file a run wrote (and its manifest) to ``dest`` as one OCI artifact.

    ``workdir`` should be on the outputs' filesystem: the layout hard-links the files.
    """
    ref = dest if isinstance(dest, ImageRef) else parse_destination(dest)
    layout = Path(workdir) / "artifact"
    artifact_layout(read_run_manifest(manifest_file), layout, tag="push")
    return push_layout(layout, "push", ref, Shape.ARTIFACT)


def push_outputs(
    manifest_file: Path,
    dest: str,
    workdir: Path,
    shapes: Sequence[Shape] = (Shape.CONTAINERDISK, Shape.ARTIFACT),
) -> list[PushResult]:
    """What ``--push REF`` does after a build or convert wrote ``manifest_file``.

    The containerDisk (of the qcow2 output, else the raw one) goes to REF, the OCI
    artifact of all outputs to REF's tag with ``-artifact`` appended (REF itself when it
    is the only shape). A containerDisk needs a qcow2 or raw output.
    """
    ref = parse_destination(dest)
    run_manifest = read_run_manifest(manifest_file)
    results: list[PushResult] = []
    if Shape.CONTAINERDISK in shapes:
        disk = _containerdisk_source(run_manifest)
        results.append(
            push_containerdisk(
                disk.path,
                ref,
                workdir,
                platform=run_manifest.platform,
                annotations=_digest_annotations(run_manifest, disk),
            )
        )
    if Shape.ARTIFACT in shapes:
        target = artifact_destination(ref) if Shape.CONTAINERDISK in shapes else ref
        results.append(push_artifact(manifest_file, target, workdir))
    return results


def _containerdisk_source(run_manifest: RunManifest) -> RunArtifact:
    for fmt in CONTAINERDISK_FORMATS:
        for item in run_manifest.artifacts:
            if item.format == fmt:
                return item
    made = ", ".join(sorted({a.format for a in run_manifest.artifacts})) or "nothing"
    raise PushError(
        f"a containerDisk needs a qcow2 or raw disk; this run made {made}",
        hint="add qcow2 to the formats (--format qcow2), or push only the OCI artifact",
    )


def _digest_annotations(run_manifest: RunManifest, disk: RunArtifact) -> dict[str, str]:
    return {
        f"{ANNOTATION_PREFIX}source.ref": run_manifest.source_ref,
        f"{ANNOTATION_PREFIX}source.digest": run_manifest.source_digest,
        f"{ANNOTATION_PREFIX}disk.format": disk.format,
        f"{ANNOTATION_PREFIX}disk.sha256": disk.sha256,
    }
