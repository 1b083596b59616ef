"""NVMe/TCP secure channel concatenation (``nvme connect --concat``), Linux >= 6.15.

One boot of the ``forky`` image (7.3) runs guest/concat_scenario.py: no PSK
is provisioned; the host authenticates with DH-HMAC-CHAP (``--dhchap-secret``,
nvmet's ``hosts/<hostnqn>/dhchap_*``, port ``addr_tsas`` tls1.3 with
``addr_treq`` "not required"), host and nvmet derive the TLS PSK into
``.nvme`` and the handshake daemon gets it from there.  Our daemon first,
then upstream 1.4.0 as the reference, each: connect, the controller's TLS key
is the derived one, I/O through the namespace, disconnect.
Run: ``pytest -m lab tests/lab/test_concat.py``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

from tests.lab.vm import GuestResult, run_guest

pytestmark = [pytest.mark.lab, pytest.mark.timeout(1800)]
IMAGE = "forky"
SCRIPT = "#!/bin/sh\nexec python3 /lab/run/concat_scenario.py\n"


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> GuestResult:
    base = os.environ.get("TLSHD_LAB_RESULTS")
    out = Path(base) / f"concat-{IMAGE}" if base else tmp_path_factory.mktemp("lab-concat")
    return run_guest(SCRIPT, daemon="ours", timeout=900, results_dir=out, image=IMAGE)


@pytest.fixture(scope="module")
def sc(run: GuestResult) -> dict[str, Any]:
    data = run.scenario("concat")
    if data is None or "error" in data:
        log = "\n".join(run.text("scenario.log").splitlines()[-40:])
        pytest.fail(f"{data and data.get('error')} (results in {run.results_dir})\n{log}")
    return data


def test_kernel_and_target_offer_concat(sc: dict[str, Any]) -> None:
    assert "concat" in sc["fabrics_options"].split(","), sc["fabrics_options"]
    assert sc["target"]["port"] == {"addr_tsas": "tls1.3", "addr_treq": "not required"}


@pytest.mark.parametrize("daemon", ["ours", "upstream"])
def test_concat_connect_derives_a_psk_and_uses_it(sc: dict[str, Any], daemon: str) -> None:
    r = sc["runs"][daemon]
    assert r["connect"]["rc"] == 0, (r["connect"], r["dmesg"], r["daemon_log_tail"])
    assert r["tls_key_serial"], r.get("ctrl")
    derived = r["tls_key"]
    # the kernel's derived key: identity "NVMe1R0x <hostnqn> <subnqn> <digest>"
    assert derived["type"] == "psk", derived
    ident = derived["description"].split(" ")
    assert ident[0].startswith("NVMe1R") and len(ident) == 4 and ident[3], derived
    assert derived["serial"] in [k["serial"] for k in r["new_keys"]], r["new_keys"]
    hs = r["hs"]
    assert hs["client_ok"] >= 1 and hs["server_ok"] >= 1, hs
    assert not hs["failed_status"] and not hs["cancelled"], hs


@pytest.mark.parametrize("daemon", ["ours", "upstream"])
def test_io_over_the_concatenated_channel(sc: dict[str, Any], daemon: str) -> None:
    r = sc["runs"][daemon]
    io = r.get("io", {})
    assert io.get("read_back_same") and io.get("target_file_same"), io
    assert r["disconnect"]["rc"] == 0, r["disconnect"]
