"""One guest boot that runs one scenario script: where its results go, and
its scenario JSON or a test failure that shows why (the lab tests on one
image: accept_keyring, concat, pq, record_size)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

from tests.lab.vm import GuestResult


def results_dir(name: str, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`$TLSHD_LAB_RESULTS/<name>` when set (results kept), else a pytest temp dir."""
    base = os.environ.get("TLSHD_LAB_RESULTS")
    return Path(base) / name if base else tmp_path_factory.mktemp(f"lab-{name}")


def scenario_or_fail(run: GuestResult, name: str) -> dict[str, Any]:
    """The scenario's JSON; a failed test with its error and the scenario
    log's tail if the scenario did not finish or reported an error."""
    data = run.scenario(name)
    if data is None or "error" in data:
        log = "\n".join(run.text("scenario.log").splitlines()[-40:])
        pytest.fail(f"{data and data.get('error')} (results in {run.results_dir})\n{log}")
    return data
