"""Disks pushed to a registry on loopback: as a KubeVirt containerDisk that the Docker
Engine pulls and runs, and as a plain OCI artifact that skopeo reads back."""

from __future__ import annotations

import base64
import io
import json
import os
import shutil
import subprocess
import tarfile
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from clikit import oci2disk
from oci2disk.bytestreams import sha256_file
from oci2disk.oci.layout import Platform
from oci2disk.publish import (
    ARTIFACT_TYPE,
    KUBEVIRT_UID,
    PushError,
    Shape,
    parse_destination,
    push_containerdisk,
    push_outputs,
)
from test_unprivileged import NOBODY, unprivileged_python

if TYPE_CHECKING:
    from registrykit import Registry

__all__ = ["unprivileged_python"]  # the fixture, used by name

pytest_plugins = ("registrykit",)  # the registry fixtures

pytestmark = [pytest.mark.slow, pytest.mark.docker]


@pytest.fixture(scope="module")
def qcow2_run(base_image: str, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`oci2disk build` of a small recipe to qcow2 and tar; returns the run manifest."""
    recipe = tmp_path_factory.mktemp("publish-recipe")
    (recipe / "Dockerfile").write_text(
        f"FROM {base_image}\nRUN echo pushed > /etc/oci2disk-pushed\n"
    )
    (recipe / "recipe.toml").write_text('[outputs]\nname = "disk"\nformats = ["qcow2", "tar"]\n')
    out = tmp_path_factory.mktemp("publish")
    result = oci2disk("-q", "build", str(recipe), "-o", str(out))
    assert result.code == 0, result.stderr
    return out / "disk.manifest.json"


def _docker(*args: str) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(["docker", *args], capture_output=True, check=True)


@pytest.fixture
def pulled(registry: Registry) -> Iterator[list[str]]:
    """Images the test pulls into the engine, removed afterwards."""
    names: list[str] = []
    yield names
    for name in names:
        subprocess.run(["docker", "rmi", "-f", name], capture_output=True, check=False)


def test_containerdisk_and_artifact_round_trip(
    qcow2_run: Path, registry: Registry, outdir: Path, pulled: list[str]
) -> None:
    data = json.loads(qcow2_run.read_text())
    qcow2 = next(Path(a["path"]) for a in data["artifacts"] if a["format"] == "qcow2")
    dest = registry.name("disks/debian:v1")

    results = push_outputs(qcow2_run, dest, outdir / "push")
    assert [r.shape for r in results] == [Shape.CONTAINERDISK, Shape.ARTIFACT]
    assert results[0].sent and results[1].sent

    # the containerDisk: docker pull, then /disk/disk.qcow2 owned 107:107, same bytes
    pulled.append(dest)
    _docker("pull", dest)
    container = _docker("create", dest, "/nothing-to-run").stdout.decode().strip()
    try:
        stream = _docker("cp", f"{container}:/disk", "-").stdout
    finally:
        _docker("rm", container)
    with tarfile.open(fileobj=io.BytesIO(stream)) as tar:
        member = tar.getmember("disk/disk.qcow2")
        assert (member.uid, member.gid) == (KUBEVIRT_UID, KUBEVIRT_UID)
        assert (tar.getmember("disk").uid, tar.getmember("disk").gid) == (107, 107)
        f = tar.extractfile(member)
        assert f is not None
        assert f.read() == qcow2.read_bytes()
    inspect = json.loads(_docker("image", "inspect", dest).stdout)[0]
    assert inspect["Architecture"] == "amd64"

    # the OCI artifact, read back with skopeo: layer digests are the manifest's sha256s
    artifact_ref = f"docker://{registry.name('disks/debian:v1-artifact')}"
    raw = subprocess.run(
        ["skopeo", "inspect", "--raw", "--tls-verify=false", artifact_ref],
        capture_output=True, check=True,
    ).stdout  # fmt: skip
    manifest: dict[str, Any] = json.loads(raw)
    assert manifest["artifactType"] == ARTIFACT_TYPE
    assert manifest["annotations"]["io.oci2disk.source.digest"] == data["source"]["digest"]
    by_title = {
        layer["annotations"]["org.opencontainers.image.title"]: layer
        for layer in manifest["layers"]
    }
    for artifact in data["artifacts"]:
        layer = by_title[Path(artifact["path"]).name]
        assert layer["digest"] == f"sha256:{artifact['sha256']}"
        assert layer["annotations"]["io.oci2disk.sha256"] == artifact["sha256"]
        assert layer["mediaType"] == f"application/vnd.oci2disk.{artifact['format']}"
    copy = outdir / "copy"
    subprocess.run(
        ["skopeo", "copy", "--quiet", "--src-tls-verify=false", artifact_ref, f"oci:{copy}"],
        capture_output=True, check=True,
    )  # fmt: skip
    for artifact in data["artifacts"]:
        blob = copy / "blobs" / "sha256" / artifact["sha256"]
        assert sha256_file(blob) == artifact["sha256"]
    manifest_layer = by_title[qcow2_run.name]
    assert (copy / "blobs/sha256" / manifest_layer["digest"][7:]).read_bytes() == (
        qcow2_run.read_bytes()
    )

    # a second push (say, after an interrupted one) sends no blob the registry has
    again = push_outputs(qcow2_run, dest, outdir / "push-again")
    for first, second in zip(results, again, strict=True):
        assert second.sent == ()
        assert set(second.reused) == set(first.sent)
        assert second.digest == first.digest  # deterministic: the same image again


def test_containerdisk_needs_a_disk(qcow2_run: Path, registry: Registry, outdir: Path) -> None:
    data = json.loads(qcow2_run.read_text())
    data["artifacts"] = [a for a in data["artifacts"] if a["format"] == "tar"]
    only_tar = outdir / "tar-only.manifest.json"
    only_tar.write_text(json.dumps(data))
    with pytest.raises(PushError, match="needs a qcow2 or raw disk") as info:
        push_outputs(only_tar, registry.name("disks/tar:v1"), outdir / "push")
    assert "--format qcow2" in str(info.value)
    results = push_outputs(
        only_tar, registry.name("disks/tar:v1"), outdir / "push", shapes=(Shape.ARTIFACT,)
    )
    assert registry.has("disks/tar", "v1")
    assert results[0].ref == f"docker://{registry.name('disks/tar:v1')}"


def test_push_errors_name_the_fix(outdir: Path) -> None:
    with pytest.raises(PushError, match="not a registry reference"):
        parse_destination("oci:/tmp/x")
    assert parse_destination("127.0.0.1:5000/disk").tag == "latest"
    with pytest.raises(PushError, match=r"no registry answers at 127\.0\.0\.1:1\b"):
        disk = outdir / "tiny.raw"
        disk.write_bytes(b"\0" * 4096)
        push_containerdisk(
            disk, "127.0.0.1:1/x:y", outdir / "w", platform=Platform("linux", "amd64")
        )


PUSH_SCRIPT = """\
import json, sys
from pathlib import Path
from oci2disk.publish import push_outputs

results = push_outputs(Path(sys.argv[1]), sys.argv[2], Path(sys.argv[3]))
print(json.dumps([r.to_json() for r in results]))
"""


def test_push_needs_no_root(
    qcow2_run: Path,
    registry: Registry,
    outdir: Path,
    unprivileged_python: tuple[str, dict[str, str]],
) -> None:
    """uid 65534, no capabilities: the files it owns, pushed in both shapes."""
    data = json.loads(qcow2_run.read_text())
    mine = outdir / "mine"
    mine.mkdir()
    for artifact in data["artifacts"]:
        copy = mine / Path(artifact["path"]).name
        shutil.copyfile(artifact["path"], copy)
        artifact["path"] = str(copy)
    manifest = mine / qcow2_run.name
    manifest.write_text(json.dumps(data))
    for path in [mine, *mine.iterdir()]:
        os.chown(path, NOBODY, NOBODY)
    python, env = unprivileged_python
    dest = registry.name("disks/rootless:v1")
    who = subprocess.run(
        ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups",
         "--inh-caps=-all", "--bounding-set=-all",
         python, "-c", PUSH_SCRIPT, str(manifest), dest, str(mine / "work")],
        capture_output=True, text=True, check=False, timeout=600,
        env={"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": "/nonexistent", **env},
    )  # fmt: skip
    assert who.returncode == 0, who.stderr
    pushed = json.loads(who.stdout)
    assert [p["shape"] for p in pushed] == ["containerdisk", "artifact"]
    assert registry.has("disks/rootless", "v1") and registry.has("disks/rootless", "v1-artifact")


def test_auth_file_follows_docker_config(monkeypatch: pytest.MonkeyPatch, outdir: Path) -> None:
    from oci2disk.publish import auth_file

    for name in ("REGISTRY_AUTH_FILE", "DOCKER_CONFIG", "XDG_RUNTIME_DIR"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HOME", str(outdir / "home"))
    anonymous = auth_file(outdir)
    assert anonymous.parent == outdir and json.loads(anonymous.read_text()) == {"auths": {}}
    docker_home = outdir / "home" / ".docker"
    docker_home.mkdir(parents=True)
    (docker_home / "config.json").write_text('{"auths": {}}')
    assert auth_file(outdir) == docker_home / "config.json"
    (outdir / "ci").mkdir()
    (outdir / "ci" / "config.json").write_text('{"auths": {}}')
    monkeypatch.setenv("DOCKER_CONFIG", str(outdir / "ci"))
    assert auth_file(outdir) == outdir / "ci" / "config.json"


def test_push_uses_the_docker_login(
    qcow2_run: Path, registry_auth: Registry, outdir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Credentials as `docker login` stores them ($DOCKER_CONFIG/config.json)."""
    for name in ("REGISTRY_AUTH_FILE", "DOCKER_CONFIG", "XDG_RUNTIME_DIR"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HOME", str(outdir / "home"))
    dest = registry_auth.name("disks/private:v1")
    with pytest.raises(PushError, match="log in first"):
        push_outputs(qcow2_run, dest, outdir / "anonymous", shapes=(Shape.ARTIFACT,))

    config = outdir / "docker-config"
    config.mkdir()
    assert registry_auth.login is not None
    user, password = registry_auth.login
    token = base64.b64encode(f"{user}:{password}".encode()).decode()
    (config / "config.json").write_text(
        json.dumps({"auths": {registry_auth.host: {"auth": token}}})
    )
    monkeypatch.setenv("DOCKER_CONFIG", str(config))
    results = push_outputs(qcow2_run, dest, outdir / "logged-in", shapes=(Shape.ARTIFACT,))
    assert results[0].sent
    listed = subprocess.run(
        ["skopeo", "inspect", "--raw", "--tls-verify=false",
         "--authfile", str(config / "config.json"), f"docker://{dest}"],
        capture_output=True, check=True,
    )  # fmt: skip
    assert json.loads(listed.stdout)["artifactType"] == ARTIFACT_TYPE


def test_build_push_flag_pushes_and_resumes(
    base_image: str, registry: Registry, outdir: Path, pulled: list[str]
) -> None:
    """`oci2disk build --push REF`: both shapes pushed, listed in --json; a second
    push of the same outputs sends no blob again."""
    recipe = outdir / "recipe"
    recipe.mkdir()
    (recipe / "Dockerfile").write_text(f"FROM {base_image}\nRUN echo flag > /etc/pushed\n")
    (recipe / "recipe.toml").write_text('[outputs]\nformats = ["qcow2"]\n')
    dest = registry.name("disks/flag:v1")
    pulled.append(dest)
    runs = []
    for _ in range(2):
        result = oci2disk("--json", "build", str(recipe), "-o", str(outdir / "out"), "--push", dest)
        assert result.code == 0, result.stderr
        runs.append(json.loads(result.stdout)["pushed"])
    first, second = runs
    assert [p["shape"] for p in first] == ["containerdisk", "artifact"]
    assert first[0]["ref"].endswith("disks/flag:v1") and first[0]["sent"]
    assert first[1]["ref"].endswith("disks/flag:v1-artifact")
    # reproducible outputs: the second push finds every blob in the registry already
    assert second[0]["sent"] == [] and second[0]["digest"] == first[0]["digest"]
