"""What every bootloader module shares: the error type, GRUB targets, byte helpers.

Host tools: none (pure Python).
"""

from __future__ import annotations

import enum
import hashlib
import os
import re
import tempfile
from collections.abc import Iterable, Sequence
from functools import cache
from pathlib import Path

from oci2disk import run
from oci2disk.errors import ConvertError

SECTOR = 512
MiB = 1 << 20


class BootloaderError(ConvertError):
    """A bootloader could not be built or written into the disk file."""


class GrubTarget(enum.Enum):
    """A GRUB platform: the name of its module folder (``/usr/lib/grub/<name>``)."""

    I386_PC = "i386-pc"
    X86_64_EFI = "x86_64-efi"
    ARM64_EFI = "arm64-efi"

    @property
    def is_efi(self) -> bool:
        return self is not GrubTarget.I386_PC

    @property
    def removable_path(self) -> str:
        """Where UEFI firmware looks for a loader on a disk it has no boot entry for."""
        names = {GrubTarget.X86_64_EFI: "BOOTX64.EFI", GrubTarget.ARM64_EFI: "BOOTAA64.EFI"}
        if self not in names:
            raise BootloaderError(f"GRUB {self.value} is not an EFI target")
        return f"EFI/BOOT/{names[self]}"

    @property
    def debian_package(self) -> str:
        return {
            GrubTarget.I386_PC: "grub-pc-bin",
            GrubTarget.X86_64_EFI: "grub-efi-amd64-bin",
            GrubTarget.ARM64_EFI: "grub-efi-arm64-bin",
        }[self]

    @property
    def host_modules_dir(self) -> Path:
        """Where Debian's package puts the modules on the host."""
        return Path("/usr/lib/grub", self.value)

    @classmethod
    def efi_for_arch(cls, arch: str) -> GrubTarget:
        """The EFI target for an architecture named as Debian (amd64) or the kernel (x86_64)."""
        table = {
            "amd64": cls.X86_64_EFI,
            "x86_64": cls.X86_64_EFI,
            "arm64": cls.ARM64_EFI,
            "aarch64": cls.ARM64_EFI,
        }
        try:
            return table[arch]
        except KeyError:
            raise BootloaderError(
                f"no UEFI GRUB target for architecture {arch!r}",
                hint="UEFI boot is supported for amd64 and arm64",
            ) from None


def require_modules_dir(modules_dir: Path, target: GrubTarget) -> None:
    """Fail with the package to install when ``modules_dir`` is not a GRUB module folder
    for ``target`` of the same GRUB release as the host's grub-mkimage."""
    if not (modules_dir / "moddep.lst").is_file():
        raise BootloaderError(
            f"{os.fspath(modules_dir)} is not a GRUB {target.value} module folder "
            "(it has no moddep.lst)",
            hint=f"install {target.debian_package} on the host (it fills "
            f"{os.fspath(target.host_modules_dir)}), or use an image that ships it",
        )
    info = modinfo(modules_dir)
    platform = f"{info.get('grub_modinfo_target_cpu')}-{info.get('grub_modinfo_platform')}"
    if "grub_modinfo_platform" in info and platform != target.value:
        raise BootloaderError(
            f"{os.fspath(modules_dir)} holds GRUB modules for {platform}, not {target.value}",
            hint=f"use the {target.value} folder ({target.debian_package})",
        )
    have, tool = info.get("grub_version"), grub_mkimage_version()
    # kernel.img and the module format change between GRUB releases: grub-mkimage of
    # one release makes images that do not boot from modules of another.
    if have and tool and have != tool:
        raise BootloaderError(
            f"the GRUB modules in {os.fspath(modules_dir)} are GRUB {have} but the host's "
            f"grub-mkimage is GRUB {tool}",
            hint=f"use the host's own module folder ({os.fspath(target.host_modules_dir)}), "
            f"or install grub-common {have} on the host (Debian bookworm-backports has 2.12)",
        )


