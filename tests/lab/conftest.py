"""Fixtures of the real-kernel lab tests (``pytest -m lab``).

One guest boot per image and daemon kind runs every NFS scenario in sequence
(guest/nfs_scenarios.py); the tests assert on the JSON each scenario wrote.
Results are kept in ``$TLSHD_LAB_RESULTS/<daemon>`` (``<image>-<daemon>`` for
images other than trixie) when that is set, otherwise in pytest's temporary
directory (printed on failure).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.lab.vm import DEFAULT_PROFILE, GuestResult, results_subdir, run_guest

NFS_SCRIPT = "#!/bin/sh\nexec python3 /lab/run/nfs_scenarios.py\n"
_runs: dict[tuple[str, str], GuestResult] = {}


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Lab tests boot QEMU as root: skipped when not root or when TLSHD_LAB=0.

    Select or drop them with the marker: ``-m lab`` / ``-m "not lab"``.
    """
    if os.environ.get("TLSHD_LAB") == "0":
        reason = "real-kernel lab disabled by TLSHD_LAB=0"
    elif os.geteuid() != 0:
        reason = "real-kernel lab needs root (debootstrap, chroot, QEMU 9p shares)"
    else:
        return
    skip = pytest.mark.skip(reason=reason)
    for item in items:
        if "lab" in item.keywords:
            item.add_marker(skip)


def tail(text: str, n: int = 40) -> str:
    return "\n".join(text.splitlines()[-n:])


@pytest.fixture(scope="session")
def nfs_lab(tmp_path_factory: pytest.TempPathFactory) -> Callable[..., GuestResult]:
    """``nfs_lab(daemon, image="trixie")``: the (cached) guest run of all NFS scenarios."""

    def get(daemon: str, image: str = DEFAULT_PROFILE) -> GuestResult:
        if (image, daemon) not in _runs:
            base = os.environ.get("TLSHD_LAB_RESULTS")
            name = results_subdir(image, daemon)
            out = Path(base) / name if base else tmp_path_factory.mktemp(f"lab-{name}")
            _runs[image, daemon] = run_guest(NFS_SCRIPT, daemon=daemon, timeout=1200,
                                             results_dir=out, image=image)  # fmt: skip
        return _runs[image, daemon]

    return get


@pytest.fixture
def scenario(nfs_lab: Callable[..., GuestResult]) -> Callable[..., dict]:
    """``scenario(daemon, name, image="trixie")``: that scenario's JSON, or a failure
    that says why."""

    def get(daemon: str, name: str, image: str = DEFAULT_PROFILE) -> dict:
        res = nfs_lab(daemon, image)
        where = f"{image} image, kernel {res.kernel}, results in {res.results_dir}"
        data = res.scenario(name)
        if data is None:
            setup = res.scenario("setup") or {}
            pytest.fail(
                f"{daemon}: scenario {name} left no result ({where}; guest rc={res.returncode}, "
                f"timed out={res.timed_out}); setup: {setup.get('error')}\n"
                f"--- scenario.log\n{tail(res.text('scenario.log'))}\n"
                f"--- daemon-{daemon}.log\n{tail(res.text(f'daemon-{daemon}.log'))}\n"
                f"--- console\n{tail(res.console_log.read_text(errors='replace'), 20)}"
            )
        data["_where"] = where
        data["_daemon_log"] = tail(res.text(f"daemon-{daemon}.log"), 30)
        return data

    return get
