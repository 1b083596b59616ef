"""The ACCEPT KEYRING attribute (Linux 6.17) with a real NVMe/TCP connect.

One boot of the ``forky`` image (7.3) runs guest/accept_keyring_scenario.py:
the host PSK lives only in a keyring of its own, passed to the kernel as the
connect option ``keyring=`` (what ``nvme connect --keyring`` is for; nvme-cli
2.16 did not pass it on); our daemon must see that keyring in ACCEPT, read
the key for the host's handshakes and report its serial back (the host
key_lookup()s it), with I/O through the namespace.  Measured 2026-11-29 on
7.3.4: both queues' host and target handshakes status 0, the controller's
tls_key is the tenant keyring's key, 1 MiB written and read back.
Run: ``pytest -m lab tests/lab/test_accept_keyring.py``.
"""

from __future__ import annotations

from typing import Any

import pytest

from tests.lab.scenario_runs import results_dir, scenario_or_fail
from tests.lab.vm import GuestResult, run_guest

pytestmark = [pytest.mark.lab, pytest.mark.timeout(1800)]
IMAGE = "forky"
SCRIPT = "#!/bin/sh\nexec python3 /lab/run/accept_keyring_scenario.py\n"
QUEUES = 2  # admin + one I/O queue, as tests/lab/test_nvme.py


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> GuestResult:
    out = results_dir(f"keyring-{IMAGE}", tmp_path_factory)
    return run_guest(SCRIPT, daemon="ours", timeout=600, results_dir=out, image=IMAGE)


@pytest.fixture(scope="module")
def sc(run: GuestResult) -> dict[str, Any]:
    return scenario_or_fail(run, "accept_keyring")


def test_kernel_names_the_keyring(sc: dict[str, Any]) -> None:
    major, minor = (int(n) for n in sc["kernel"].split(".")[:2])
    assert (major, minor) >= (6, 17), sc["kernel"]
    ring = sc["keys"]["ring"]
    assert any(f"ACCEPT keyring {ring}" in ln for ln in sc["accept_keyring_log"]), sc[
        "accept_keyring_log"
    ]


def test_connect_uses_the_key_from_that_keyring(sc: dict[str, Any]) -> None:
    assert sc["connect"]["rc"] == 0, sc["connect"]
    host_key = sc["keys"]["host_key"]["serial"]
    assert sc["keys"]["target_keys"], "the target's copy in .nvme is missing"
    assert host_key not in [k["serial"] for k in sc["keys"]["target_keys"]]
    assert sc["tls_key_serial"] == host_key, sc["ctrl"]
    hs = sc["hs"]
    assert hs["client_ok"] == QUEUES and hs["server_ok"] == QUEUES, hs
    assert not hs["failed_status"], hs


def test_io_through_the_namespace(sc: dict[str, Any]) -> None:
    io = sc["io"]
    assert io["write_ok"] and io["read_back_same"] and io["target_file_same"], io
    assert sc["disconnect"]["rc"] == 0, sc["disconnect"]
