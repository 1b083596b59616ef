#!/usr/bin/env bash
# The project's test command: set up (idempotent), lint and type-check, then the whole pytest
# suite, including the real-kernel lab scenarios (marker `lab`).
# Extra arguments go to pytest, e.g. `scripts/test.sh -m "not lab"`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/ruff check .
.venv/bin/ruff format --check .
bash scripts/mypy.sh
exec .venv/bin/python -m pytest -ra "$@"
