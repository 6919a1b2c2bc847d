"""Lets tests import single converter modules on the sources branch.

``oci2disk/convert/__init__.py`` imports modules that the restructuring in progress
moves (``oci2disk.flatten``, ``oci2disk.diskimage``). Until those land on this branch,
importing this module enters ``oci2disk.convert`` as a plain namespace, so that
``oci2disk.convert.squashfs``, ``.iso`` and ``.cpio`` (which need nothing from the
package's ``__init__``) import. Import it before any ``oci2disk.convert`` module; delete
it and its imports when the branch meets the restructured tree.
"""

from __future__ import annotations

import importlib
import sys
import types
from pathlib import Path

import oci2disk

try:
    importlib.import_module("oci2disk.convert")
except ImportError:
    for name in [n for n in sys.modules if n.startswith("oci2disk.convert")]:
        del sys.modules[name]
    package = types.ModuleType("oci2disk.convert")
    package.__path__ = [str(Path(oci2disk.__file__).parent / "convert")]
    sys.modules["oci2disk.convert"] = package
