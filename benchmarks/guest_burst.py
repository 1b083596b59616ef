#!/opt/tlshd/bin/python3
"""Burst benchmark, guest side: concurrent NFS-over-TLS mounts against both daemons.

Runs inside the lab guest (tests/lab), as the scenario of ONE boot, with the
guest venv's Python (it has psutil).  Settings come from the environment:

    BURST_MODES     "cold warm"        cold: mounts start the moment the daemon
                                       is ready (ours: its "serving handshakes"
                                       line, i.e. READY; upstream: 1 s after
                                       start); warm: after the daemon settled;
                                       serial: as cold, but one mount after
                                       another
    BURST_SIZES     "8 32 64"          mounts per burst
    BURST_DAEMONS   "upstream ours"    daemons, in this order for every size;
                                       "hosts" is ours with [pool]
                                       handshakes_per_worker (the alternative
                                       design, workers/host.py)
    BURST_HANDSHAKES_PER_WORKER "8"    that setting, for "hosts"
    BURST_ROUNDS    "5"                how many times each (mode, size) runs
    BURST_KILL      "0"                size of an extra warm burst (ours) with one
                                       worker SIGKILLed mid-handshake; 0: none
    BURST_MOUNT_TIMEOUT "240"          seconds one mount may take
    BURST_NFSD_THREADS  "16"
    BURST_COMPILE       "1"            byte-compile our package first (as pip would)
    BURST_IMPORTTIME    "1"            save `python -X importtime` of the daemon
    BURST_LOGS_ON_TMPFS "1"            daemon stderr + syslog on tmpfs, not the 9p share

Both daemons use upstream's default configuration: no [pool] section,
loglevel=0, ECDSA P-256 certificates (tests/lab/guest/labguest.py builds the
PKI).  For every (round, mode, size, daemon): nfsd is restarted and its grace
period left to pass, the daemon is started, N `mount -t nfs4 -o
vers=4.2,xprtsec=tls` run at once to N distinct 127.x.y.z addresses never used
before in the boot, then everything is unmounted and the daemon is stopped.
Per request, the kernel's handshake tracepoints are folded by
labguest.fold_requests (one record per submit, also when the kernel reuses a
request address).  CPU: the guest's busy ticks in /proc/stat during the burst
(upstream ignores SIGCHLD, so its reaped children never reach anyone's
cutime, and a per-process sum would undercount it).

Results: /lab/results/burst.json (one record per burst) - benchmarks/burst.py reads it.
"""

from __future__ import annotations

import contextlib
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
EIO = 5
NFSD_GRACE_S = 11.0  # nfsd's grace period after a restart (10 s) must not overlap a burst
OUR_KINDS = ("ours", "hosts")
HOSTS_CONFIG = Path("/etc/tlshd/config-hosts")
UPSTREAM_READY_S = 1.0  # upstream says nothing when it is ready: mounts start 1 s after exec
READY_LINE = "serving handshakes"

# Every mount gets an address no earlier mount of this boot used, so each
# mount makes a fresh NFS client (and fresh client + server handshakes).
ADDRESSES = [f"127.{b}.{c}.{d}" for b in (0, 1) for c in range(0, 8) for d in range(1, 255)]
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


def restart_nfsd(threads: int) -> float:
    """Stop nfsd (closes every server transport, drops client state), start
    it again; the monotonic time it was started."""
    lg.sh(["rpc.nfsd", "0"], check=False)
    lg.sh(["exportfs", "-f"], check=False)
    lg.sh(["rpc.nfsd", "-N", "3", str(threads)])
    return time.monotonic()


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


def tree_cpu_with_reaped() -> float:
    """CPU seconds of the daemon's live processes plus every child they have
    reaped (cutime/cstime): our workers are reaped by the zygote, a replaced
    zygote by the supervisor.  Upstream ignores SIGCHLD, so its children never
    reach cutime: the number means nothing for it (the guest-wide /proc/stat
    figure is the comparable one)."""
    total = 0.0
    for p in daemon_tree():
        try:
            t = p.cpu_times()
            total += t.user + t.system + t.children_user + t.children_system
        except psutil.Error:
            pass
    return total


