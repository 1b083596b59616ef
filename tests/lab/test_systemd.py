"""tlshd under a real systemd: the repository's systemd/tlshd.service in the lab guest.

One boot (``lab.init=systemd``: systemd 257 from trixie is PID 1, see
guest/systemd-stage2.sh) runs guest/systemd_scenario.py; each test checks one
step's JSON.  Run: ``pytest -m lab tests/lab/test_systemd.py -s`` (``-s`` shows
the measured times and the security score).  Results are kept in
``$TLSHD_LAB_RESULTS/systemd`` when that is set.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.lab.vm import GuestResult, results_subdir, run_guest

pytestmark = [pytest.mark.lab, pytest.mark.timeout(3600)]

SYSTEMD_PACKAGES = ("systemd",)  # a separately cached root variant
SCRIPT = "#!/bin/sh\nexec python3 /lab/run/systemd_scenario.py\n"
MAX_SECURITY_SCORE = 2.0
STATUS_RE = re.compile(r"^\d+ workers \(\d+ idle\), \d+ in flight")
Step = Callable[[str], dict[str, Any]]


def tail(text: str, n: int = 40) -> str:
    return "\n".join(text.splitlines()[-n:])


# trixie: systemd 257; forky: systemd 262 (tests/lab/README.md, "Images in CI")
@pytest.fixture(scope="module", params=["trixie", "forky"])
def systemd_run(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> GuestResult:
    image = request.param
    name = results_subdir(image, "systemd")
    base = os.environ.get("TLSHD_LAB_RESULTS")
    out = Path(base) / name if base else tmp_path_factory.mktemp(f"lab-{name}")
    return run_guest(
        SCRIPT,
        daemon="ours",
        timeout=900,
        extra_packages=SYSTEMD_PACKAGES,
        results_dir=out,
        share_src=True,
        kernel_args=("lab.init=systemd",),
        image=image,
    )


@pytest.fixture
def step(systemd_run: GuestResult) -> Step:
    """``step(name)``: that step's JSON, or a failure that says why."""
    res = systemd_run

    def get(name: str) -> dict[str, Any]:
        data = res.scenario(f"systemd_{name}")
        where = f"results in {res.results_dir}; guest rc={res.returncode}, "
        where += f"timed out={res.timed_out}, {res.seconds:.0f}s"
        if data is None:
            pytest.fail(
                f"step {name} left no result ({where})\n"
                f"--- scenario.log\n{tail(res.text('scenario.log'))}\n"
                f"--- console\n{tail(res.console_log.read_text(errors='replace'), 30)}"
            )
        if "error" in data:
            pytest.fail(
                f"step {name} broke ({where}):\n{data['error']}\n"
                f"--- tlshd journal\n{tail(res.text('tlshd-journal.txt'))}"
            )
        data["_where"] = where
        return data

    return get


def show(data: dict[str, Any], *keys: str) -> str:
    return json.dumps({k: data.get(k) for k in keys}, indent=1, default=str) + f"\n{data['_where']}"


def test_guest_booted_systemd_and_poweroff(systemd_run: GuestResult, step: Step) -> None:
    setup = step("setup")
    assert setup["pid1_comm"] == "systemd", show(setup, "pid1_comm")
    assert re.match(r"systemd 2[5-9]\d\b", setup["systemd_version"]), setup["systemd_version"]
    assert setup["props"]["LoadState"] == "loaded", show(setup, "props", "verify")
    print(
        f"\n[systemd] {setup['systemd_version']}; boot: {setup['boot_time']}; "
        f"guest run {systemd_run.seconds:.0f}s (timings {systemd_run.timings})"
    )
    assert systemd_run.returncode == 0, tail(systemd_run.text("scenario.log"))
    assert not systemd_run.timed_out, "the guest did not power off through systemd"


