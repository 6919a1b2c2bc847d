"""Disks that boot on their own: which firmwares, where the bootloaders go, and their files.

The disk writer asks :func:`plan` once per run (before anything is written, so that an
impossible request fails with nothing made), lays the disk out with :func:`layout`, writes
:func:`rootfs_files` into the rootfs stream, and calls :func:`install` once the root
filesystem is in the file. The bytes themselves are written by :mod:`oci2disk.bootloader`.

GRUB's module folders come from the image when it ships them (grub-pc-bin,
grub-efi-amd64-bin, grub-efi-arm64-bin installed in it) and are of the host's GRUB
release, so the GRUB on the disk is the guest's own; otherwise from the host's Debian
packages.

Host tools: grub-mkimage (grub-common), mkfs.fat (dosfstools), mtools; the module folders
of grub-pc-bin and grub-efi-amd64-bin when the image has none.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from oci2disk import bootloader
from oci2disk.arch import Arch
from oci2disk.bootloader import GrubTarget, Role
from oci2disk.bootloader.common import grub_mkimage_version, modinfo
from oci2disk.bootloader.grubcfg import DEFAULT_CONSOLES
from oci2disk.bootloader.layout import GPT_LINUX
from oci2disk.convert.options import BootSpec, DiskSpec, Firmware, FstabMode, Table
from oci2disk.errors import ConvertError
from oci2disk.rootfs import ExtraFile, Kind, Tree

log = logging.getLogger("oci2disk.bootable")

# The firmwares each architecture has a bootloader for here, in the default's order.
FIRMWARES: dict[Arch, tuple[Firmware, ...]] = {
    Arch.X86_64: (Firmware.BIOS, Firmware.UEFI),
    Arch.AARCH64: (Firmware.UEFI,),
}
GRUB_DIR = "boot/grub"
GRUB_CFG = f"{GRUB_DIR}/grub.cfg"
ESP_MOUNT = "boot/efi"


@dataclass(frozen=True)
class BootPlan:
    """The bootloaders one disk gets."""

    firmware: tuple[Firmware, ...]
    arch: Arch
    kernels: tuple[bootloader.Kernel, ...]
    cmdline: str  # the user's part, after root=, ro and the consoles

    @property
    def bios(self) -> bool:
        return Firmware.BIOS in self.firmware

    @property
    def uefi(self) -> bool:
        return Firmware.UEFI in self.firmware

    @property
    def table(self) -> Table:
        return Table.GPT if self.uefi else Table.MBR

    def names(self) -> str:
        return ",".join(f.value for f in self.firmware)


def boot_names(tree: Tree) -> list[str]:
    """The base names of the entries directly in /boot."""
    return [
        e.path[len("boot/") :]
        for e in tree.entries()
        if e.path.startswith("boot/") and "/" not in e.path[len("boot/") :]
    ]


def plan(tree: Tree, arch: Arch | None, disk: DiskSpec, boot: BootSpec) -> BootPlan | None:
    """The bootloaders the disk gets, or None; refuses what cannot boot, with why."""
    asked = boot.firmware
    if asked == ():
        return None
    kernels = tuple(bootloader.kernels_in_boot(boot_names(tree)))
    if asked is None:  # the default: what the image can boot with, on the layout asked for
        if not kernels or arch not in FIRMWARES or disk.table is Table.NONE:
            return None
        if disk.root_partition != 1:
            return None  # a fixed layout (gem5's): keep it as it is
        chosen = FIRMWARES[arch]
        if disk.table_given and disk.table is Table.MBR:
            chosen = tuple(f for f in chosen if f is Firmware.BIOS)
        return BootPlan(chosen, arch, kernels, boot.cmdline) if chosen else None
    names = ",".join(f.value for f in asked)
    if disk.table is Table.NONE:
        raise ConvertError(
            f"cannot install bootloaders for {names} into a bare filesystem (--table none): "
            "a bootloader needs a partition table to live in; nothing was written",
            hint="use --table gpt (or mbr for BIOS only), or --firmware none",
        )
    if not kernels:
        raise ConvertError(
            f"cannot make the disk bootable with {names} firmware: the image has no kernel "
            "in /boot (no /boot/vmlinuz-VERSION), so a bootloader would have nothing to "
            "start; nothing was written",
            hint="install a kernel in the image (Debian: linux-image-amd64 or "
            "linux-image-arm64), or use --firmware none",
        )
    have = FIRMWARES.get(arch) if arch is not None else None
    missing = [f.value for f in asked if not have or f not in have]
    if missing:
        arch_name = arch.oci if arch is not None else "unknown"
        offered = ", ".join(f.value for f in have) if have else "none"
        raise ConvertError(
            f"no {' or '.join(missing)} bootloader for the image's architecture "
            f"{arch_name}: oci2disk installs GRUB for BIOS on amd64 and for UEFI on amd64 "
            "and arm64; nothing was written",
            hint=f"use --firmware {offered} for {arch_name} images"
            if have
            else "use --firmware none and boot the disk with oci2disk boot (-kernel)",
        )
    if Firmware.UEFI in asked and disk.table_given and disk.table is Table.MBR:
        raise ConvertError(
            "UEFI boot needs an EFI system partition in a GPT, and --table mbr was asked; "
            "nothing was written",
            hint="use --table gpt (or leave it out), or --firmware bios",
        )
    if disk.root_partition != 1:
        raise ConvertError(
            f"a disk with bootloaders keeps its root filesystem in partition 1, and "
            f"root_partition {disk.root_partition} was asked; nothing was written",
            hint="leave root_partition out, or use --firmware none",
        )
    return BootPlan(asked, arch or Arch.X86_64, kernels, boot.cmdline)


def table_for(plan_: BootPlan, disk: DiskSpec) -> Table:
    """GPT with UEFI (the ESP lives there); for BIOS alone, the table asked for (MBR by default)."""
    return plan_.table if plan_.uefi or not disk.table_given else disk.table


def layout(
    plan_: BootPlan, root_bytes: int, table: Table, arch: Arch | None
) -> bootloader.BootLayout:
    """The partitions: BIOS boot, ESP and root on GPT (Debian's cloud images), or the
    root alone after the MBR gap that holds core.img."""
    if table is Table.MBR:
        return bootloader.mbr_layout(root_bytes)
    root_type = arch.gpt_root.upper() if arch is not None else GPT_LINUX
    return bootloader.gpt_layout(root_bytes, bios=plan_.bios, esp=plan_.uefi, root_type=root_type)


def overhead(plan_: BootPlan, table: Table) -> int:
    """Bytes of the disk that are not the root filesystem."""
    empty = layout(plan_, 0, table, None)
    return empty.disk_bytes


def grub_cfg(plan_: BootPlan, root_uuid: str, table: Table, *, rw: bool) -> str:
    extra = " ".join(part for part in ("rw" if rw else "", plan_.cmdline) if part)
    return bootloader.grub_cfg(
        root_uuid,
        plan_.kernels,
        cmdline=extra,
        arch=plan_.arch.oci,
        partmap="gpt" if table is Table.GPT else "msdos",
    )


def esp_uuid(seed: str) -> str:
    return bootloader.fat_volume_uuid(bootloader.fat_volume_id(seed))


def fstab_line(seed: str) -> str:
    """Debian's line for the ESP, beside the root's."""
    return f"UUID={esp_uuid(seed)}\t/{ESP_MOUNT}\tvfat\tumask=0077\t0\t1\n"


def rootfs_files(
    plan_: BootPlan, root_uuid: str, table: Table, fstab: FstabMode
) -> list[ExtraFile]:
    """/boot/grub/grub.cfg, as the guest's update-grub would write it. Without an fstab,
    nothing remounts the root read-write, so the command line says ``rw`` itself."""
    text = grub_cfg(plan_, root_uuid, table, rw=fstab is FstabMode.NONE)
    return [ExtraFile(GRUB_CFG, text.encode())]


def guest_grub_files(plan_: BootPlan, tree: Tree) -> list[ExtraFile]:
    """/etc/default/grub when the image has update-grub but no settings for it (Debian
    ships them with grub-pc or grub-efi-amd64, not with the -bin packages)."""
    if not has_update_grub(tree) or tree.lookup("etc/default/grub") is not None:
        return []
    if tree.lookup("etc/default") is None:
        return []
    return [ExtraFile("etc/default/grub", default_grub(plan_).encode())]


def default_grub(plan_: BootPlan) -> str:
    """/etc/default/grub of Debian's cloud images (the consoles grub.cfg has, the user's
    command line), so that the guest's update-grub writes the same menu after a kernel
    update."""
    consoles = DEFAULT_CONSOLES[plan_.arch.uname]
    cmdline = " ".join(part for part in (consoles, plan_.cmdline) if part)
    terminal = (
        'GRUB_TERMINAL="console serial"\nGRUB_SERIAL_COMMAND="serial --speed=115200"\n'
        if plan_.arch is Arch.X86_64
        else ""
    )
    return (
        "# Written by oci2disk with the settings of the grub.cfg it wrote; update-grub reads it\n"
        "GRUB_DEFAULT=0\n"
        "GRUB_TIMEOUT=1\n"
        "GRUB_DISTRIBUTOR=`lsb_release -i -s 2> /dev/null || echo Debian`\n"
        'GRUB_CMDLINE_LINUX_DEFAULT=""\n'
        f'GRUB_CMDLINE_LINUX="{cmdline}"\n' + terminal
    )


def has_update_grub(tree: Tree) -> bool:
    return any(
        tree.lookup(path) is not None for path in ("usr/sbin/update-grub", "usr/sbin/grub-mkconfig")
    )


@dataclass(frozen=True)
class ModuleFolder:
    path: Path
    origin: str  # "image" or "host"


def modules(tree: Tree, target: GrubTarget, workdir: Path) -> ModuleFolder:
    """The image's GRUB module folder for ``target`` when it has one of the host's GRUB
    release (so update-grub in the guest keeps the GRUB it shipped), else the host's."""
    prefix = f"usr/lib/grub/{target.value}/"
    wanted = [e for e in tree.entries() if e.path.startswith(prefix) and e.kind is Kind.FILE]
    if wanted:

        def files() -> list[tuple[str, bytes]]:
            out = []
            for entry in wanted:
                with tree.open(entry.path) as f:
                    out.append((entry.path, f.read()))
            return out

        folder = bootloader.write_modules_dir(files(), target, workdir / target.value)
        if folder is not None:
            version = modinfo(folder).get("grub_version")
            if version is None or version == grub_mkimage_version():
                return ModuleFolder(folder, "image")
            log.info(
                "the image's GRUB %s modules do not match the host's grub-mkimage (%s); "
                "using the host's",
                version,
                grub_mkimage_version(),
            )
    return ModuleFolder(target.host_modules_dir, "host")


