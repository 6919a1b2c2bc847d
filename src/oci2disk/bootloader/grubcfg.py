"""GRUB configuration text: the early config built into core.img / BOOTX64.EFI, and
/boot/grub/grub.cfg for the root filesystem.

The layout is Debian's own (what grub-install and update-grub make): the GRUB image only
finds the root filesystem by UUID and sets ``prefix=($root)/boot/grub``; GRUB's normal
mode then reads ``$prefix/grub.cfg``. So a guest that later installs grub and runs
``update-grub`` keeps booting with the image oci2disk wrote, and the other way round.

``grub_cfg()`` writes what grub-mkconfig's 00_header and 10_linux would write for the
same kernels, root UUID and /etc/default/grub of a Debian cloud image (serial and
console terminal, ``console=tty0 console=ttyS0,115200``), with no host-dependent parts
(no dates, no probed devices), so the same inputs give the same bytes.

Host tools: none (pure Python).
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

from oci2disk.bootloader.common import BootloaderError, GrubTarget

# Kernel consoles per architecture: the firmware's serial port last, so that it becomes
# /dev/console (systemd's status and the boot marker go there).
DEFAULT_CONSOLES = {
    "x86_64": "console=tty0 console=ttyS0,115200",
    "aarch64": "console=tty0 console=ttyAMA0",
}
_ARCH_NAMES = {"amd64": "x86_64", "x86_64": "x86_64", "arm64": "aarch64", "aarch64": "aarch64"}
_UUID = re.compile(r"^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$")

# Modules built into every GRUB image oci2disk makes: enough to find the root by UUID
# on MBR or GPT, read ext2/3/4, and run the grub.cfg below (and update-grub's) without
# any module file on the disk.
COMMON_MODULES: tuple[str, ...] = (
    "part_gpt",
    "part_msdos",
    "ext2",
    "search",
    "search_fs_uuid",
    "search_fs_file",
    "search_label",
    "normal",
    "configfile",
    "linux",
    "echo",
    "test",
    "gzio",
    "xzio",
    "lzopio",
    "serial",
    "terminal",
    "all_video",
    "gfxterm",
    "loadenv",
    "sleep",
    "reboot",
    "halt",
)
TARGET_MODULES: dict[GrubTarget, tuple[str, ...]] = {
    GrubTarget.I386_PC: ("biosdisk",),
    GrubTarget.X86_64_EFI: ("fat", "efi_gop", "efinet"),
    GrubTarget.ARM64_EFI: ("fat", "efi_gop"),
}


def image_modules(target: GrubTarget) -> tuple[str, ...]:
    """The modules built into the GRUB image for ``target``."""
    return TARGET_MODULES[target] + COMMON_MODULES


def check_uuid(uuid: str) -> str:
    if not _UUID.match(uuid):
        raise BootloaderError(
            f"{uuid!r} is not a filesystem UUID",
            hint="pass the UUID given to mke2fs -U (like 2f0c...-...)",
        )
    return uuid.lower()


def early_config(root_uuid: str) -> str:
    """The config built into the GRUB image: find the root by UUID, as Debian's load.cfg."""
    uuid = check_uuid(root_uuid)
    return f"search --no-floppy --fs-uuid --set=root {uuid}\nset prefix=($root)/boot/grub\n"


@dataclass(frozen=True)
class Kernel:
    """One kernel in /boot: the file names, relative to /boot."""

    version: str
    vmlinuz: str
    initrd: str | None


def kernels_in_boot(names: Iterable[str]) -> list[Kernel]:
    """The kernels among /boot's file names, newest first (10_linux's version sort).

    ``names`` are base names (``vmlinuz-6.1.0-28-amd64``); an ``initrd.img-VERSION``
    beside a kernel is its initrd.
    """
    present = set(names)
    kernels = []
    for name in present:
        if not name.startswith("vmlinuz-") or name.endswith((".dpkg-tmp", ".dpkg-new")):
            continue
        version = name[len("vmlinuz-") :]
        initrd = f"initrd.img-{version}"
        kernels.append(Kernel(version, name, initrd if initrd in present else None))
    return sorted(kernels, key=lambda k: _version_key(k.version), reverse=True)


def _version_key(version: str) -> tuple[tuple[int, int | str], ...]:
    """Natural order, like sort -V: numbers compare as numbers."""
    return tuple(
        (0, int(part)) if part.isdigit() else (1, part) for part in re.findall(r"\d+|\D+", version)
    )


def kernel_cmdline(root_uuid: str, extra: str = "", *, arch: str = "x86_64") -> str:
    """Debian's ``root=UUID=... ro`` plus the serial consoles of a cloud image and ``extra``."""
    try:
        consoles = DEFAULT_CONSOLES[_ARCH_NAMES[arch]]
    except KeyError:
        raise BootloaderError(
            f"no default console for architecture {arch!r}", hint="use amd64 or arm64"
        ) from None
    parts = [f"root=UUID={check_uuid(root_uuid)}", "ro", consoles]
    if extra.strip():
        parts.append(" ".join(extra.split()))
    return " ".join(parts)


def _quote(text: str) -> str:
    """grub_quote: single quotes, with ' written as '\\''."""
    return "'" + text.replace("'", "'\\''") + "'"


