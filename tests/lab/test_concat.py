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

from typing import Any

import pytest

from tests.lab.scenario_runs import results_dir, scenario_or_fail
from tests.lab.vm import GuestResult, run_guest

pytestmark = [pytest.mark.lab, pytest.mark.timeout(1800)]
IMAGE = "forky"
SCRIPT = "#!/bin/sh\nexec python3 /lab/run/concat_scenario.py\n"
QUEUES = 2  # admin + one I/O queue, as tests/lab/test_nvme.py


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> GuestResult:
    out = results_dir(f"concat-{IMAGE}", tmp_path_factory)
    return run_guest(SCRIPT, daemon="ours", timeout=900, results_dir=out, image=IMAGE)


@pytest.fixture(scope="module")
def sc(run: GuestResult) -> dict[str, Any]:
    return scenario_or_fail(run, "concat")


def test_kernel_and_target_offer_concat(sc: dict[str, Any]) -> None:
    assert "concat" in sc["fabrics_options"].split(","), sc["fabrics_options"]
    assert sc["target"]["port"] == {"addr_tsas": "tls1.3", "addr_treq": "not required"}


DAEMONS = ["ours", "upstream"]
AUTHS = {"sha256": ("NVMe1G01", 32), "sha384": ("NVMe1G02", 48)}  # identity, PSK bytes


def check_derived(key: dict[str, Any], new_keys: list[dict[str, Any]], auth: str) -> None:
    """The derived key (drivers/nvme/common/keyring.c): a "psk" key in .nvme,
    identity "NVMe1G<hmac> <hostnqn> <subnqn> <digest>" (G: generated; hmac
    01/02: the negotiated DH-HMAC-CHAP hash), made during this connect, with
    the PSK's size while the controller used it."""
    prefix, size = AUTHS[auth]
    assert key["type"] == "psk", key
    ident = key["description"].split(" ")
    assert ident[0] == prefix and len(ident) == 4 and ident[3], key
    assert key["serial"] in [k["serial"] for k in new_keys], (key, new_keys)
    assert key["proc"] == f"{key['description']}: {size}", key


@pytest.mark.parametrize("auth", list(AUTHS))
@pytest.mark.parametrize("daemon", DAEMONS)
def test_concat_connect_derives_a_psk_and_uses_it(
    sc: dict[str, Any], daemon: str, auth: str
) -> None:
    r = sc["runs"][daemon][auth]
    if (daemon, auth) == ("ours", "sha256"):  # the first run: no PSK anywhere before it
        assert r["psk_keys_before"] == [], r["psk_keys_before"]
    assert r["connect"]["rc"] == 0, (
        r["connect"],
        r["dmesg"],
        sc["runs"][daemon]["daemon_log_tail"],
    )
    assert r["tls_key_serial"], r.get("ctrl")
    assert r["ctrl"]["tls_configured_key"] == r["ctrl"]["tls_key"], r["ctrl"]
    check_derived(r["tls_key"], r["new_keys"], auth)
    # no handshake on the first, plain admin connection; then the TLS admin
    # queue and the I/O queue, each a host and an nvmet handshake
    hs = r["hs_connect"]
    assert hs["client_ok"] == QUEUES and hs["server_ok"] == QUEUES, hs
    assert not r["hs"]["failed_status"] and not r["hs"]["cancelled"], r["hs"]


@pytest.mark.parametrize("daemon", DAEMONS)
def test_reset_derives_and_uses_a_new_psk(sc: dict[str, Any], daemon: str) -> None:
    r = sc["runs"][daemon]["sha256"]
    after = r["after_reset"]
    assert after["reset"]["rc"] == 0 and after["state"] == "live", after
    assert after["tls_key_serial"] and after["tls_key_serial"] != r["tls_key_serial"], after
    assert after["ctrl"]["tls_configured_key"] == after["ctrl"]["tls_key"], after
    check_derived(after["tls_key"], r["new_keys"], "sha256")
    assert after["tls_key"]["description"] != r["tls_key"]["description"]
    # a host and an nvmet handshake per queue again; the host's are submitted
    # from its reset work item, a kworker like nvmet's, so nv.handshakes()
    # cannot tell the roles apart here: count them together
    hs = after["hs"]
    assert hs["completed"] == 2 * QUEUES and hs["server_ok"] == 2 * QUEUES, hs
    assert not hs["failed_status"] and not hs["cancelled"], hs


@pytest.mark.parametrize("auth", list(AUTHS))
@pytest.mark.parametrize("daemon", DAEMONS)
def test_io_over_the_concatenated_channel(sc: dict[str, Any], daemon: str, auth: str) -> None:
    r = sc["runs"][daemon][auth]
    io = r.get("io", {})
    assert io.get("read_back_same") and io.get("target_file_same"), io
    assert r["disconnect"]["rc"] == 0, r["disconnect"]


def test_each_connect_derives_a_new_psk(sc: dict[str, Any]) -> None:
    idents = [sc["runs"][d][a]["tls_key"]["description"] for d in DAEMONS for a in AUTHS]
    assert len(set(idents)) == len(idents), idents
