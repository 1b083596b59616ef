#!/opt/tlshd/bin/python3
"""Burst benchmark, guest side: concurrent NFS-over-TLS mounts against both daemons.

Runs inside the lab guest (tests/lab), as the scenario of ONE boot, with the
guest venv's Python (it has psutil).  Settings come from the environment:

    BURST_SIZES     "8 32 64"          mounts per burst
    BURST_DAEMONS   "upstream ours"    daemons, in this order for every size
    BURST_ROUNDS    "1"                how many times the whole sweep runs
    BURST_KILL      "16"               size of the extra burst (ours) with one
                                       worker SIGKILLed mid-handshake; 0: none
    BURST_MOUNT_TIMEOUT "240"          seconds one mount may take
    BURST_NFSD_THREADS  "16"
    BURST_COMPILE       "1"                byte-compile our package first (as pip would)
    BURST_IMPORTTIME    "1"                save `python -X importtime` of the daemon
    BURST_LOGS_ON_TMPFS "1"                daemon stderr + syslog on tmpfs, not the 9p share

For every (round, size, daemon): nfsd is restarted (no transports or client
state from the previous burst), the daemon is started and left to settle,
the tracing buffer is cleared, N `mount -t nfs4 -o vers=4.2,xprtsec=tls`
run at once to N distinct 127.0.x.y addresses never used before in the
boot, then everything is unmounted and the daemon is stopped.  The server
certificate carries every address used as an IP SAN (own PKI, see make_pki).

Results: /lab/results/burst.json (one record per burst, with per-request
trace data) — benchmarks/burst.py reads it.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import sysconfig
import threading
import time
import traceback
from pathlib import Path

import labguest as lg
import psutil

RESULTS = Path("/lab/results")
PKI = Path("/etc/tlshd/pki-burst")
TRACING = Path("/sys/kernel/tracing")
EIO = 5

# Every mount gets an address no earlier mount of this boot used, so each
# mount makes a fresh NFS client (and fresh client + server handshakes).
ADDRESSES = [f"127.0.{c}.{d}" for c in range(0, 4) for d in range(1, 255)]
_next_address = 0


def env_list(name: str, default: str) -> list[str]:
    return os.environ.get(name, default).split()


def take_addresses(n: int) -> list[str]:
    global _next_address
    out = ADDRESSES[_next_address : _next_address + n]
    if len(out) < n:
        raise RuntimeError("ran out of distinct loopback addresses")
    _next_address += n
    return out


# ----------------------------------------------------------------------- setup


def make_pki(n_addresses: int) -> Path:
    """lab PKI (ECDSA P-256), but the server SAN covers the first n addresses."""
    PKI.mkdir(parents=True, exist_ok=True)
    sans = ",".join(
        ["DNS:localhost", "DNS:tlshd-lab"] + [f"IP:{a}" for a in ADDRESSES[:n_addresses]]
    )
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes"]
    lg.sh(
        [
            "openssl",
            "req",
            "-x509",
            *ec,
            "-keyout",
            "ca.key",
            "-out",
            "ca.pem",
            "-days",
            "30",
            "-subj",
            "/CN=tlshd burst CA",
            "-addext",
            "basicConstraints=critical,CA:TRUE",
            "-addext",
            "keyUsage=critical,keyCertSign,cRLSign",
        ],
        cwd=PKI,
    )
    for name, ext in (
        ("server", f"subjectAltName={sans}\nextendedKeyUsage=serverAuth\n"),
        ("client", "subjectAltName=DNS:lab-client\nextendedKeyUsage=clientAuth\n"),
    ):
        lg.sh(
            [
                "openssl",
                "req",
                *ec,
                "-keyout",
                f"{name}.key",
                "-out",
                f"{name}.csr",
                "-subj",
                f"/CN=lab-{name}",
            ],
            cwd=PKI,
        )
        (PKI / f"{name}.ext").write_text(
            "basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature\n" + ext
        )
        lg.sh(
            [
                "openssl",
                "x509",
                "-req",
                "-in",
                f"{name}.csr",
                "-CA",
                "ca.pem",
                "-CAkey",
                "ca.key",
                "-CAcreateserial",
                "-days",
                "30",
                "-extfile",
                f"{name}.ext",
                "-out",
                f"{name}.pem",
            ],
            cwd=PKI,
        )
    for f in PKI.iterdir():
        os.chmod(f, 0o600 if f.suffix == ".key" else 0o644)
    return PKI


def restart_nfsd(threads: int) -> None:
    """Stop nfsd (closes every server transport, drops client state), start it again."""
    lg.sh(["rpc.nfsd", "0"], check=False)
    lg.sh(["exportfs", "-f"], check=False)
    lg.sh(["rpc.nfsd", "-N", "3", str(threads)])


def daemon_tree() -> list[psutil.Process]:
    pid = lg.daemon_pid()
    if pid is None:
        return []
    try:
        root = psutil.Process(pid)
        return [root, *root.children(recursive=True)]
    except psutil.Error:
        return []


def tree_cpu() -> float:
    total = 0.0
    for p in daemon_tree():
        try:
            t = p.cpu_times()
            total += t.user + t.system
        except psutil.Error:
            pass
    return total


def settle(max_s: float = 90.0) -> float:
    """Wait until the daemon's processes use < 2% CPU over a second (started up)."""
    t0 = time.monotonic()
    last = tree_cpu()
    while time.monotonic() - t0 < max_s:
        time.sleep(1.0)
        now = tree_cpu()
        if now - last < 0.02:
            break
        last = now
    return round(time.monotonic() - t0, 2)