def grub_cfg(
    root_uuid: str,
    kernels: Iterable[Kernel],
    *,
    cmdline: str = "",
    arch: str = "x86_64",
    distributor: str = "Debian",
    timeout: int = 1,
    partmap: str = "gpt",
) -> str:
    """/boot/grub/grub.cfg as Debian's update-grub would write it for this root.

    ``cmdline`` is the user's extra kernel command line (after the defaults).
    ``partmap`` ("gpt" or "msdos") names the root partition's table, for its insmod.
    """
    uuid = check_uuid(root_uuid)
    found = list(kernels)
    if not found:
        raise BootloaderError(
            "the image has no kernel in /boot to boot with GRUB",
            hint="install a kernel in the image (Debian: linux-image-amd64 or "
            "linux-image-arm64, with initramfs-tools)",
        )
    if partmap not in ("gpt", "msdos"):
        raise BootloaderError(f"partition map {partmap!r} is neither gpt nor msdos")
    args = kernel_cmdline(uuid, cmdline, arch=arch)
    recovery_args = f"root=UUID={uuid} ro single {DEFAULT_CONSOLES[_ARCH_NAMES[arch]]}"
    if cmdline.strip():
        recovery_args += " " + " ".join(cmdline.split())
    os_name = f"{distributor} GNU/Linux"
    cls = f"--class {re.sub(r'[^A-Za-z0-9_]', '_', distributor.lower().split()[0])}"
    serial = _ARCH_NAMES[arch] == "x86_64"
    out = [_header(timeout, serial=serial), "### BEGIN /etc/grub.d/10_linux ###\n"]
    newest = found[0]
    out.append(
        f"menuentry {_quote(os_name)} {cls} --class gnu-linux --class gnu --class os "
        f"$menuentry_id_option 'gnulinux-simple-{uuid}' {{\n"
        + _entry_body(uuid, newest, args, partmap, os_name, indent="\t")
        + "}\n"
    )
    out.append(
        f"submenu {_quote('Advanced options for ' + os_name)} "
        f"$menuentry_id_option 'gnulinux-advanced-{uuid}' {{\n"
    )
    for kernel in found:
        for title, kind, kargs in (
            (f"{os_name}, with Linux {kernel.version}", "advanced", args),
            (f"{os_name}, with Linux {kernel.version} (recovery mode)", "recovery", recovery_args),
        ):
            out.append(
                f"\tmenuentry {_quote(title)} {cls} --class gnu-linux --class gnu --class os "
                f"$menuentry_id_option 'gnulinux-{kernel.version}-{kind}-{uuid}' {{\n"
                + _entry_body(uuid, kernel, kargs, partmap, os_name, indent="\t\t")
                + "\t}\n"
            )
    out.append("}\n\n### END /etc/grub.d/10_linux ###\n")
    out.append(_FOOTER)
    return "".join(out)


def _entry_body(
    uuid: str, kernel: Kernel, args: str, partmap: str, os_name: str, indent: str
) -> str:
    lines = [
        "load_video",
        "insmod gzio",
        "if [ x$grub_platform = xxen ]; then insmod xzio; insmod lzopio; fi",
        f"insmod part_{partmap}",
        "insmod ext2",
        f"search --no-floppy --fs-uuid --set=root {uuid}",
        f"echo\t{_quote(f'Loading Linux {kernel.version} ...')}",
        f"linux\t/boot/{kernel.vmlinuz} {args}",
    ]
    if kernel.initrd is not None:
        lines += [
            f"echo\t{_quote('Loading initial ramdisk ...')}",
            f"initrd\t/boot/{kernel.initrd}",
        ]
    return "".join(f"{indent}{line}\n" for line in lines)


# GRUB_TERMINAL="console serial" of Debian's amd64 cloud images. Not on arm64: GRUB has
# no port-I/O UART there (``serial`` fails: no com0), and UEFI's own console is already
# the PL011 serial port.
_SERIAL_TERMINAL = """serial --speed=115200
terminal_input console serial
terminal_output console serial
"""


def _header(timeout: int, *, serial: bool) -> str:
    """00_header with Debian cloud images' /etc/default/grub."""
    return f"""#
# DO NOT EDIT THIS FILE
#
# It is automatically generated by grub-mkconfig using templates
# from /etc/grub.d and settings from /etc/default/grub
# (this one was written by oci2disk in the same form)
#

### BEGIN /etc/grub.d/00_header ###
if [ -s $prefix/grubenv ]; then
  set have_grubenv=true
  load_env
fi
if [ "${{next_entry}}" ] ; then
   set default="${{next_entry}}"
   set next_entry=
   save_env next_entry
   set boot_once=true
else
   set default="0"
fi

if [ x"${{feature_menuentry_id}}" = xy ]; then
  menuentry_id_option="--id"
else
  menuentry_id_option=""
fi

export menuentry_id_option

if [ "${{prev_saved_entry}}" ]; then
  set saved_entry="${{prev_saved_entry}}"
  save_env saved_entry
  set prev_saved_entry=
  save_env prev_saved_entry
  set boot_once=true
fi

function savedefault {{
  if [ -z "${{boot_once}}" ]; then
    saved_entry="${{chosen}}"
    save_env saved_entry
  fi
}}
function load_video {{
  if [ x$feature_all_video_module = xy ]; then
    insmod all_video
  else
    insmod efi_gop
    insmod efi_uga
    insmod ieee1275_fb
    insmod vbe
    insmod vga
    insmod video_bochs
    insmod video_cirrus
  fi
}}

{_SERIAL_TERMINAL if serial else ""}if [ x$feature_timeout_style = xy ] ; then
  set timeout_style=menu
  set timeout={timeout}
# Fallback normal timeout code in case the timeout_style feature is
# unavailable.
else
  set timeout={timeout}
fi
### END /etc/grub.d/00_header ###

"""


_FOOTER = """
### BEGIN /etc/grub.d/30_uefi-firmware ###
### END /etc/grub.d/30_uefi-firmware ###

### BEGIN /etc/grub.d/40_custom ###
# This file provides an easy way to add custom menu entries.  Simply type the
# menu entries you want to add after this comment.  Be careful not to change
# the 'exec tail' line above.
### END /etc/grub.d/40_custom ###
"""
