"""The GitHub Action's entry point (``action.yml``, run in ``action.Dockerfile``'s image).

GitHub runs a Docker container action as root with the workspace mounted at
``/github/workspace`` (owned by the runner's unprivileged user), the runner's Docker
socket at ``/var/run/docker.sock``, each input as an ``INPUT_<NAME>`` variable and a
``GITHUB_OUTPUT`` file for step outputs. This builds the recipe (or converts the
image) with oci2disk against that engine, optionally boots the disk under QEMU (TCG:
hosted runners have no KVM) until ``expect`` appears, optionally pushes it, hands the
outputs to the workspace's owner and writes the manifest's paths and digests as step
outputs. Paths in the outputs are relative to the workspace, so later steps (which
run on the runner, not in this container) can use them.

Host tools: those of ``oci2disk build`` and ``oci2disk boot`` (inside the image).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from oci2disk import run
from oci2disk.errors import Oci2DiskError, UsageError

DISK_FORMATS = ("qcow2", "raw", "vmdk", "vhdx", "vpc", "vdi")
# The firmware input: what the disk gets bootloaders for ("" lets oci2disk choose:
# bios,uefi on x86-64, uefi on arm64), and which firmware the boot check starts.
FIRMWARE = {"": None, "bios": "bios", "uefi": "uefi", "bios,uefi": None, "none": "none"}


@dataclass(frozen=True)
class ActionInputs:
    """The action's inputs, parsed from the ``INPUT_*`` environment."""

    recipe: str = ""
    image: str = ""
    name: str = "disk"
    formats: str = ""
    firmware: str = ""
    platform: str = ""
    output_dir: str = "oci2disk-out"
    build_args: tuple[str, ...] = ()
    expect: str = ""
    timeout: float = 600.0
    push: str = ""
    verbose: bool = False

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> ActionInputs:
        def get(name: str, default: str = "") -> str:
            # GitHub upper-cases the input name and keeps its hyphens.
            return env.get(f"INPUT_{name.upper()}", default).strip() or default

        timeout_text = get("timeout", "600")
        try:
            timeout = float(timeout_text)
        except ValueError:
            raise UsageError(f"input timeout: expected seconds, got {timeout_text!r}") from None
        inputs = cls(
            recipe=get("recipe"),
            image=get("image"),
            name=get("name", "disk"),
            formats=get("formats"),
            firmware=get("firmware").lower(),
            platform=get("platform"),
            output_dir=get("output-dir", "oci2disk-out"),
            build_args=tuple(
                line.strip() for line in get("build-args").splitlines() if line.strip()
            ),
            expect=get("expect"),
            timeout=timeout,
            push=get("push"),
            verbose=get("verbose", "false").lower() in ("1", "true", "yes"),
        )
        if bool(inputs.recipe) == bool(inputs.image):
            raise UsageError(
                "give the action exactly one of the inputs recipe and image",
                hint="recipe: a folder with recipe.toml; image: e.g. docker://ghcr.io/me/img:1",
            )
        if inputs.firmware not in FIRMWARE:
            raise UsageError(
                f"input firmware: {inputs.firmware!r} is not one oci2disk knows",
                hint="write bios,uefi (both, the default on x86-64), bios, uefi, or none "
                "(no bootloader: the boot check hands QEMU the kernel)",
            )
        return inputs


@dataclass(frozen=True)
class ActionResult:
    manifest: Path
    data: dict[str, Any]
    boot_log: Path | None
    pushed: tuple[dict[str, Any], ...]


def _oci2disk(args: Sequence[str], *, json_out: bool) -> str:
    """Run the oci2disk command line, its progress and logs going to the step's log."""
    argv = [sys.executable, "-m", "oci2disk.cli", *args]
    print(f"::group::{run.format_argv(['oci2disk', *args])}", flush=True)
    try:
        proc = run.start(argv, stdout=subprocess.PIPE if json_out else None, stderr=2)
        out, _ = proc.communicate()
    finally:
        print("::endgroup::", flush=True)
    if proc.returncode != 0:
        command = next(a for a in args if not a.startswith("-"))
        raise Oci2DiskError(
            f"oci2disk {command} failed (exit code {proc.returncode}); its error is above"
        )
    return (out or b"").decode()


def recipe_for_image(inputs: ActionInputs, folder: Path) -> Path:
    """A recipe that names an image instead of a Dockerfile (``[build] image = ...``)."""
    recipe = folder / inputs.name
    recipe.mkdir(parents=True)
    platform = f"platform = {json.dumps(inputs.platform)}\n" if inputs.platform else ""
    (recipe / "recipe.toml").write_text(
        f"[build]\nimage = {json.dumps(inputs.image)}\n{platform}\n"
        f"[outputs]\nname = {json.dumps(inputs.name)}\n"
    )
    return recipe