CGROUP_ROOT = Path("/sys/fs/cgroup")


def daemon_cgroup(kind: str) -> Path | None:
    """A cgroup v2 directory of its own for `kind`'s daemon, or None.

    Its cpu.stat counts every process that ever ran in it, reaped or not, so
    it measures both daemons the same way (upstream's children, which it
    never waits for, included)."""
    try:
        if not (CGROUP_ROOT / "cgroup.controllers").exists():
            lg.sh(["mount", "-t", "cgroup2", "cgroup2", str(CGROUP_ROOT)], check=False)
        path = CGROUP_ROOT / f"tlshd-burst-{kind}"
        path.mkdir(exist_ok=True)
        return path if (path / "cpu.stat").exists() else None
    except OSError as err:
        lg.log(f"no cgroup for {kind}: {err}")
        return None


def cgroup_cpu_s(path: Path | None) -> float | None:
    """usage_usec of the cgroup's cpu.stat (always there in cgroup v2), in s."""
    if path is None:
        return None
    for line in (path / "cpu.stat").read_text().splitlines():
        name, _, value = line.partition(" ")
        if name == "usage_usec":
            return int(value) / 1e6
    return None


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
    """Samples the daemon's PSS every `interval` seconds during a burst.

    Runs SCHED_FIFO 1 (this thread only): our daemon's session runs at the
    autogroup weight of nice -20 during a burst (supervisor/priority.py), and
    a nice-0 sampler in another session then took 12-17 samples in a 17 s
    burst instead of about 68, missing the peak."""

    def __init__(self, interval: float = 0.25) -> None:
        super().__init__(daemon=True)
        self.interval = interval
        self.stop = threading.Event()
        self.peak = 0
        self.peak_procs = 0
        self.max_procs = 0
        self.samples = 0

    def run(self) -> None:
        with contextlib.suppress(OSError):  # the calling thread only
            os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(1))
        while not self.stop.is_set():
            pss, n = tree_pss()
            self.samples += 1
            self.max_procs = max(self.max_procs, n)
            if pss > self.peak:
                self.peak, self.peak_procs = pss, n
            self.stop.wait(self.interval)


