"""What an output format declares: the plugin contract of the converters.

An output format is one module that makes an :class:`OutputFormat` (its name, default
file name, host tools, whether it is a disk, its writer) and one line in
:class:`oci2disk.convert.formats.Format`.

Host tools: none.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from oci2disk.convert.job import Job
    from oci2disk.convert.options import ConvertOptions

# Write the output into ``out`` (a temporary name beside the target, or an empty
# directory); raise to fail the run.
Writer = Callable[["Job", Path], None]
# The default file name of the output of a build called NAME: "disk.qcow2", "vmlinuz".
Namer = Callable[[str, "ConvertOptions"], str]


@dataclass(frozen=True)
class Tool:
    """A host program a format needs, and the Debian package that ships it."""

    program: str
    package: str


@dataclass(frozen=True, eq=False)
class OutputFormat:
    name: str  # what users write: "qcow2"
    summary: str  # one line for --help
    write: Writer
    output_name: Namer
    tools: tuple[Tool, ...] = ()
    aliases: tuple[str, ...] = ()  # other names users may write ("vhd" for vpc)
    disk: bool = False  # a disk or filesystem image: /etc/fstab names its filesystem
    raw: bool = False  # the output is the shared raw disk itself, built in place
    from_raw: bool = False  # made from the shared raw disk, so it waits for it
    directory: bool = False  # the output is a directory, not a file
    preflight: Callable[[], None] | None = None  # a check beyond "the tools are installed"


def named(suffix: str) -> Namer:
    """The usual default file name: NAME.SUFFIX."""

    def name(base: str, options: ConvertOptions) -> str:
        return f"{base}.{suffix}"

    return name