def tree_pss() -> tuple[int, int]:
    """(total PSS bytes, process count) of the daemon's processes."""
    total = n = 0
    for p in daemon_tree():
        try:
            total += p.memory_full_info().pss
            n += 1
        except psutil.Error:
            pass
    return total, n


class PssSampler(threading.Thread):
    def __init__(self, interval: float = 0.25) -> None:
        super().__init__(daemon=True)
        self.interval = interval
        self.stop = threading.Event()
        self.peak = 0
        self.peak_procs = 0
        self.max_procs = 0
        self.samples = 0

    def run(self) -> None:
        while not self.stop.is_set():
            pss, n = tree_pss()
            self.samples += 1
            self.max_procs = max(self.max_procs, n)
            if pss > self.peak:
                self.peak, self.peak_procs = pss, n
            self.stop.wait(self.interval)


# ----------------------------------------------------------------------- tracing


def trace_clear() -> None:
    (TRACING / "trace").write_text("")


def read_events() -> list[dict]:
    return lg.read_trace()


def summarize_requests(events: list[dict], mark: str) -> list[dict]:
    """Per request (after the marker): role, t_submit, t_accept, t_done, status."""
    start = None
    for i, e in enumerate(events):
        if e["event"] == "tracing_mark_write" and mark in e["text"]:
            start = i
    events = events[start + 1 :] if start is not None else events
    reqs: dict[str, dict] = {}
    finished: list[dict] = []
    for e in events:
        req = e["fields"].get("req")
        if not req or not e["event"].startswith("handshake_") or not req.strip("0"):
            continue
        ev = e["event"]
        if ev == "handshake_submit" and req in reqs:
            # the kernel reuses a freed request's address: a new request
            finished.append(reqs.pop(req))
        r = reqs.setdefault(req, {"req": req})
        if ev == "handshake_submit":
            r["role"] = "server" if e["comm"].startswith("nfsd") else "client"
            r["t_submit"] = e["ts"]
        elif ev == "handshake_cmd_accept":
            r["t_accept"] = e["ts"]
        elif ev == "handshake_cmd_done":
            r["t_done"] = e["ts"]
        elif ev == "handshake_complete":
            r["t_complete"] = e["ts"]
            r["status"] = int(e["fields"].get("status", "0"))
        elif ev in ("handshake_cancel", "handshake_cancel_busy", "handshake_cancel_none"):
            r.setdefault("cancel_events", []).append(ev)
            r.setdefault("t_cancel", e["ts"])
        elif ev.endswith("_err"):
            r.setdefault("errors", []).append(f"{ev} {e['text']}")
    out = [r for r in [*finished, *reqs.values()] if "t_submit" in r]
    for r in out:
        if "t_complete" in r:
            r["latency"] = round(r["t_complete"] - r["t_submit"], 4)
    return sorted(out, key=lambda r: r["t_submit"])