def run_action(inputs: ActionInputs, workspace: Path) -> ActionResult:
    """Build (or convert), boot-check, push; the outputs end up owned like ``workspace``."""
    outdir = (workspace / inputs.output_dir).resolve()
    outdir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="oci2disk-action-") as tmp:
        if inputs.recipe:
            recipe = (workspace / inputs.recipe).resolve()
        else:
            recipe = recipe_for_image(inputs, Path(tmp))
        args = ["--json", "build", os.fspath(recipe), "-o", os.fspath(outdir)]
        if inputs.verbose:
            args.insert(0, "-v")
        if inputs.formats:
            args += ["--format", inputs.formats]
        if inputs.platform:
            args += ["--platform", inputs.platform]
        for build_arg in inputs.build_args:
            args += ["--build-arg", build_arg]
        if inputs.firmware:
            args += ["--firmware", inputs.firmware]
        try:
            data: dict[str, Any] = json.loads(_oci2disk(args, json_out=True))
        finally:
            hand_over(outdir, workspace)
    manifest = _manifest_file(data, outdir)
    boot_log: Path | None = None
    try:
        if inputs.expect:
            disk = _boot_disk(data)
            log_file = disk.with_name(disk.name + ".boot.log")
            firmware = FIRMWARE[inputs.firmware]
            _oci2disk(
                ["boot", os.fspath(disk), "--expect", inputs.expect,
                 "--timeout", str(inputs.timeout), "--log", os.fspath(log_file),
                 *(("--firmware", firmware) if firmware else ())],
                json_out=False,
            )  # fmt: skip
            boot_log = log_file
        pushed: tuple[dict[str, Any], ...] = ()
        if inputs.push:
            from oci2disk.publish import push_outputs

            with tempfile.TemporaryDirectory(prefix=".push-", dir=outdir) as work:
                results = push_outputs(manifest, inputs.push, Path(work))
            pushed = tuple(r.to_json() for r in results)
    finally:
        hand_over(outdir, workspace)
    return ActionResult(manifest, data, boot_log, pushed)


def _manifest_file(data: Mapping[str, Any], outdir: Path) -> Path:
    from oci2disk.manifest import find_for_artifact

    for artifact in data.get("artifacts", []):
        found = find_for_artifact(Path(artifact["path"]))
        if found is not None:
            return found.path
    raise Oci2DiskError(f"the run wrote no manifest beside its outputs in {outdir}")


def _boot_disk(data: Mapping[str, Any]) -> Path:
    for fmt in DISK_FORMATS:
        for artifact in data.get("artifacts", []):
            if artifact["format"] == fmt:
                return Path(artifact["path"])
    raise UsageError(
        "the boot check (input expect) needs a disk output",
        hint=f"add one of {', '.join(DISK_FORMATS)} to the formats input, or leave expect empty",
    )


def hand_over(path: Path, workspace: Path) -> None:
    """Give ``path`` and everything below it to the owner of ``workspace``.

    The action runs as root in its container; the runner's later steps run as the
    runner's user, who must be able to upload, move and delete what it wrote.
    """
    st = workspace.stat()
    if os.geteuid() != 0 or not path.exists():
        return
    for root, dirs, files in os.walk(path):
        for name in (root, *(os.path.join(root, n) for n in (*dirs, *files))):
            os.lchown(name, st.st_uid, st.st_gid)


def step_outputs(result: ActionResult, workspace: Path) -> dict[str, str]:
    """The step outputs: paths relative to the workspace, digests as the manifest has them."""

    def rel(path: str | Path) -> str:
        try:
            return os.fspath(Path(path).resolve().relative_to(workspace.resolve()))
        except ValueError:
            return os.fspath(path)

    artifacts = [{**a, "path": rel(a["path"])} for a in result.data.get("artifacts", [])]
    outputs = {
        "manifest": rel(result.manifest),
        "digest": str(result.data.get("source", {}).get("digest", "")),
        "artifacts": json.dumps(artifacts, sort_keys=True),
        "boot": "passed" if result.boot_log else "skipped",
        "boot-log": rel(result.boot_log) if result.boot_log else "",
        "pushed": json.dumps(list(result.pushed), sort_keys=True),
    }
    for artifact in artifacts:
        fmt = str(artifact["format"])
        outputs.setdefault(fmt, str(artifact["path"]))
        outputs.setdefault(f"{fmt}-sha256", str(artifact["sha256"]))
    return outputs


def write_outputs(outputs: Mapping[str, str], github_output: Path) -> None:
    """Append ``name=value`` lines (values are single-line) to the GITHUB_OUTPUT file."""
    with github_output.open("a") as f:
        for name, value in outputs.items():
            if "\n" in value:
                raise ValueError(f"output {name} spans lines")
            f.write(f"{name}={value}\n")


def summary(result: ActionResult, outputs: Mapping[str, str]) -> str:
    """A Markdown table of the outputs for the run's summary page (GITHUB_STEP_SUMMARY)."""
    lines = [
        f"### oci2disk: {outputs['manifest']}",
        "",
        f"Source image `{outputs['digest']}`; boot check: {outputs['boot']}.",
        "",
        "| format | path | size | sha256 |",
        "|---|---|---:|---|",
    ]
    for artifact in json.loads(outputs["artifacts"]):
        lines.append(
            f"| {artifact['format']} | `{artifact['path']}` | {artifact['size']} "
            f"| `{artifact['sha256']}` |"
        )
    for pushed in result.pushed:
        lines.append(f"\nPushed the {pushed['shape']} to `{pushed['ref']}` ({pushed['digest']}).")
    return "\n".join(lines) + "\n"


def main() -> int:
    env = os.environ
    workspace = Path(env.get("GITHUB_WORKSPACE") or os.getcwd())
    try:
        inputs = ActionInputs.from_env(env)
        result = run_action(inputs, workspace)
        outputs = step_outputs(result, workspace)
        if env.get("GITHUB_OUTPUT"):
            write_outputs(outputs, Path(env["GITHUB_OUTPUT"]))
        if env.get("GITHUB_STEP_SUMMARY"):
            with Path(env["GITHUB_STEP_SUMMARY"]).open("a") as f:
                f.write(summary(result, outputs))
    except Oci2DiskError as exc:
        # ::error:: puts the message on the run's summary page.
        first, _, rest = str(exc).partition("\n")
        print(f"::error title=oci2disk::{first}", file=sys.stderr)
        if rest:
            print(rest, file=sys.stderr)
        return 1
    for name, value in outputs.items():
        print(f"{name}: {value}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
