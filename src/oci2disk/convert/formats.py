"""The output formats: one line each. A new format is a module declaring an
:class:`~oci2disk.convert.plugin.OutputFormat` and one line here.

Host tools: those each format declares.
"""

from __future__ import annotations

import enum

from oci2disk.convert import cpio, directory, disk, iso, kernel, qemu, squashfs, tar
from oci2disk.convert.plugin import OutputFormat
from oci2disk.errors import UsageError


class Format(enum.Enum):
    """Every output format, in the order ``--help`` lists them."""

    _value_: OutputFormat

    RAW = disk.RAW
    QCOW2 = qemu.QCOW2
    VMDK = qemu.VMDK
    VHDX = qemu.VHDX
    VPC = qemu.VPC
    VDI = qemu.VDI
    FS = disk.FS
    TAR = tar.TAR
    CGZ = cpio.CGZ
    DIR = directory.DIR
    KERNEL = kernel.KERNEL
    SQUASHFS = squashfs.SQUASHFS
    ISO = iso.ISO

    @property
    def plugin(self) -> OutputFormat:
        return self.value

    @property
    def label(self) -> str:
        """The name users write: "qcow2"."""
        return self.value.name

    def __str__(self) -> str:
        return self.value.name

    @classmethod
    def find(cls, text: str) -> Format | None:
        """The format called ``text`` (or one of its other names), None when none is."""
        key = text.strip().lower()
        for fmt in cls:
            if key == fmt.value.name or key in fmt.value.aliases:
                return fmt
        return None

    @classmethod
    def names(cls) -> str:
        """Every format name, for messages: "raw, qcow2, ... (vhd is another name for vpc)"."""
        others = [f"{a} is another name for {f.label}" for f in cls for a in f.value.aliases]
        return ", ".join(f.label for f in cls) + (f" ({'; '.join(others)})" if others else "")

    @classmethod
    def parse(cls, text: str) -> Format:
        fmt = cls.find(text)
        if fmt is None:
            raise UsageError(f"unknown output format {text!r}", hint=f"formats: {cls.names()}")
        return fmt
