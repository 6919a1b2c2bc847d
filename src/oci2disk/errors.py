"""One exception tree for the whole tool.

Library code raises these with a message a user can act on and, where there is one,
a hint that says how to fix it. Only ``cli.main`` turns them into output and exit codes.
"""

from __future__ import annotations


class Oci2DiskError(Exception):
    """Base of every error oci2disk raises on purpose."""

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        if self.hint:
            return f"{self.message}\nhint: {self.hint}"
        return self.message


class UsageError(Oci2DiskError):
    """The command line itself is wrong (exit code 2)."""


class RecipeError(Oci2DiskError):
    """recipe.toml is missing, malformed, or names something that is not there."""


class RefError(Oci2DiskError):
    """An image reference could not be parsed or does not resolve."""


class ToolMissingError(Oci2DiskError):
    """A host program is not installed."""


class CommandError(Oci2DiskError):
    """An external command failed; carries the command line, exit code and stderr tail."""

    def __init__(
        self,
        message: str,
        *,
        argv: list[str],
        returncode: int,
        stderr_tail: str,
        hint: str | None = None,
    ) -> None:
        super().__init__(message, hint=hint)
        self.argv = argv
        self.returncode = returncode
        self.stderr_tail = stderr_tail


class BuildError(Oci2DiskError):
    """Building the image from a Dockerfile failed."""


class ImageError(Oci2DiskError):
    """An image (layout, archive, blob) is malformed or fails its digest check."""


class LayerError(ImageError):
    """A layer holds an entry that cannot be applied safely (traversal, bad link ...)."""


class ConvertError(Oci2DiskError):
    """A conversion could not produce its output."""


class VerifyError(Oci2DiskError):
    """An artifact could not be read for verification (not: it differs)."""


class BootError(Oci2DiskError):
    """QEMU could not be started or the guest did not reach the expected output."""
