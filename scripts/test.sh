#!/usr/bin/env bash
# The project's test command: set up (idempotent), lint and type-check, then the whole pytest
# suite, including the real-kernel lab scenarios (marker `lab`).
# Extra arguments go to pytest, e.g. `scripts/test.sh -m "not lab"`.
# `--full` (first argument) runs the whole lab matrix, including the images CI
# leaves out (TLSHD_LAB_FULL=1, see tests/lab/README.md).
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "${1:-}" = --full ]; then
    export TLSHD_LAB_FULL=1
    shift
fi
bash scripts/setup.sh
.venv/bin/ruff check .
.venv/bin/ruff format --check .
bash scripts/mypy.sh
exec .venv/bin/python -m pytest -ra "$@"