def mkimage(
    modules_dir: Path, target: GrubTarget, early_config: str, modules: Sequence[str], what: str
) -> bytes:
    """``grub-mkimage`` of ``target`` from ``modules_dir`` with ``early_config`` embedded
    and prefix /boot/grub: core.img for i386-pc, the EFI executable for the EFI targets."""
    require_modules_dir(modules_dir, target)
    with tempfile.TemporaryDirectory(prefix="oci2disk-grub-") as tmp:
        config = Path(tmp, "early.cfg")
        config.write_text(early_config)
        out = Path(tmp, "grub.img")
        run.run(
            [
                "grub-mkimage",
                "--format",
                target.value,
                "--directory",
                os.fspath(modules_dir),
                "--prefix",
                "/boot/grub",
                "--config",
                os.fspath(config),
                "--output",
                os.fspath(out),
                *modules,
            ],
            what=f"grub-mkimage could not build {what}",
            hint=f"check that {os.fspath(modules_dir)} is a complete GRUB {target.value} "
            f"module folder ({target.debian_package}) of the same GRUB version as grub-mkimage",
        )
        return out.read_bytes()


def write_modules_dir(
    files: Iterable[tuple[str, bytes]], target: GrubTarget, dest: Path
) -> Path | None:
    """Write the image's GRUB module folder for ``target`` into ``dest`` and return it.

    ``files`` are the image's regular files as (path relative to /, content); only those
    under usr/lib/grub/<target>/ are written. Returns None when the image has none.
    """
    prefix = f"usr/lib/grub/{target.value}/"
    count = 0
    dest.mkdir(parents=True, exist_ok=True)
    for path, data in files:
        name = path.removeprefix("./").removeprefix("/")
        if not name.startswith(prefix):
            continue
        rest = name[len(prefix) :]
        if not rest or "/" in rest or rest in (".", ".."):
            continue  # GRUB's folders are flat; anything else is not ours to write
        (dest / rest).write_bytes(data)
        count += 1
    return dest if count else None


def modinfo(modules_dir: Path) -> dict[str, str]:
    """The shell variables of the folder's modinfo.sh (grub_version, grub_modinfo_platform ...)."""
    try:
        text = (modules_dir / "modinfo.sh").read_text(errors="replace")
    except OSError:
        return {}
    found = re.findall(r"^(grub_\w+)=['\"]?([^'\"\n]*)['\"]?$", text, re.MULTILINE)
    return dict(found)


@cache
def grub_mkimage_version() -> str | None:
    """The GRUB release of the host's grub-mkimage ("2.06"), or None if it does not say."""
    out = run.run(["grub-mkimage", "--version"], what="grub-mkimage --version failed").stdout
    match = re.search(r"\(GRUB\) (\d+\.\d+)", out.decode(errors="replace"))
    return match.group(1) if match else None


def fat_volume_id(seed: str) -> int:
    """A 32-bit FAT volume serial that depends only on ``seed`` (e.g. the image digest)."""
    return int.from_bytes(hashlib.sha256(b"oci2disk-esp\0" + seed.encode()).digest()[:4], "big")


def fat_volume_uuid(volume_id: int) -> str:
    """The volume serial as blkid and /etc/fstab spell it (``UUID=ABCD-1234``)."""
    return f"{volume_id >> 16:04X}-{volume_id & 0xFFFF:04X}"


def write_at(disk: Path, offset: int, data: bytes) -> None:
    """Write ``data`` into the file at ``offset`` without truncating it."""
    with disk.open("r+b") as f:
        f.seek(offset)
        f.write(data)


def read_at(disk: Path, offset: int, size: int) -> bytes:
    with disk.open("rb") as f:
        f.seek(offset)
        data = f.read(size)
    if len(data) != size:
        raise BootloaderError(
            f"{os.fspath(disk)} ends before byte {offset + size}: it is too small for the layout",
            hint="write the partition table and size the file before installing the bootloader",
        )
    return data
