"""What each lab kernel offers for issue 12's features, checked in the guest.

One boot per image runs guest/kernel_probe.py (no handshake daemon: the probe
is the only listener).  These tests pin the facts the features rest on, so
that a kernel update that changes one shows up here first; the table in
tests/lab/README.md records the values.  Run: ``pytest -m lab
tests/lab/test_kernel_probe.py -s`` (``-s`` prints each image's findings).
"""

from __future__ import annotations

import errno
import json
import os
from pathlib import Path
from typing import Any

import pytest

from tests.lab.vm import GuestResult, run_guest
from tlshd.uapi import MAX_ERRNO, DoneAttr

pytestmark = [pytest.mark.lab, pytest.mark.timeout(1200)]
IMAGES = pytest.mark.parametrize("image", ["trixie", "forky"])
SCRIPT = "#!/bin/sh\nexec /opt/tlshd/bin/python /lab/run/kernel_probe.py\n"
# Linux versions that brought each feature (issue 12)
KEYRING_SINCE = (6, 17)
TX_MAX_PAYLOAD_LEN_SINCE = (6, 19)
_runs: dict[str, GuestResult] = {}


def tail(text: str, n: int = 40) -> str:
    return "\n".join(text.splitlines()[-n:])


@pytest.fixture(scope="module")
def probe(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    """``probe(image, section)``: that section of the image's kernel_probe.json."""

    def get(image: str, section: str) -> dict[str, Any]:
        if image not in _runs:
            base = os.environ.get("TLSHD_LAB_RESULTS")
            out = Path(base) / f"probe-{image}" if base else tmp_path_factory.mktemp(
                f"lab-probe-{image}")  # fmt: skip
            _runs[image] = run_guest(SCRIPT, timeout=600, results_dir=out, image=image)
            print(f"\n{image}: " + json.dumps(_runs[image].scenario("kernel_probe"), indent=1))
        res = _runs[image]
        data = (res.scenario("kernel_probe") or {}).get(section)
        if data is None or "error" in data:
            pytest.fail(
                f"{image}: probe {section}: {data and data['error']} (results in "
                f"{res.results_dir}; guest rc={res.returncode})\n"
                f"--- scenario.log\n{tail(res.text('scenario.log'))}"
            )
        return data

    return get


def kernel_version(probe, image: str) -> tuple[int, int]:  # type: ignore[no-untyped-def]
    major, minor = probe(image, "versions")["uname"].split(".")[:2]
    return int(major), int(minor)


@IMAGES
def test_done_status_policy_is_bounded_by_max_errno(image: str, probe) -> None:  # type: ignore[no-untyped-def]
    status = probe(image, "family")["op_policy"]["DONE"]["STATUS"]
    assert status["type"] == "u32", status
    assert (status["min_u"], status["max_u"]) == (0, MAX_ERRNO), status


@IMAGES
def test_done_needs_cap_net_admin(image: str, probe) -> None:  # type: ignore[no-untyped-def]
    ops = probe(image, "family")["ops"]
    assert "admin-perm" in ops["DONE"]["flag_names"], ops
    assert "admin-perm" in ops["ACCEPT"]["flag_names"], ops


@IMAGES
def test_our_done_probe_matches_the_kernel_policy(image: str, probe) -> None:  # type: ignore[no-untyped-def]
    fam = probe(image, "family")
    done_attrs = [DoneAttr[name] for name in fam["op_policy"]["DONE"]]
    assert fam["daemon_done_maxattr"] == max(done_attrs), fam["op_policy"]["DONE"]


@IMAGES
def test_accept_keyring_attribute_from_6_17(image: str, probe) -> None:  # type: ignore[no-untyped-def]
    ak = probe(image, "accept_keyring")
    assert ak["accept"]["auth_mode"] == 2, ak  # PSK: an NVMe/TCP host request
    if kernel_version(probe, image) >= KEYRING_SINCE:
        assert ak["keyring_attr_present"], ak
        assert ak["keyring_is_nvme"], f"KEYRING is not the .nvme keyring: {ak}"
    else:
        assert not ak["keyring_attr_present"], ak


@IMAGES
def test_tls_tx_max_payload_len_from_6_19(image: str, probe) -> None:  # type: ignore[no-untyped-def]
    so = probe(image, "tls_sockopt")
    assert so["tls_tx"]["ok"], so
    supported = kernel_version(probe, image) >= TX_MAX_PAYLOAD_LEN_SINCE
    # the daemon's capability probe (tlshd.supervisor.tlsmodule) agrees with the kernel
    assert so["daemon_probe"] is supported, so
    if supported:
        assert so["supported"], so
        assert so["get_before_tx"]["value"] == 16384, so  # TLS_MAX_PAYLOAD_SIZE by default
        assert so["set_4095_after_tx"]["value"] == 4095, so
        assert so["set_32_after_tx"]["errno"] == errno.errorcode[errno.EINVAL], so
    else:
        assert not so["supported"], so
        assert so["get_after_tx"]["errno"] == errno.errorcode[errno.ENOPROTOOPT], so


def test_forky_has_nvme_concat_in_kernel_and_nvme_cli(probe) -> None:  # type: ignore[no-untyped-def]
    nvme = probe("forky", "nvme")
    assert nvme["fabrics_has_concat"], nvme["fabrics_options"]
    assert nvme["nvme_cli_connect_concat"], nvme["nvme_cli_version"]
    assert {"dhchap_key", "dhchap_ctrl_key"} <= set(nvme["nvmet_host_attrs"]), nvme
