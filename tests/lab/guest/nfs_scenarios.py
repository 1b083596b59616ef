#!/usr/bin/python3
"""NFS-over-TLS scenarios, run in ONE guest boot against one daemon ($LAB_DAEMON).

Each scenario writes /lab/results/scenarios/<name>.json; tests/lab/test_nfs.py
asserts on them.  Usage: ``nfs_scenarios.py [NAME...]`` (default: all, in order).

Every mount uses its own 127.0.0.k address so that the NFS client never reuses
the TLS transport of an earlier mount (each mount ⇒ new client+server handshakes).
"""

from __future__ import annotations

import hashlib
import json
import os
import pwd
import re
import subprocess
import sys
import time
import traceback
from pathlib import Path

import labguest as lg

EXPORT = Path("/srv/nfs")


def io_check(mnt: str, name: str, export_dir: Path = EXPORT) -> dict:
    """Write a file through the mount, compare it on the server, read it back."""
    data = os.urandom(256 * 1024)
    digest = hashlib.sha256(data).hexdigest()
    out: dict = {"bytes": len(data), "sha256": digest}
    t0 = time.monotonic()
    try:
        with open(f"{mnt}/{name}", "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        out["write_ok"] = True
    except OSError as e:
        out["write_ok"] = False
        out["write_error"] = str(e)
        return out
    srv = export_dir / name
    out["server_sees_same"] = srv.is_file() and hashlib.sha256(srv.read_bytes()).hexdigest() == (
        digest
    )
    Path("/proc/sys/vm/drop_caches").write_text("3\n")
    try:
        back = Path(f"{mnt}/{name}").read_bytes()
        out["read_back_same"] = hashlib.sha256(back).hexdigest() == digest
    except OSError as e:
        out["read_back_same"] = False
        out["read_error"] = str(e)
    out["seconds"] = round(time.monotonic() - t0, 2)
    return out


def hs_summary(hs: list[dict]) -> dict:
    done = [h for h in hs if "status" in h]
    return {
        "requests": len(hs),
        "completed": len(done),
        "client_ok": sum(1 for h in done if h.get("role") == "client" and h["status"] == 0),
        "server_ok": sum(1 for h in done if h.get("role") == "server" and h["status"] == 0),
        "failed_status": sorted({h["status"] for h in done if h["status"] != 0}),
        "cancelled": sum(1 for h in hs if "status" not in h),
    }


def mounted_scenario(name: str, ip: str, xprtsec: str, path: str = "/",
                     export_dir: Path = EXPORT) -> dict:  # fmt: skip
    mark = f"LAB {name} begin"
    lg.trace_mark(mark)
    before = lg.tls_stat()
    mnt = f"/mnt/{name}"
    res: dict = {"mount": lg.mount_nfs(ip, path, mnt, xprtsec)}
    if res["mount"]["rc"] == 0:
        res["xprtsec_in_proc_mounts"] = f"xprtsec={xprtsec}" in res["mount"]["proc_mounts"]
        res["io"] = io_check(mnt, f"{name}.bin", export_dir)
        res["tls_stat_mounted"] = lg.tls_stat()
        res["umount_rc"] = lg.umount(mnt)
    res["tls_stat_before"] = before
    res["tls_stat_after"] = lg.tls_stat()
    res["handshakes"] = lg.handshakes(since=mark)
    res["hs"] = hs_summary(res["handshakes"])
    io = res.get("io", {})
    res["ok"] = (
        res["mount"]["rc"] == 0
        and io.get("write_ok") is True
        and io.get("read_back_same") is True
        and io.get("server_sees_same") is True
    )
    return res


def sc_tls_mount() -> dict:
    return mounted_scenario("tls_mount", "127.0.0.1", "tls")


def sc_mtls_mount() -> dict:
    return mounted_scenario("mtls_mount", "127.0.0.2", "mtls")


def sc_mtls_export_refuses_tls() -> dict:
    """An xprtsec=mtls export refuses a client without a certificate."""
    mark = "LAB mtls_export_refuses_tls begin"
    lg.trace_mark(mark)
    refused = lg.mount_nfs("127.0.0.3", "/mtls", "/mnt/refused", "tls", timeout=90)
    if refused["rc"] == 0:
        refused["io"] = io_check("/mnt/refused", "should-not-be-here.bin", EXPORT / "mtls")
        lg.umount("/mnt/refused")
    hs = lg.handshakes(since=mark)
    control = mounted_scenario("mtls_export_control", "127.0.0.4", "mtls", "/mtls",
                               EXPORT / "mtls")  # fmt: skip
    return {
        "refused": refused,
        "refused_handshakes": hs,
        "refused_hs": hs_summary(hs),
        "control": control,
        "ok": refused["rc"] != 0 and control["ok"],
    }


def sc_wrong_server_name() -> dict:
    """Mount by a name that is not in the server certificate: EACCES."""
    mark = "LAB wrong_server_name begin"
    lg.trace_mark(mark)
    res = lg.mount_nfs("wrongname", "/", "/mnt/wrongname", "tls", timeout=90)
    if res["rc"] == 0:
        lg.umount("/mnt/wrongname")
    hs = lg.handshakes(since=mark)
    client = [h for h in hs if h.get("role") == "client" and "status" in h]
    return {
        "mount": res,
        "handshakes": hs,
        "hs": hs_summary(hs),
        "client_statuses": [h["status"] for h in client],
        "ok": res["rc"] != 0 and bool(client) and all(h["status"] == -13 for h in client),
    }


def sc_kill_restart() -> dict:
    """SIGKILL the daemon while a mount is in its handshake, restart it, mount again."""
    mark = "LAB kill_restart begin"
    lg.trace_mark(mark)
    out: dict = {"killed_pid": None}
    Path("/mnt/inflight").mkdir(parents=True, exist_ok=True)
    inflight = subprocess.Popen(
        ["mount", "-t", "nfs4", "-o", "vers=4.2,xprtsec=tls", "127.0.0.5:/", "/mnt/inflight"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    t0 = time.monotonic()
    while time.monotonic() - t0 < 20:  # wait for the daemon to take the request
        if any(e["event"] == "handshake_cmd_accept" for e in lg.read_trace_since(mark)):
            break
        time.sleep(0.05)
    out["accept_seen_after"] = round(time.monotonic() - t0, 2)
    out["killed_pid"] = lg.kill_daemon()
    out["killed_at"] = lg.uptime()
    out["restarted_pid"] = lg.start_daemon()
    out["restart_listening_after"] = lg.last_start_seconds
    try:
        text, _ = inflight.communicate(timeout=150)
        out["inflight"] = {"rc": inflight.returncode, "output": text.strip(),
                           "seconds": round(time.monotonic() - t0, 2)}  # fmt: skip
    except subprocess.TimeoutExpired:
        inflight.kill()
        out["inflight"] = {"rc": -1, "output": "timed out after 150s"}
    if out["inflight"]["rc"] == 0:
        out["inflight"]["io"] = io_check("/mnt/inflight", "inflight.bin")
        lg.umount("/mnt/inflight")
    out["inflight_handshakes"] = lg.handshakes(since=mark)
    out["after"] = mounted_scenario("after_restart", "127.0.0.6", "tls")
    out["ok"] = out["after"]["ok"]
    return out


def sc_status_report() -> dict:
    """`tlshd status` from the running daemon, after the mounts (ours only)."""
    if lg.daemon_kind() != "ours":
        return {"ok": True, "skipped": "upstream tlshd has no status command"}
    tlshd = lg.OURS[0]
    text = subprocess.run([tlshd, "status", "-c", str(lg.CONFIG)], capture_output=True, text=True)
    raw = subprocess.run(
        [tlshd, "status", "--json", "-c", str(lg.CONFIG)], capture_output=True, text=True
    )
    (lg.RESULTS / "status.txt").write_text(text.stdout + text.stderr)
    out = {"text_rc": text.returncode, "text": text.stdout, "json_rc": raw.returncode}
    try:
        out["json"] = json.loads(raw.stdout)
    except ValueError as e:
        out["json_error"] = f"{e}: {raw.stdout[:500]} {raw.stderr[:500]}"
    out["ok"] = text.returncode == 0 and raw.returncode == 0 and "json" in out
    out["workers_proc"] = [_proc_fields(w["pid"]) for w in out.get("json", {}).get("workers", [])]
    out["tlshd_uid"] = pwd.getpwnam("tlshd").pw_uid
    tree = out.get("json", {}).get("memory", {}).get("processes", [])
    out["tree_memory"] = [_memory_fields(proc["pid"]) for proc in tree]
    return out


def _memory_fields(pid: int) -> dict:
    """Whether a process of the daemon may take transparent huge pages
    (tlshd/heap.py) and which libcrypto files it maps: none, the TLS runs in
    the OpenSSL that cryptography links (tlshd/openssl_conf.py)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
        maps = Path(f"/proc/{pid}/maps").read_text().splitlines()
    except OSError as e:
        return {"pid": pid, "error": str(e)}
    libcrypto = sorted({line.split()[-1] for line in maps if "/libcrypto.so" in line})
    return {"pid": pid, "thp_enabled": _status_field(status, "THP_enabled"), "libcrypto": libcrypto}


def _status_field(text: str, name: str) -> str | None:
    """The value of `name` in the text of a /proc/PID/status file."""
    return next((line.split(":", 1)[1].strip() for line in text.splitlines()
                 if line.startswith(name + ":")), None)  # fmt: skip


def _proc_fields(pid: int) -> dict:
    """Uid, Seccomp and RLIMIT_NICE of a worker, from /proc (issue 11: own
    account, seccomp filter; issue 10: its nice value and how low it may go)."""
    try:
        lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    except OSError as e:
        return {"pid": pid, "error": str(e)}
    fields = dict(line.split(":", 1) for line in lines if ":" in line)
    return {
        "pid": pid,
        "uid": int(fields["Uid"].split()[0]),
        "seccomp": fields.get("Seccomp", "").strip(),
        "nice_limit": lg.nice_limit(pid),
        "nice": os.getpriority(os.PRIO_PROCESS, pid),
    }


def sc_hosts_mount() -> dict:
    """[pool] handshakes_per_worker = 8 (workers/host.py, ours only): the
    daemon restarted with worker hosts mounts tls and mtls with kTLS, and
    each successful handshake names the process that served it."""
    if lg.daemon_kind() != "ours":
        return {"ok": True, "skipped": "worker hosts are ours"}
    original = lg.CONFIG.read_text()
    log_path = lg.RESULTS / "daemon-ours.log"
    lg.stop_daemon()
    lg.CONFIG.write_text(original + "\n[pool]\nhandshakes_per_worker=8\n")
    out: dict = {}
    try:
        offset = log_path.stat().st_size if log_path.exists() else 0
        out["daemon_pid"] = lg.start_daemon("ours")
        out["tls"] = mounted_scenario("hosts_tls", "127.0.0.7", "tls")
        out["mtls"] = mounted_scenario("hosts_mtls", "127.0.0.8", "mtls")
        with open(log_path, errors="replace") as f:
            f.seek(offset)
            text = f.read()
        # "... handshake succeeded, ... ms (worker PID)" (supervisor/handoff.py)
        out["served_by"] = [
            int(m) for m in re.findall(r"handshake succeeded, .*\(worker (\d+)\)", text)
        ]
        out["hosts_proc"] = [_host_fields(pid) for pid in sorted(set(out["served_by"]))]
        out["tlshd_uid"] = pwd.getpwnam("tlshd").pw_uid
    finally:
        lg.stop_daemon()
        lg.CONFIG.write_text(original)
    out["ok"] = out["tls"]["ok"] and out["mtls"]["ok"]
    return out


def _host_fields(pid: int) -> dict:
    """Uid of a worker host and the seccomp mode of each of its threads: the
    main thread reads only the zygote's channel; a handshake thread confines
    itself before it is ready (workers/host.py)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
        tasks = [
            Path(f"/proc/{pid}/task/{tid}/status").read_text()
            for tid in os.listdir(f"/proc/{pid}/task")
        ]
    except OSError as e:
        return {"pid": pid, "error": str(e)}
    return {
        "pid": pid,
        "uid": int(str(_status_field(status, "Uid")).split()[0]),
        "threads_seccomp": sorted(str(_status_field(t, "Seccomp")) for t in tasks),
    }


SCENARIOS = {
    "tls_mount": sc_tls_mount,
    "mtls_mount": sc_mtls_mount,
    "mtls_export_refuses_tls": sc_mtls_export_refuses_tls,
    "wrong_server_name": sc_wrong_server_name,
    "kill_restart": sc_kill_restart,
    "status_report": sc_status_report,
    "hosts_mount": sc_hosts_mount,
}


def main(names: list[str]) -> int:
    kind = lg.daemon_kind()
    t0 = time.monotonic()
    setup: dict = {"daemon": kind, "ok": False}
    try:
        lg.make_pki()
        lg.write_config()
        lg.trace_on()
        setup["daemon_pid"] = lg.start_daemon(kind)
        setup["daemon_start_seconds"] = round(time.monotonic() - t0, 2)
        lg.nfs_server()
        setup["ok"] = True
    except Exception as e:
        setup["error"] = f"{type(e).__name__}: {e}"
        setup["traceback"] = traceback.format_exc()
    setup["seconds"] = round(time.monotonic() - t0, 2)
    lg.write_result("setup", setup)
    if not setup["ok"]:
        lg.log(f"setup failed: {setup['error']}")
        return 1
    failed = lg.run_scenarios(SCENARIOS, names, kind)
    lg.stop_daemon()
    lg.log(f"all scenarios done in {time.monotonic() - t0:.1f}s, {failed} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