def test_unit_under_test_is_the_repositorys(step: Step) -> None:
    setup = step("setup")
    assert setup["unit_sha256"] == setup["repo_unit_sha256"]
    props = setup["props"]
    assert props["FragmentPath"] == "/etc/systemd/system/tlshd.service", props
    assert "/etc/systemd/system/tlshd.service.d/lab.conf" in props["DropInPaths"], props
    assert "/opt/tlshd/bin/tlshd" in props["ExecStart"], props
    assert props["Type"] == "notify" and props["NotifyAccess"] == "main", props
    # systemd 257 loads it without complaint (man pages are not in the guest)
    assert setup["verify"].startswith("rc=0 "), setup["verify"]


def test_only_the_supervisor_runs_real_time(step: Step) -> None:
    """CPUSchedulingPolicy=fifo reaches the supervisor, not what it forks."""
    st = step("start")
    policies = {p["pid"]: p for p in st["policies"]}
    assert policies[st["main_pid"]]["policy"] == os.SCHED_FIFO, show(st, "policies")
    others = [p for pid, p in policies.items() if pid != st["main_pid"]]
    assert any("zygote" in p["title"] for p in others), show(st, "policies")
    assert all(p["policy"] == os.SCHED_OTHER for p in others), show(st, "policies")
    # LimitNICE=-20: the zygote and old requests' workers may run at nice -20
    # (workers/priority.py)
    assert all(p["nice_limit"] == 40 for p in policies.values()), show(st, "policies")


def test_security_score(step: Step) -> None:
    sec = step("security")
    score = sec["score"]
    print(
        f"\n[systemd] systemd-analyze security tlshd.service (systemd 257, online): {score} "
        f"{sec['online']['verdict']}; offline, unit file alone: {sec['offline']['score']}"
    )
    assert score is not None, show(sec, "online")
    assert score <= MAX_SECURITY_SCORE, show(sec, "online")


def test_start_active_only_after_ready(step: Step) -> None:
    st = step("start")
    print(
        f"\n[systemd] start: inactive→active {st['startup_s']}s (exec→active "
        f"{st['exec_to_active_s']}s, wall {st['wall_s']}s); states {st['state_sequence']}"
    )
    assert st["final"]["ActiveState"] == "active", show(st, "states", "daemon_log")
    seq = st["state_sequence"]
    assert "activating" in seq and seq.index("activating") < seq.index("active"), show(st, "states")
    assert st["ready_notification"], show(st, "notifications", "transitions")
    assert st["ready_from_main_pid"], show(st, "ready_notification", "main_pid")
    assert st["ready_before_running"], show(st, "notifications", "transitions")
    assert st["serving_line"], show(st, "daemon_log")
    assert st["serving_before_active"], show(st, "serving_line", "props")
    assert st["listening_when_active"], show(st, "states")
    assert STATUS_RE.match(st["props"]["StatusText"]), show(st, "props")


def test_notifications_travel_through_sdnotify(systemd_run: GuestResult, step: Step) -> None:
    """The notifications systemd acted on were carried by the sdnotify package:
    the supervisor names the transport on its first delivery
    (supervisor/notify.py), it is the main PID that READY=1 came from, and no
    send failed during the whole scenario (reload, restart, watchdog, stop)."""
    st = step("start")
    journal = systemd_run.text("tlshd-journal.txt")
    main_pid = st["main_pid"]
    carried = [line for line in journal.splitlines() if "through sdnotify" in line]
    print(f"\n[systemd] {carried[0] if carried else 'no sdnotify line in the journal'}")
    assert carried, tail(journal)
    from_main = [line for line in carried if f"tlshd[{main_pid}]:" in line]
    assert from_main and "sent to /run/systemd/notify" in from_main[0], (main_pid, carried)
    assert st["ready_notification"]["from_pid"] == main_pid, show(st, "ready_notification")
    failures = [line for line in journal.splitlines() if "sd_notify to" in line]
    assert not failures, failures


def test_nfs_tls_mount_under_systemd(step: Step) -> None:
    nfs = step("nfs")
    assert nfs["mount"]["rc"] == 0, show(nfs, "mount", "hs")
    assert nfs["xprtsec_in_proc_mounts"], show(nfs, "mount")
    assert nfs["ok"], show(nfs, "io")
    assert nfs["hs_ok"], show(nfs, "hs", "handshakes")