# ----------------------------------------------------------------------- bursts


def mount_one(addr: str, mnt: str, timeout: float, t0: float, out: dict) -> None:
    Path(mnt).mkdir(parents=True, exist_ok=True)
    try:
        p = subprocess.run(
            ["mount", "-t", "nfs4", "-o", "vers=4.2,xprtsec=tls", f"{addr}:/", mnt],
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
        rc, msg = p.returncode, (p.stdout + p.stderr).strip()
    except subprocess.TimeoutExpired:
        rc, msg = -1, f"timed out after {timeout}s"
    out.update(addr=addr, rc=rc, output=msg, seconds=round(time.monotonic() - t0, 3))


def find_busy_worker() -> int | None:
    """A worker of our daemon in the middle of a handshake (title not 'idle')."""
    for p in daemon_tree():
        try:
            title = " ".join(p.cmdline()).strip()
        except psutil.Error:
            continue
        busy = title.startswith("tlshd: worker ") and not title.endswith(" idle")
        if busy and "handoff" not in title:
            return p.pid
    return None


def killer(result: dict, delay: float, stop: threading.Event) -> None:
    """SIGKILL one busy worker once the burst has run `delay` seconds."""
    stop.wait(delay)
    while not stop.is_set():
        pid = find_busy_worker()
        if pid is not None:
            try:
                title = " ".join(psutil.Process(pid).cmdline()).strip()
            except psutil.Error:
                continue
            lg.trace_mark(f"BURST KILL {pid}")
            os.kill(pid, signal.SIGKILL)
            result.update(pid=pid, title=title, uptime=lg.uptime())
            return
        time.sleep(0.05)


def run_burst(kind: str, size: int, label: str, kill: bool = False) -> dict:
    threads = int(os.environ.get("BURST_NFSD_THREADS", "16"))
    mount_timeout = float(os.environ.get("BURST_MOUNT_TIMEOUT", "240"))
    lg.log(f"=== burst {label}: {kind}, {size} mounts")
    restart_nfsd(threads)
    t_start = time.monotonic()
    pid = lg.start_daemon(kind, wait=120)
    listening_s = round(time.monotonic() - t_start, 2)
    settle_s = settle()
    # nfsd restarted: its grace period (10 s) must not overlap the burst
    remaining = 11.0 - (time.monotonic() - t_start)
    if remaining > 0:
        time.sleep(remaining)
    idle_pss, idle_procs = tree_pss()
    addrs = take_addresses(size)
    mnts = [f"/mnt/burst/{a}" for a in addrs]
    trace_clear()
    mark = f"BURST {label} begin"
    lg.trace_mark(mark)
    sampler = PssSampler()
    sampler.start()
    kill_result: dict = {}
    kill_stop = threading.Event()
    kthread = None
    if kill:
        kthread = threading.Thread(target=killer, args=(kill_result, 1.0, kill_stop), daemon=True)
    outs: list[dict] = [{} for _ in addrs]
    t0 = time.monotonic()
    workers = [
        threading.Thread(target=mount_one, args=(a, m, mount_timeout, t0, o), daemon=True)
        for a, m, o in zip(addrs, mnts, outs, strict=True)
    ]
    for w in workers:
        w.start()
    if kthread is not None:
        kthread.start()
    for w in workers:
        w.join()
    wall = time.monotonic() - t0
    kill_stop.set()
    time.sleep(1.0)  # let stragglers' DONEs and cancels land in the trace
    sampler.stop.set()
    sampler.join()
    events = read_events()
    reqs = summarize_requests(events, mark)
    kill_to_done = None
    if kill_result:
        kill_to_done = kill_delay(events, f"BURST KILL {kill_result['pid']}")
    lg.log(f"burst {label}: wall {wall:.2f}s, {sum(o['rc'] == 0 for o in outs)}/{size} ok")
    # clean up: unmount all (in parallel), stop the daemon
    umounts = [
        threading.Thread(target=lg.sh, args=(["umount", "-f", m],), kwargs={"check": False})
        for m in mnts
    ]
    for u in umounts:
        u.start()
    for u in umounts:
        u.join()
    still = [m for m in mnts if f" {m} " in Path("/proc/mounts").read_text()]
    stats = daemon_status() if kind == "ours" else None
    lg.stop_daemon()
    return {
        "label": label,
        "daemon": kind,
        "size": size,
        "kill": kill,
        "daemon_pid": pid,
        "listening_s": listening_s,
        "settle_s": settle_s,
        "wall_s": round(wall, 3),
        "mounts": outs,
        "mounts_ok": sum(1 for o in outs if o["rc"] == 0),
        "still_mounted_after_umount": still,
        "idle_pss_bytes": idle_pss,
        "idle_procs": idle_procs,
        "peak_pss_bytes": sampler.peak,
        "peak_pss_procs": sampler.peak_procs,
        "max_procs": sampler.max_procs,
        "pss_samples": sampler.samples,
        "requests": reqs,
        "kill_result": kill_result,
        "kill_to_done_s": kill_to_done,
        "daemon_status": stats,
    }


def kill_delay(events: list[dict], mark: str) -> dict | None:
    """Trace time from the kill marker to the first DONE with status -EIO."""
    t_kill = None
    for e in events:
        if e["event"] == "tracing_mark_write" and mark in e["text"]:
            t_kill = e["ts"]
        elif (
            t_kill is not None
            and e["event"] == "handshake_complete"
            and int(e["fields"].get("status", "0")) == -EIO
        ):
            return {
                "seconds": round(e["ts"] - t_kill, 4),
                "req": e["fields"].get("req"),
                "comm": e["comm"],
            }
    return None


def daemon_status() -> dict | None:
    p = lg.sh(["/opt/tlshd/bin/tlshd", "status", "--json", "-c", str(lg.CONFIG)], check=False,
              timeout=30)  # fmt: skip
    try:
        return json.loads(p.stdout)
    except ValueError:
        return None


IMPORTS = "import tlshd.cli, tlshd.supervisor.arbiter, tlshd.workers.engine, tlshd.workers.base"


def import_profile(name: str) -> float:
    """`python -X importtime` of the daemon's modules -> results/<name>; wall seconds."""
    t0 = time.monotonic()
    p = lg.sh([sys.executable, "-X", "importtime", "-c", IMPORTS], check=False, timeout=300)
    (RESULTS / name).write_text(p.stderr)
    return round(time.monotonic() - t0, 2)


def compile_project() -> float:
    """Byte-compile our package, as `pip install` does (the lab unpacks the wheel
    without it and exports PYTHONDONTWRITEBYTECODE, so every daemon start would
    compile every module from source)."""
    t0 = time.monotonic()
    pkg = Path(sysconfig.get_paths()["purelib"]) / "tlshd"
    lg.sh([sys.executable, "-m", "compileall", "-q", str(pkg)], timeout=600)
    return round(time.monotonic() - t0, 2)


LOGS = Path("/run/burst-logs")


def logs_to_tmpfs() -> None:
    """Daemon stderr and syslog to tmpfs, copied to the results at the end.

    The lab sends both to files on the 9p results share; every write there is
    a synchronous round trip to QEMU, which under a loaded host took long
    enough to stall the (chattier, loglevel=1 is DEBUG) supervisor for
    seconds.  The benchmark measures the daemons, not the lab's log share."""
    LOGS.mkdir(parents=True, exist_ok=True)
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                cmd = (d / "cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if b"syslogd" in cmd[:2] or (len(cmd) > 1 and cmd[1] == b"syslogd"):
                os.kill(int(d.name), signal.SIGTERM)
    time.sleep(0.5)
    subprocess.Popen(["busybox", "syslogd", "-n", "-O", str(LOGS / "syslog.log")],
                     start_new_session=True)  # fmt: skip
    lg.RESULTS = LOGS  # lg.start_daemon/stop_daemon write daemon-<kind>.log there


def save_logs() -> None:
    for f in LOGS.iterdir():
        (RESULTS / f"burst-{f.name}").write_bytes(f.read_bytes())


def main() -> int:
    sizes = [int(s) for s in env_list("BURST_SIZES", "8 32 64")]
    daemons = env_list("BURST_DAEMONS", "upstream ours")
    rounds = int(os.environ.get("BURST_ROUNDS", "1"))
    kill_size = int(os.environ.get("BURST_KILL", "16"))
    needed = rounds * len(daemons) * sum(sizes) + kill_size
    lg.log(f"burst benchmark: sizes {sizes}, daemons {daemons}, rounds {rounds}, "
           f"kill burst {kill_size}; {needed} addresses")  # fmt: skip
    make_pki(needed)
    startup = {}
    if os.environ.get("BURST_IMPORTTIME", "1") == "1":
        startup["import_s_uncompiled"] = import_profile("importtime-uncompiled.txt")
    if os.environ.get("BURST_COMPILE", "1") == "1":
        startup["compileall_s"] = compile_project()
        if os.environ.get("BURST_IMPORTTIME", "1") == "1":
            startup["import_s_compiled"] = import_profile("importtime-compiled.txt")
    meminfo = Path("/proc/meminfo").read_text()
    lg.write_config(PKI)
    if os.environ.get("BURST_LOGS_ON_TMPFS", "1") == "1":
        logs_to_tmpfs()
    lg.trace_on()
    lg.nfs_server()
    out: dict = {
        "settings": {
            "sizes": sizes,
            "daemons": daemons,
            "rounds": rounds,
            "kill_size": kill_size,
            "nfsd_threads": int(os.environ.get("BURST_NFSD_THREADS", "16")),
            "mem_total_kib": int(re.findall(r"MemTotal:\s+(\d+)", meminfo)[0]),
            "cpus": os.cpu_count(),
            "kernel": os.uname().release,
            "config": lg.CONFIG.read_text(),
            "startup": startup,
            "logs_on_tmpfs": LOGS.is_dir(),
        },
        "bursts": [],
    }
    dest = RESULTS / "burst.json"
    for rnd in range(1, rounds + 1):
        for size in sizes:
            for kind in daemons:
                label = f"r{rnd}-{kind}-{size}"
                try:
                    out["bursts"].append(run_burst(kind, size, label))
                except Exception:
                    traceback.print_exc()
                    out["bursts"].append({"label": label, "daemon": kind, "size": size,
                                          "error": traceback.format_exc()})  # fmt: skip
                    lg.stop_daemon()
                dest.write_text(json.dumps(out, indent=1, default=str) + "\n")
    if kill_size:
        label = f"kill-ours-{kill_size}"
        try:
            out["bursts"].append(run_burst("ours", kill_size, label, kill=True))
        except Exception:
            traceback.print_exc()
            out["bursts"].append({"label": label, "error": traceback.format_exc()})
            lg.stop_daemon()
    dest.write_text(json.dumps(out, indent=1, default=str) + "\n")
    if LOGS.is_dir():
        save_logs()
    lg.log(f"wrote {dest}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
