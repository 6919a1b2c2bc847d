"""Every image input: each transport converts the real bootstrapped base, and `verify`
finds the disk equal to the image read through that same transport and through the
Docker Engine. A bad reference is an error that lists the transports."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from clikit import oci2disk
from oci2disk.diskimage.extfs import open_filesystem
from oci2disk.errors import RefError
from oci2disk.refs import ImageRef, Transport, is_loopback_registry, parse_ref

if TYPE_CHECKING:
    from registrykit import Registry

pytest_plugins = ("registrykit",)  # the registry fixtures

ALL_TRANSPORTS = (
    "docker-daemon:",
    "oci:",
    "docker-archive:",
    "oci-archive:",
    "containers-storage:",
    "docker://",
    "rootfs:",
)
STORAGE_NAME = "oci2disk-test/transports:bookworm"


# ---------------------------------------------------------------- parsing


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            "docker://127.0.0.1:5000/debian:bookworm",
            ImageRef(Transport.DOCKER, "127.0.0.1:5000/debian", "bookworm"),
        ),
        ("docker://debian", ImageRef(Transport.DOCKER, "debian", "latest")),
        (
            "docker://registry.example/a/b@sha256:" + "0" * 64,
            ImageRef(Transport.DOCKER, "registry.example/a/b@sha256:" + "0" * 64, None),
        ),
        (
            "containers-storage:oci2disk-recipe/x:latest",
            ImageRef(Transport.CONTAINERS_STORAGE, "oci2disk-recipe/x", "latest"),
        ),
        (
            "containers-storage:localhost/debian",
            ImageRef(Transport.CONTAINERS_STORAGE, "localhost/debian", "latest"),
        ),
        ("rootfs:/nonexistent/r.tar", ImageRef(Transport.ROOTFS, "/nonexistent/r.tar")),
    ],
)
def test_parse_new_transports(text: str, expected: ImageRef) -> None:
    ref = parse_ref(text)
    assert ref == expected
    assert str(ref) == text.replace("docker://debian", "docker://debian:latest").replace(
        "localhost/debian", "localhost/debian:latest"
    )


def test_rootfs_config_is_split_off_only_when_the_tarball_exists(tmp_path: Path) -> None:
    tarball = tmp_path / "root:fs.tar"  # a ':' in the tarball's own name
    tarball.write_bytes(b"")
    assert parse_ref(f"rootfs:{tarball}") == ImageRef(Transport.ROOTFS, str(tarball))
    ref = parse_ref(f"rootfs:{tarball}:{tmp_path}/config.json")
    assert (ref.name, ref.config) == (str(tarball), f"{tmp_path}/config.json")
    assert str(ref) == f"rootfs:{tarball}:{tmp_path}/config.json"


@pytest.mark.parametrize(
    "text",
    ["docker:debian", "docker://", "docker:///abs", "containers-storage:", "podman:x", "x"],
)
def test_bad_reference_lists_every_transport(text: str) -> None:
    with pytest.raises(RefError) as info:
        parse_ref(text)
    for transport in ALL_TRANSPORTS:
        assert transport.rstrip("/") in str(info.value)


def test_cli_bad_reference_lists_transports(outdir: Path) -> None:
    result = oci2disk("convert", "debian:bookworm", "-f", "raw", "-o", str(outdir / "x.raw"))
    assert result.code == 1
    assert "bad image reference 'debian:bookworm'" in result.stderr
    for transport in ALL_TRANSPORTS:
        assert transport.rstrip("/") in result.stderr
    assert not list(outdir.iterdir())


@pytest.mark.parametrize(
    ("registry_host", "loopback"),
    [
        ("127.0.0.1:5000", True),
        ("127.3.4.5", True),
        ("localhost:5000", True),
        ("[::1]:5000", True),
        ("registry.example:5000", False),
        ("10.0.0.1:5000", False),
        ("", False),
    ],
)
def test_only_loopback_registries_go_without_tls(registry_host: str, loopback: bool) -> None:
    assert is_loopback_registry(registry_host) is loopback


# ---------------------------------------------------------------- real images


@pytest.fixture(scope="module")
def sources(
    base_image: str, registry_base: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[dict[str, str]]:
    """The bootstrapped base behind every transport."""
    work = tmp_path_factory.mktemp("transports")
    daemon = f"docker-daemon:{base_image}"

    def skopeo(dest: str) -> None:
        subprocess.run(["skopeo", "copy", "--quiet", daemon, dest], check=True)

    skopeo(f"oci:{work}/layout:bookworm")
    skopeo(f"oci-archive:{work}/image.oci.tar")
    skopeo(f"containers-storage:localhost/{STORAGE_NAME}")
    subprocess.run(["docker", "save", "-o", str(work / "image.docker.tar"), base_image], check=True)
    # A flat rootfs tarball (as mmdebstrap writes) and an image config beside it.
    flat = oci2disk("-q", "convert", daemon, "-f", "tar", "-o", str(work / "rootfs.tar"))
    assert flat.code == 0, flat.stderr
    (work / "config.json").write_text(
        json.dumps(
            {
                "architecture": "amd64",
                "os": "linux",
                "config": {"Env": ["PATH=/usr/bin:/bin"], "Cmd": ["/bin/sh"]},
            }
        )
    )
    yield {
        "docker-daemon": daemon,
        "oci": f"oci:{work}/layout:bookworm",
        "docker-archive": f"docker-archive:{work}/image.docker.tar",
        "oci-archive": f"oci-archive:{work}/image.oci.tar",
        "containers-storage": f"containers-storage:{STORAGE_NAME}",
        "docker": f"docker://{registry_base}",
        "rootfs": f"rootfs:{work}/rootfs.tar:{work}/config.json",
    }
    subprocess.run(
        ["buildah", "rmi", f"localhost/{STORAGE_NAME}"], capture_output=True, check=False
    )


@pytest.mark.slow
@pytest.mark.docker
@pytest.mark.parametrize(
    "transport",
    [
        "docker-daemon",
        "oci",
        "docker-archive",
        "oci-archive",
        "containers-storage",
        "docker",
        "rootfs",
    ],
)
def test_every_transport_converts_the_same_files(
    transport: str, sources: dict[str, str], outdir: Path
) -> None:
    source = sources[transport]
    disk = outdir / f"{transport}.raw"
    result = oci2disk("--json", "convert", source, "-f", "raw", "-o", str(disk))
    assert result.code == 0, result.stderr
    manifest = json.loads(result.stdout)
    assert manifest["source"]["ref"] == source
    with open_filesystem(disk) as fs, fs.open("usr/lib/os-release") as f:
        assert b"VERSION_CODENAME=bookworm" in f.read()
    # equal to the image read back through the same transport, and to the engine's copy.
    # The filesystem UUID derives from the source image's identity, which transports that
    # rewrite the config change: against the engine's copy the files are compared with
    # the disk's own UUID given.
    uuid = manifest["filesystem"]["uuid"]
    for against in dict.fromkeys((source, sources["docker-daemon"])):
        given = () if against == source else ("--uuid", uuid)
        check = oci2disk("verify", str(disk), "--against", against, *given)
        assert check.code == 0, f"against {against}:\n{check.stdout}{check.stderr}"
        assert ": equal (" in check.stdout


@pytest.mark.docker
def test_platform_mismatch_is_an_error(registry_base: str, outdir: Path) -> None:
    disk = outdir / "arm.raw"
    result = oci2disk(
        "convert", f"docker://{registry_base}", "-f", "raw", "-o", str(disk),
        "--platform", "linux/arm64",
    )  # fmt: skip
    assert result.code == 1
    assert "is an image for linux/amd64, not linux/arm64" in result.stderr
    assert not disk.exists()


@pytest.mark.docker
def test_missing_registry_image_says_so(registry: Registry, outdir: Path) -> None:
    result = oci2disk(
        "convert", f"docker://{registry.name('nothing:here')}", "-f", "raw",
        "-o", str(outdir / "x.raw"),
    )  # fmt: skip
    assert result.code == 1
    assert f"the registry {registry.host} has no image" in result.stderr


def test_missing_containers_storage_image_names_where_it_looked(outdir: Path) -> None:
    result = oci2disk(
        "convert", "containers-storage:oci2disk-test/absent:1", "-f", "raw",
        "-o", str(outdir / "x.raw"),
    )  # fmt: skip
    assert result.code == 1
    assert "containers-storage has no image oci2disk-test/absent:1" in result.stderr
    assert "localhost/oci2disk-test/absent:1" in result.stderr


def test_rootfs_config_for_another_platform_is_refused(outdir: Path) -> None:
    tarball = outdir / "rootfs.tar"
    subprocess.run(["tar", "-cf", str(tarball), "-C", str(outdir), "--files-from=/dev/null"])
    config = outdir / "config.json"
    config.write_text(json.dumps({"architecture": "arm64", "os": "linux", "config": {}}))
    result = oci2disk(
        "convert", f"rootfs:{tarball}:{config}", "-f", "raw", "-o", str(outdir / "x.raw"),
        "--platform", "linux/amd64",
    )  # fmt: skip
    assert result.code == 1
    assert "says the rootfs is for linux/arm64, not linux/amd64" in result.stderr


@pytest.mark.slow
@pytest.mark.docker
def test_registry_image_is_pulled_by_the_engine_without_skopeo(
    registry_base: str, outdir: Path
) -> None:
    """With no skopeo on PATH (mke2fs and sfdisk live in /usr/sbin), the engine pulls."""
    disk = outdir / "engine.raw"
    result = oci2disk(
        "-v", "--json", "convert", f"docker://{registry_base}", "-f", "raw", "-o", str(disk),
        env={"PATH": "/usr/sbin:/sbin"},
    )  # fmt: skip
    assert result.code == 0, result.stderr
    assert "skopeo is not installed" in result.stderr  # the engine did it
    # verify reads the registry with skopeo: the engine's `docker save` re-serializes the
    # image config, another identity, so the files are compared with the disk's own UUID
    uuid = json.loads(result.stdout)["filesystem"]["uuid"]
    check = oci2disk("verify", str(disk), "--against", f"docker://{registry_base}", "--uuid", uuid)
    assert check.code == 0, check.stdout + check.stderr