def cpu_ticks() -> tuple[int, int]:
    """(busy, total) clock ticks of the whole guest, from /proc/stat's `cpu` line.
    Busy: everything but idle and iowait."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)
    total = sum(fields[:8])
    return total - idle, total


# ----------------------------------------------------------------------- the daemon


DAEMON_CGROUP: dict[str, Path | None] = {}


def start_daemon(kind: str) -> tuple[int, float]:
    """Start `kind`; (pid, seconds from exec until it is ready to be used).

    Ours is ready at its "serving handshakes" line (the moment it sends
    READY to systemd); upstream says nothing, so it gets 1 s."""
    lg.sh(["modprobe", "tls"])
    if kind == "hosts":
        argv = [*lg.OURS[:-1], str(HOSTS_CONFIG)]
    elif kind == "ours":
        argv = lg.OURS
    else:
        argv = lg.UPSTREAM
    log_path = lg.RESULTS / f"daemon-{kind}.log"
    with open(log_path, "a") as f:
        f.write(f"==== [{lg.uptime():.2f}] starting {' '.join(argv)}\n")
    offset = log_path.stat().st_size
    logf = open(log_path, "a")  # noqa: SIM115 - the daemon keeps writing to it
    cgroup = daemon_cgroup(kind)
    DAEMON_CGROUP[kind] = cgroup
    procs_file = cgroup / "cgroup.procs" if cgroup is not None else None

    def enter_cgroup() -> None:  # in the child, before exec: "0" is the writer itself
        if procs_file is not None:
            procs_file.write_text("0")

    t0 = time.monotonic()
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=logf, stderr=logf,
                            start_new_session=True, preexec_fn=enter_cgroup)  # fmt: skip
    lg.PIDFILE.write_text(f"{proc.pid}\n")
    if kind == "upstream":
        time.sleep(UPSTREAM_READY_S)
        if proc.poll() is not None:
            raise RuntimeError(f"upstream exited rc={proc.returncode} at start-up")
        return proc.pid, UPSTREAM_READY_S
    with open(log_path, errors="replace") as f:
        f.seek(offset)
        text = ""
        while READY_LINE not in text:
            if proc.poll() is not None:
                raise RuntimeError(f"ours exited rc={proc.returncode} at start-up")
            if time.monotonic() - t0 > 120:
                raise RuntimeError("ours not ready after 120 s")
            text += f.read()
            time.sleep(0.01)
    return proc.pid, round(time.monotonic() - t0, 3)


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
    """A worker of our daemon in the middle of a handshake (title names a phase)."""
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


def run_burst(mode: str, kind: str, size: int, label: str, kill: bool = False) -> dict:
    threads = int(os.environ.get("BURST_NFSD_THREADS", "16"))
    mount_timeout = float(os.environ.get("BURST_MOUNT_TIMEOUT", "240"))
    lg.log(f"=== burst {label}: {mode}, {kind}, {size} mounts")
    nfsd_started = restart_nfsd(threads)
    addrs = take_addresses(size)
    mnts = [f"/mnt/burst/{a}" for a in addrs]
    for m in mnts:
        Path(m).mkdir(parents=True, exist_ok=True)
    if mode in ("cold", "serial"):
        # The grace period passes before the daemon starts, so the mounts can
        # start the moment the daemon is ready.
        time.sleep(max(0.0, NFSD_GRACE_S - (time.monotonic() - nfsd_started)))
    lg.trace_on()  # clears the buffer
    mark = f"BURST {label} begin"
    lg.trace_mark(mark)
    sampler = PssSampler()
    start_busy0, _ = cpu_ticks()
    pid, ready_s = start_daemon(kind)
    start_busy1, _ = cpu_ticks()
    if kind in OUR_KINDS and os.environ.get("BURST_SCHED_TRACE", "off") != "off":
        sched_trace(pid)
    settle_s = None
    idle_pss = idle_procs = None
    if mode == "warm":
        settle_s = settle()
        time.sleep(max(0.0, NFSD_GRACE_S - (time.monotonic() - nfsd_started)))
        idle_pss, idle_procs = tree_pss()
    sampler.start()
    daemon_cpu0 = tree_cpu_with_reaped()
    cgroup_cpu0 = cgroup_cpu_s(DAEMON_CGROUP.get(kind))
    busy0, total0 = cpu_ticks()
    kill_result: dict = {}
    kill_stop = threading.Event()
    kthread = None
    if kill:
        kthread = threading.Thread(target=killer, args=(kill_result, 1.0, kill_stop), daemon=True)
    outs: list[dict] = [{} for _ in addrs]
    t0 = time.monotonic()
    mounts = [
        threading.Thread(target=mount_one, args=(a, m, mount_timeout, t0, o), daemon=True)
        for a, m, o in zip(addrs, mnts, outs, strict=True)
    ]
    if mode == "serial":
        # One mount after another: a cold daemon's first handshakes, one at a time.
        for w in mounts:
            w.start()
            w.join()
    else:
        for w in mounts:
            w.start()
    if kthread is not None:
        kthread.start()
    for w in mounts:
        w.join()
    wall = time.monotonic() - t0
    busy1, total1 = cpu_ticks()
    kill_stop.set()
    time.sleep(1.0)  # let stragglers' DONEs and cancels land in the trace
    daemon_cpu = tree_cpu_with_reaped() - daemon_cpu0
    cgroup_cpu1 = cgroup_cpu_s(DAEMON_CGROUP.get(kind))
    sampler.stop.set()
    sampler.join()
    if idle_pss is None:  # cold: idle is after the burst, once the daemon is quiet again
        settle()
        idle_pss, idle_procs = tree_pss()
    events = lg.read_trace_since(mark)
    reqs = lg.fold_requests(events)
    if kind in OUR_KINDS and os.environ.get("BURST_SCHED_TRACE", "off") != "off":
        sched_trace_off(label)
    # Submissions the kernel refused at once (no record in `reqs`): EAGAIN when
    # more than hn_pending_max requests wait unaccepted (kernel-protocol.md).
    refused = [e["fields"].get("err", "?") for e in events if e["event"] == "handshake_submit_err"]
    kill_to_done = None
    if kill_result:
        kill_to_done = kill_delay(events, f"BURST KILL {kill_result['pid']}")
    ok = sum(o["rc"] == 0 for o in outs)
    lg.log(f"burst {label}: wall {wall:.2f}s, {ok}/{size} ok, ready after {ready_s}s")
    umounts = [
        threading.Thread(target=lg.sh, args=(["umount", "-f", m],), kwargs={"check": False})
        for m in mnts
    ]
    for u in umounts:
        u.start()
    for u in umounts:
        u.join()
    still = [m for m in mnts if f" {m} " in Path("/proc/mounts").read_text()]
    stats = daemon_status() if kind in OUR_KINDS else None
    lg.stop_daemon()
    clk_tck = os.sysconf("SC_CLK_TCK")
    return {
        "label": label,
        "mode": mode,
        "daemon": kind,
        "size": size,
        "kill": kill,
        "daemon_pid": pid,
        "ready_s": ready_s,
        "settle_s": settle_s,
        "wall_s": round(wall, 3),
        "cpu_busy_s": round((busy1 - busy0) / clk_tck, 2),
        "start_cpu_busy_s": round((start_busy1 - start_busy0) / clk_tck, 2),
        "cpu_total_s": round((total1 - total0) / clk_tck, 2),
        "daemon_cpu_s": round(daemon_cpu, 2) if kind in OUR_KINDS else None,
        # Both daemons, from their cgroups: the figure to compare.
        "daemon_cgroup_cpu_s": (
            round(cgroup_cpu1 - cgroup_cpu0, 3)
            if cgroup_cpu0 is not None and cgroup_cpu1 is not None
            else None
        ),
        "mounts": outs,
        "mounts_ok": ok,
        "still_mounted_after_umount": still,
        "idle_pss_bytes": idle_pss,
        "idle_procs": idle_procs,
        "peak_pss_bytes": sampler.peak,
        "peak_pss_procs": sampler.peak_procs,
        "max_procs": sampler.max_procs,
        "pss_samples": sampler.samples,
        "requests": reqs,
        "submit_refused": len(refused),
        "submit_refused_errs": sorted(set(refused)),
        "kill_result": kill_result,
        "kill_to_done_s": kill_to_done,
        "daemon_status": stats,
    }


def sched_trace(pid: int) -> None:
    """Trace the supervisor's wake-ups and context switches (prev_state R:
    preempted; S: waiting), to tell a loop that does not run from one that
    is busy.  Filtered to the one pid: the trace buffer is shared with the
    handshake events."""
    base = lg.TRACING / "events" / "sched"
    if os.environ.get("BURST_SCHED_TRACE") == "all":
        (lg.TRACING / "buffer_size_kb").write_text("65536\n")
        (base / "sched_switch" / "filter").write_text("0\n")
    else:
        (base / "sched_switch" / "filter").write_text(f"prev_pid == {pid} || next_pid == {pid}\n")
    (base / "sched_wakeup" / "filter").write_text(f"pid == {pid}\n")
    for ev in ("sched_switch", "sched_wakeup"):
        (base / ev / "enable").write_text("1\n")
    request = lg.TRACING / "events" / "module" / "module_request" / "enable"
    if request.exists():  # who runs modprobe during the burst
        request.write_text("1\n")


def sched_trace_off(label: str) -> None:
    base = lg.TRACING / "events" / "sched"
    for ev in ("sched_switch", "sched_wakeup"):
        (base / ev / "enable").write_text("0\n")
    request = lg.TRACING / "events" / "module" / "module_request" / "enable"
    if request.exists():
        request.write_text("0\n")
    lines = [ln for ln in (lg.TRACING / "trace").read_text(errors="replace").splitlines()
             if "sched_" in ln or "handshake_" in ln or "tracing_mark" in ln
             or "module_request" in ln]  # fmt: skip
    (RESULTS / f"sched-{label}.txt").write_text("\n".join(lines) + "\n")


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


IMPORTS = "import tlshd.cli, tlshd.supervisor.arbiter"
IMPORTS_ZYGOTE = "import tlshd.workers.engine, tlshd.workers.base"


def import_profile(name: str, imports: str) -> float:
    """`python -X importtime` of some of the daemon's modules -> results/<name>; wall seconds."""
    t0 = time.monotonic()
    p = lg.sh([sys.executable, "-X", "importtime", "-c", imports], check=False, timeout=300)
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
    a synchronous round trip to QEMU, which under a loaded host could stall a
    daemon for seconds.  The benchmark measures the daemons, not the share."""
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
    lg.RESULTS = LOGS  # lg.stop_daemon and our start_daemon write daemon-<kind>.log there


def save_logs() -> None:
    for f in LOGS.iterdir():
        (RESULTS / f"burst-{f.name}").write_bytes(f.read_bytes())


def main() -> int:
    modes = env_list("BURST_MODES", "cold warm")
    sizes = [int(s) for s in env_list("BURST_SIZES", "8 32 64")]
    daemons = env_list("BURST_DAEMONS", "upstream ours")
    rounds = int(os.environ.get("BURST_ROUNDS", "5"))
    kill_size = int(os.environ.get("BURST_KILL", "0"))
    needed = rounds * len(modes) * len(daemons) * sum(sizes) + kill_size
    lg.log(f"burst benchmark: modes {modes}, sizes {sizes}, daemons {daemons}, rounds {rounds}, "
           f"kill burst {kill_size}; {needed} addresses")  # fmt: skip
    lg.make_pki(PKI, ip_sans=ADDRESSES[:needed])
    startup = {}
    if os.environ.get("BURST_COMPILE", "1") == "1":
        startup["compileall_s"] = compile_project()
    if os.environ.get("BURST_IMPORTTIME", "1") == "1":
        startup["import_supervisor_s"] = import_profile("importtime-supervisor.txt", IMPORTS)
        startup["import_zygote_s"] = import_profile("importtime-zygote.txt", IMPORTS_ZYGOTE)
    meminfo = Path("/proc/meminfo").read_text()
    lg.write_config(PKI, loglevel=0)  # upstream's shipped default: no [pool], loglevel=0
    per_worker = int(os.environ.get("BURST_HANDSHAKES_PER_WORKER", "8"))
    if "hosts" in daemons:
        HOSTS_CONFIG.write_text(
            lg.CONFIG.read_text() + f"\n[pool]\nhandshakes_per_worker={per_worker}\n"
        )
    if os.environ.get("BURST_LOGS_ON_TMPFS", "1") == "1":
        logs_to_tmpfs()
    lg.trace_on()
    lg.nfs_server()
    out: dict = {
        "settings": {
            "modes": modes,
            "sizes": sizes,
            "daemons": daemons,
            "rounds": rounds,
            "kill_size": kill_size,
            "nfsd_threads": int(os.environ.get("BURST_NFSD_THREADS", "16")),
            "mem_total_kib": int(re.findall(r"MemTotal:\s+(\d+)", meminfo)[0]),
            "cpus": os.cpu_count(),
            "kernel": os.uname().release,
            "config": lg.CONFIG.read_text(),
            "handshakes_per_worker": per_worker if "hosts" in daemons else None,
            "startup": startup,
            "logs_on_tmpfs": LOGS.is_dir(),
        },
        "bursts": [],
    }
    dest = RESULTS / "burst.json"
    for rnd in range(1, rounds + 1):
        for mode in modes:
            for size in sizes:
                for kind in daemons:
                    label = f"r{rnd}-{mode}-{kind}-{size}"
                    try:
                        out["bursts"].append(run_burst(mode, kind, size, label))
                    except Exception:
                        traceback.print_exc()
                        error = traceback.format_exc()
                        out["bursts"].append(
                            {"label": label, "mode": mode, "daemon": kind, "size": size,
                             "error": error}
                        )  # fmt: skip
                        lg.stop_daemon()
                    dest.write_text(json.dumps(out, indent=1, default=str) + "\n")
    if kill_size:
        label = f"kill-warm-ours-{kill_size}"
        try:
            out["bursts"].append(run_burst("warm", "ours", kill_size, label, kill=True))
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