@dataclass(frozen=True)
class Installed:
    """What went onto the disk, for the manifest."""

    firmware: tuple[str, ...]
    bios_core: bool  # core.img embedded (BIOS boot partition or MBR gap)
    efi_loader: str | None  # /EFI/BOOT/BOOTX64.EFI
    esp_uuid: str | None
    grub_cfg: str
    modules: tuple[tuple[str, str], ...]  # (GRUB target, "image" or "host")


def install(
    plan_: BootPlan,
    tree: Tree,
    disk: Path,
    boot_layout: bootloader.BootLayout,
    *,
    root_uuid: str,
    seed: str,
    epoch: int,
    workdir: Path,
) -> Installed:
    """GRUB into ``disk`` (its table and root filesystem written): core.img for BIOS, the
    ESP with the removable-media loader for UEFI."""
    origins: list[tuple[str, str]] = []
    bios_modules = efi_modules = None
    efi_target = None
    if plan_.bios:
        found = modules(tree, GrubTarget.I386_PC, workdir)
        bios_modules = found.path
        origins.append((GrubTarget.I386_PC.value, found.origin))
    if plan_.uefi:
        efi_target = GrubTarget.efi_for_arch(plan_.arch.oci)
        found = modules(tree, efi_target, workdir)
        efi_modules = found.path
        origins.append((efi_target.value, found.origin))
    done = bootloader.install(
        disk,
        boot_layout,
        root_uuid=root_uuid,
        bios_modules=bios_modules,
        efi_target=efi_target,
        efi_modules=efi_modules,
        seed=seed,
        epoch=epoch,
        workdir=workdir,
    )
    assert (boot_layout.get(Role.ESP) is not None) == plan_.uefi
    return Installed(
        firmware=tuple(f.value for f in plan_.firmware),
        bios_core=done.bios,
        efi_loader=done.efi_loader,
        esp_uuid=done.esp_uuid,
        grub_cfg="/" + GRUB_CFG,
        modules=tuple(origins),
    )
