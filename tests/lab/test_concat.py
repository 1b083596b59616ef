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
QUEUES = 2  # admin + one I/O queue, as tests/lab/test_nvme.py


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
    if daemon == "ours":  # the first run: no PSK anywhere before it
        assert r["psk_keys_before"] == [], r["psk_keys_before"]
    assert r["connect"]["rc"] == 0, (r["connect"], r["dmesg"], r["daemon_log_tail"])
    assert r["tls_key_serial"], r.get("ctrl")
    assert r["ctrl"]["tls_configured_key"] == r["ctrl"]["tls_key"], r["ctrl"]
    derived = r["tls_key"]
    # the derived key (drivers/nvme/common/keyring.c): "psk" key in .nvme,
    # identity "NVMe1G01 <hostnqn> <subnqn> <digest>" (G: generated, 01: SHA-256,
    # the negotiated DH-HMAC-CHAP hash), made during this connect
    assert derived["type"] == "psk", derived
    ident = derived["description"].split(" ")
    assert ident[0] == "NVMe1G01" and len(ident) == 4 and ident[3], derived
    assert derived["serial"] in [k["serial"] for k in r["new_keys"]], r["new_keys"]
    # no handshake on the first, plain admin connection; then the TLS admin
    # queue and the I/O queue, each a host and an nvmet handshake
    hs = r["hs"]
    assert hs["client_ok"] == QUEUES and hs["server_ok"] == QUEUES, hs
    assert not hs["failed_status"] and not hs["cancelled"], hs


@pytest.mark.parametrize("daemon", ["ours", "upstream"])
def test_io_over_the_concatenated_channel(sc: dict[str, Any], daemon: str) -> None:
    r = sc["runs"][daemon]
    io = r.get("io", {})
    assert io.get("read_back_same") and io.get("target_file_same"), io
    assert r["disconnect"]["rc"] == 0, r["disconnect"]


def test_each_connect_derives_a_new_psk(sc: dict[str, Any]) -> None:
    ours, upstream = (sc["runs"][d]["tls_key"] for d in ("ours", "upstream"))
    assert ours["description"] != upstream["description"], (ours, upstream)
