"""CPU architectures: one table, asked questions instead of looked up in scattered dicts.

Each :class:`Arch` knows its names (OCI, Debian, ``uname -m``), how QEMU runs it, its
serial console, the ELF machine number, the Discoverable Partitions root type for GPT
and the removable-media name of its EFI bootloader.
"""

from __future__ import annotations

import enum
import os
from dataclasses import dataclass

from oci2disk.errors import UsageError


@dataclass(frozen=True)
class _ArchInfo:
    oci: str  # GOARCH, as OCI platforms and Docker name it
    debian: str  # dpkg's architecture name
    uname: str  # `uname -m`
    elf_machine: int  # e_machine of its ELF binaries
    qemu: str  # qemu-system-* binary
    machine: str  # QEMU -M
    console: str  # the serial console's device name
    # -cpu under TCG. For aarch64, "max" with QEMU's own pointer-authentication
    # algorithm instead of QARMA, which TCG emulates several times slower.
    tcg_cpu: str
    gpt_root: str  # Discoverable Partitions root type GUID (lower case)
    efi_boot: str  # removable-media bootloader name on an ESP ("" when none)
    variant: str = ""  # OCI platform variant


class Arch(enum.Enum):
    """An architecture oci2disk builds, converts and boots."""

    X86_64 = _ArchInfo(
        oci="amd64",
        debian="amd64",
        uname="x86_64",
        elf_machine=0x3E,
        qemu="qemu-system-x86_64",
        machine="pc",
        console="ttyS0",
        tcg_cpu="max",
        gpt_root="4f68bce3-e8cd-4db1-96e7-fbcaf984b709",
        efi_boot="BOOTX64.EFI",
    )
    AARCH64 = _ArchInfo(
        oci="arm64",
        debian="arm64",
        uname="aarch64",
        elf_machine=0xB7,
        qemu="qemu-system-aarch64",
        machine="virt",
        console="ttyAMA0",
        tcg_cpu="max,pauth-impdef=on",
        gpt_root="b921b045-1df0-41c3-af44-4c6f280d3fae",
        efi_boot="BOOTAA64.EFI",
        variant="v8",
    )
    ARM = _ArchInfo(
        oci="arm",
        debian="armhf",
        uname="armv7l",
        elf_machine=0x28,
        qemu="qemu-system-arm",
        machine="virt",
        console="ttyAMA0",
        tcg_cpu="max",
        gpt_root="69dad710-2ce4-4e3c-b16c-21a1d49abed3",
        efi_boot="BOOTARM.EFI",
        variant="v7",
    )
    I386 = _ArchInfo(
        oci="386",
        debian="i386",
        uname="i686",
        elf_machine=0x03,
        qemu="qemu-system-i386",
        machine="pc",
        console="ttyS0",
        tcg_cpu="max",
        gpt_root="44479540-f297-41b2-9af7-d131d5f0458a",
        efi_boot="BOOTIA32.EFI",
    )
    PPC64LE = _ArchInfo(
        oci="ppc64le",
        debian="ppc64el",
        uname="ppc64le",
        elf_machine=0x15,
        qemu="qemu-system-ppc64",
        machine="pseries",
        console="hvc0",
        tcg_cpu="max",
        gpt_root="c31c45e6-3f39-412e-80fb-4809c4980599",
        efi_boot="",
    )
    S390X = _ArchInfo(
        oci="s390x",
        debian="s390x",
        uname="s390x",
        elf_machine=0x16,
        qemu="qemu-system-s390x",
        machine="s390-ccw-virtio",
        console="ttysclp0",
        tcg_cpu="max",
        gpt_root="5eead9a9-fe09-4a1e-a1d7-520d00531306",
        efi_boot="",
    )
    RISCV64 = _ArchInfo(
        oci="riscv64",
        debian="riscv64",
        uname="riscv64",
        elf_machine=0xF3,
        qemu="qemu-system-riscv64",
        machine="virt",
        console="ttyS0",
        tcg_cpu="max",
        gpt_root="72ec70a6-cf74-40e6-bd49-4bda08e8f224",
        efi_boot="BOOTRISCV64.EFI",
    )

    # ------------------------------------------------------------------ questions

    @property
    def oci(self) -> str:
        return self.value.oci

    @property
    def debian(self) -> str:
        return self.value.debian

    @property
    def uname(self) -> str:
        return self.value.uname

    @property
    def elf_machine(self) -> int:
        return self.value.elf_machine

    @property
    def qemu(self) -> str:
        return self.value.qemu

    @property
    def machine(self) -> str:
        return self.value.machine

    @property
    def console(self) -> str:
        return self.value.console

    @property
    def tcg_cpu(self) -> str:
        return self.value.tcg_cpu

    @property
    def gpt_root(self) -> str:
        return self.value.gpt_root

    @property
    def efi_boot(self) -> str:
        return self.value.efi_boot

    @property
    def variant(self) -> str:
        return self.value.variant

    def can_boot(self) -> bool:
        """Whether ``oci2disk boot`` knows how to start a kernel of this architecture."""
        return self in (Arch.X86_64, Arch.AARCH64)

    @classmethod
    def host(cls) -> Arch:
        return cls.parse(os.uname().machine)

    @classmethod
    def from_elf_machine(cls, machine: int) -> Arch | None:
        return next((a for a in cls if a.elf_machine == machine), None)

    @classmethod
    def parse(cls, name: str) -> Arch:
        """Any of an architecture's names (``amd64``, ``x86_64``, ``arm64``, ``aarch64``...)."""
        key = name.strip().lower()
        for arch in cls:
            info = arch.value
            if key in (info.oci, info.debian, info.uname, arch.name.lower()):
                return arch
        if key in ("i386", "i586", "x86"):
            return cls.I386
        if key in ("armv7", "armhf", "arm32"):
            return cls.ARM
        known = ", ".join(a.oci for a in cls)
        raise UsageError(f"unknown architecture {name!r}", hint=f"use one of: {known}")

    @classmethod
    def lookup(cls, name: str) -> Arch | None:
        try:
            return cls.parse(name)
        except UsageError:
            return None
