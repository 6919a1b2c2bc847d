#!/usr/bin/env bash
# The test command: set up the host if needed, then lint, type-check, check the import
# layers (pyproject.toml [tool.importlinter]) and run every test
# (slow ones included: they build images with the real Docker Engine and boot QEMU).
set -euo pipefail
cd "$(dirname "$0")"
OCI2DISK_SETUP_TESTS=1 ./setup.sh
.venv/bin/ruff check src tests bench
.venv/bin/ruff format --check src tests bench
.venv/bin/mypy
.venv/bin/lint-imports
.venv/bin/pytest "$@"
