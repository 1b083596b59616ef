"""RFC 8449 record size limit with real kTLS: capped on 7.3, still working on 6.12.

One boot per image runs guest/record_size_scenario.py with the daemon's own
Python: the engine, as a server, against a client whose ClientHello asks for
records of at most 512 data bytes (record_size_limit 513), then the kTLS
socket sends 4000 bytes and the client looks at each record on the wire.
On ``forky`` (7.3, TLS_TX_MAX_PAYLOAD_LEN) every record must fit the limit;
on ``trixie`` (6.12, no such option) the handshake must still succeed, with
full-size records (upstream 1.4.0 fails every handshake there:
test_upstream_rsl.py).  Measured 2026-11-29: on 7.3.4 eight records of 529,
..., 529, 433 bytes (512 data + ContentType + tag), the control one of 4017;
on 6.12.117 one record of 4017 with or without the limit, status 0 both.
Run: ``pytest -m lab tests/lab/test_record_size.py``.
"""

from __future__ import annotations

from typing import Any

import pytest

from tests.lab.scenario_runs import results_dir, scenario_or_fail
from tests.lab.vm import GuestResult, run_guest

pytestmark = [pytest.mark.lab, pytest.mark.timeout(1800)]
SCRIPT = "#!/bin/sh\nexec /opt/tlshd/bin/python /lab/run/record_size_scenario.py\n"
DATA_LIMIT = 512  # record_size_limit 513 minus the ContentType byte
TAG = 16
_runs: dict[str, GuestResult] = {}


def scenario(image: str, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    if image not in _runs:
        out = results_dir(f"record-size-{image}", tmp_path_factory)
        _runs[image] = run_guest(SCRIPT, timeout=600, results_dir=out, image=image)
    return scenario_or_fail(_runs[image], "record_size")


def kernel_at_least(release: str, version: tuple[int, int]) -> bool:
    major, minor = (int(n) for n in release.split(".")[:2])
    return (major, minor) >= version


def test_records_fit_the_clients_limit_on_7_3(tmp_path_factory: pytest.TempPathFactory) -> None:
    sc = scenario("forky", tmp_path_factory)
    assert kernel_at_least(sc["kernel"], (6, 19)), sc["kernel"]
    assert sc["tls_module"] and sc["probe"] and sc["engine_caps"], sc
    run = sc["with_limit"]
    assert run["status"] == 0, run["detail"]
    assert run["tx_max_payload_len"] == DATA_LIMIT, run
    assert run["data_ok"], run
    # on the wire: data + ContentType + AEAD tag per record
    assert run["record_lengths"] and max(run["record_lengths"]) <= DATA_LIMIT + 1 + TAG, run
    assert len(run["record_lengths"]) >= 4000 // DATA_LIMIT, run
    control = sc["without_limit"]
    assert control["status"] == 0 and control["data_ok"], control
    assert max(control["record_lengths"]) > DATA_LIMIT + 1 + TAG, control


def test_no_limit_and_no_failure_on_6_12(tmp_path_factory: pytest.TempPathFactory) -> None:
    sc = scenario("trixie", tmp_path_factory)
    assert not kernel_at_least(sc["kernel"], (6, 19)), sc["kernel"]
    assert sc["tls_module"] and not sc["probe"] and not sc["engine_caps"], sc
    for name in ("with_limit", "without_limit"):
        run = sc[name]
        assert run["status"] == 0, run["detail"]
        assert run["data_ok"], run
        assert run["tx_max_payload_len"] == "ENOPROTOOPT", run
    assert max(sc["with_limit"]["record_lengths"]) > DATA_LIMIT + 1 + TAG, sc["with_limit"]