def test_reload(step: Step) -> None:
    rl = step("reload")
    print(
        f"\n[systemd] reload: {rl['systemctl_reload']['seconds']}s, transitions {rl['transitions']}"
    )
    assert rl["systemctl_reload"]["rc"] == 0, show(rl, "systemctl_reload")
    assert rl["seen_reloading"] or rl["reload_transition"], show(rl, "states", "transitions")
    assert rl["reloading_notified"], show(rl, "notifications")
    assert rl["ready_after_reloading"], show(rl, "notifications")
    assert rl["after"]["ActiveState"] == "active", show(rl, "after")
    assert rl["daemon_reload_line"], show(rl, "notifications")
    assert rl["main_pid_unchanged"], show(rl, "before", "after")


def test_restart_on_crash(step: Step) -> None:
    cr = step("crash_restart")
    print(
        f"\n[systemd] SIGKILL of the supervisor: active again after {cr['back_active_s']}s "
        f"(RestartSec=2s), pid {cr['old_main_pid']} → {cr['new_main_pid']}"
    )
    assert cr["systemctl_kill"]["rc"] == 0, show(cr, "systemctl_kill")
    assert cr["after"]["ActiveState"] == "active", show(cr, "states")
    assert cr["new_main_pid"] not in (0, cr["old_main_pid"]), show(cr, "states")
    assert cr["restarts"][1] == cr["restarts"][0] + 1, show(cr, "restarts")
    assert cr["main_killed_line"] and cr["scheduled_restart_line"], show(cr, "transitions")
    assert not cr["old_pids_left"], show(cr, "old_cgroup_pids", "new_cgroup_pids")
    mount = cr["mount"]
    assert mount["mount"]["rc"] == 0 and mount["ok"], show(mount, "mount", "io", "hs")
    assert cr["mount_hs_ok"], show(mount, "hs", "handshakes")


def test_watchdog(step: Step) -> None:
    wd = step("watchdog")
    print(
        f"\n[systemd] WatchdogSec=3s: {wd['pings']} WATCHDOG=1 in {wd['watched_s']}s; "
        f"SIGSTOPped supervisor replaced after {wd['control_s']}s"
    )
    assert wd["restart"] is None or wd["restart"]["rc"] == 0, show(wd, "restart")
    assert wd["after"]["WatchdogUSec"] == "3s", show(wd, "after")
    assert wd["before"]["MainPID"] == wd["after"]["MainPID"], show(wd, "before", "after")
    assert wd["before"]["NRestarts"] == wd["after"]["NRestarts"], show(wd, "before", "after")
    assert wd["timeout_line_while_alive"] is None, show(wd, "timeout_line_while_alive")
    # pinged every WatchdogSec/2: about 8 in 12 s; allow a slow TCG loop
    assert wd["pings"] >= 4 and wd["ping_from_main"], show(wd, "pings", "after")
    # control: without pings the watchdog fires and Restart=on-failure brings it back
    assert wd["control_timeout_line"], show(wd, "control_transitions", "control_states")
    assert wd["control_final"]["ActiveState"] == "active", show(wd, "control_states")
    assert wd["control_new_pid"] not in (0, wd["stopped_pid"]), show(wd, "control_states")


def test_stop(step: Step) -> None:
    sp = step("stop")
    print(f"\n[systemd] stop: {sp['stop_s']}s")
    assert sp["systemctl_stop"]["rc"] == 0, show(sp, "systemctl_stop")
    assert sp["after"]["ActiveState"] == "inactive", show(sp, "after")
    assert sp["after"]["Result"] == "success", show(sp, "after", "transitions")
    assert sp["stopping_notified"], show(sp, "notifications")
    assert sp["daemon_stopping_line"], show(sp, "notifications")
    assert sp["sigkill_line"] is None, show(sp, "sigkill_line", "transitions")
    assert len(sp["pids_before"]) >= 2, show(sp, "pids_before")  # supervisor + workers
    assert not sp["pids_left"], show(sp, "pids_before", "pids_left")
    assert not sp["cgroup_pids_after"], show(sp, "cgroup_pids_after")
    assert not sp["tlshd_processes_after"], show(sp, "tlshd_processes_after")
