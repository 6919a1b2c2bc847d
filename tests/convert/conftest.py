"""Lets the tests of single converter modules import them on this branch.

``oci2disk/convert/__init__.py`` imports modules that the restructuring in progress
moves (``oci2disk.flatten``, ``oci2disk.diskimage``); until those land here, the package
is entered as a namespace so that ``oci2disk.convert.squashfs`` and
``oci2disk.convert.iso`` (which need nothing from ``__init__``) can be imported. Delete
this file when the branch meets the restructured tree.
"""

from __future__ import annotations

import importlib
import sys
import types
from pathlib import Path

try:
    importlib.import_module("oci2disk.convert")
except ImportError:
    import oci2disk

    package = types.ModuleType("oci2disk.convert")
    package.__path__ = [str(Path(oci2disk.__file__).parent / "convert")]
    sys.modules["oci2disk.convert"] = package
