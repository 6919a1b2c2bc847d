"""The GitHub Action's container, run exactly as GitHub runs a Docker container action
(see actionkit), on recipes/debian-qemu with the boot check and on an arm64 build."""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from actionkit import RUNNER_UID, ActionRun, action_defaults, build_action_image, run_action
from clikit import oci2disk
from oci2disk.action import ActionInputs
from oci2disk.diskimage.extfs import open_filesystem
from oci2disk.errors import UsageError

ROOT = Path(__file__).resolve().parent.parent
ARM64_BASE = "oci2disk-test/debian-arm64:bookworm"


@pytest.fixture(scope="session")
def action_image(base_image: str) -> str:
    return build_action_image(base_image)


@pytest.fixture
def runner_dirs() -> Iterator[Path]:
    """The runner's _work/_temp: workspace, home and file_commands, owned by the runner."""
    root = Path(tempfile.mkdtemp(prefix="oci2disk-runner-"))
    for sub in ("workspace", "home", "file_commands"):
        (root / sub).mkdir()
    yield root
    # the action may have left root-owned files if it failed half-way
    shutil.rmtree(root, ignore_errors=True)


def _owned_by_runner(path: Path) -> None:
    for item in [path, *path.rglob("*")]:
        st = item.lstat()
        assert (st.st_uid, st.st_gid) == (RUNNER_UID, RUNNER_UID), item


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def _check_outputs(run: ActionRun, formats: list[str]) -> dict[str, Any]:
    assert run.code == 0, run.log[-4000:]
    outputs = run.outputs
    manifest_file = run.workspace / outputs["manifest"]
    manifest = json.loads(manifest_file.read_text())
    assert outputs["digest"] == manifest["source"]["digest"]
    listed = json.loads(outputs["artifacts"])
    assert sorted(a["format"] for a in listed) == sorted(formats)
    for fmt in formats:
        path = run.workspace / outputs[fmt]
        assert not Path(outputs[fmt]).is_absolute()  # usable by the runner's later steps
        assert outputs[f"{fmt}-sha256"] == _sha256(path)
    # the runner's user owns everything the action wrote, and can remove it
    _owned_by_runner(manifest_file.parent)
    return dict(manifest)


def test_inputs_need_a_recipe_or_an_image() -> None:
    env = {f"INPUT_{k.upper()}": v for k, v in action_defaults().items()}
    with pytest.raises(UsageError, match="exactly one of the inputs recipe and image"):
        ActionInputs.from_env(env)
    inputs = ActionInputs.from_env(
        {**env, "INPUT_RECIPE": "r", "INPUT_BUILD-ARGS": "A=1\n\n B=2 \n"}
    )
    assert inputs.build_args == ("A=1", "B=2")
    assert inputs.output_dir == "oci2disk-out"
    for firmware in ("bios,uefi", "uefi", "none"):
        chosen = ActionInputs.from_env({**env, "INPUT_RECIPE": "r", "INPUT_FIRMWARE": firmware})
        assert chosen.firmware == firmware
    with pytest.raises(UsageError, match="input firmware: 'coreboot'"):
        ActionInputs.from_env({**env, "INPUT_RECIPE": "r", "INPUT_FIRMWARE": "coreboot"})


@pytest.mark.slow
@pytest.mark.docker
def test_action_builds_and_boots_debian_qemu(
    action_image: str, runner_dirs: Path, base_image: str
) -> None:
    shutil.copytree(ROOT / "recipes" / "debian-qemu", runner_dirs / "workspace" / "recipe")
    run = run_action(
        action_image,
        runner_dirs,
        {
            "recipe": "recipe",
            "build-args": f"BASE={base_image}\n",
            "expect": "oci2disk-boot-ok",
            "timeout": "600",
            "output-dir": "out/disks",
        },
    )
    manifest = _check_outputs(run, ["raw", "qcow2"])
    assert run.outputs["boot"] == "passed"
    assert run.outputs["qcow2"].startswith("out/disks/")
    assert f"`{run.outputs['qcow2']}`" in run.summary  # the run's summary page lists it
    boot_log = run.workspace / run.outputs["boot-log"]
    assert "oci2disk-boot-ok" in boot_log.read_text(errors="replace")
    assert manifest["source"]["platform"] == "linux/amd64"


@pytest.fixture(scope="module")
def arm64_base(tmp_path_factory: pytest.TempPathFactory) -> str:
    """An arm64 Debian base in the engine, its config saying arm64.

    Bootstrapped into an OCI layout and loaded with skopeo: `bootstrap --to
    docker-daemon:` goes through `docker import`, which records the engine's own
    architecture whatever the rootfs holds.
    """
    probe = subprocess.run(
        ["docker", "image", "inspect", "--format", "{{.Architecture}}", ARM64_BASE],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    if probe.stdout.strip() != "arm64":
        layout = tmp_path_factory.mktemp("arm64-base") / "layout"
        result = oci2disk(
            "bootstrap", "bookworm", "--platform", "linux/arm64", "--to", f"oci:{layout}:bookworm"
        )
        assert result.code == 0, result.stderr
        subprocess.run(["docker", "rmi", "-f", ARM64_BASE], capture_output=True, check=False)
        subprocess.run(
            ["skopeo", "copy", "--quiet", f"oci:{layout}:bookworm", f"docker-daemon:{ARM64_BASE}"],
            capture_output=True, check=True,
        )  # fmt: skip
    return ARM64_BASE


@pytest.mark.slow
@pytest.mark.docker
def test_action_builds_for_arm64(action_image: str, runner_dirs: Path, arm64_base: str) -> None:
    recipe = runner_dirs / "workspace" / "arm"
    recipe.mkdir()
    (recipe / "Dockerfile").write_text(
        "ARG BASE\nFROM ${BASE}\nRUN dpkg --print-architecture > /etc/built-arch\n"
    )
    (recipe / "recipe.toml").write_text(
        '[outputs]\nname = "arm"\n\n[initramfs]\ninit = "/bin/sh"\n'
    )
    run = run_action(
        action_image,
        runner_dirs,
        {
            "recipe": "arm",
            "platform": "linux/arm64",
            "formats": "raw,cgz",
            "build-args": f"BASE={arm64_base}",
        },
    )
    manifest = _check_outputs(run, ["raw", "cgz"])
    assert run.outputs["boot"] == "skipped"
    assert manifest["source"]["platform"].startswith("linux/arm64")
    with open_filesystem(run.workspace / run.outputs["raw"]) as fs, fs.open("etc/built-arch") as f:
        assert f.read() == b"arm64\n"


def test_an_image_input_becomes_a_recipe_naming_it(tmp_path: Path) -> None:
    from oci2disk import recipe
    from oci2disk.action import recipe_for_image

    inputs = ActionInputs(image="docker://ghcr.io/me/img:1", name="vm", platform="linux/arm64")
    loaded = recipe.load(recipe_for_image(inputs, tmp_path))
    assert loaded.build.image == "docker://ghcr.io/me/img:1"
    assert loaded.build.platform == "linux/arm64"
    assert loaded.outputs.name == "vm"
