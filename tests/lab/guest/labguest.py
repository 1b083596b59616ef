#!/usr/bin/python3
"""Guest-side helpers of the tlshd lab (runs inside the VM, stdlib only).

Usable as a module (``import labguest``; /lab/run is on PYTHONPATH) or as a
command: ``lab pki``, ``lab config``, ``lab start-daemon [ours|upstream]``,
``lab stop-daemon``, ``lab kill-daemon``, ``lab trace-on``, ``lab nfs-server``,
``lab tls-stat``, ``lab handshakes``.  The daemon kind defaults to
``$LAB_DAEMON``.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

RESULTS = Path("/lab/results")
PKI = Path("/etc/tlshd/pki")
CONFIG = Path("/etc/tlshd/config")
TRACING = Path("/sys/kernel/tracing")
PIDFILE = Path("/run/lab-daemon.pid")
OURS = ["/opt/tlshd/bin/tlshd", "-s", "-c", str(CONFIG)]
UPSTREAM = ["/usr/sbin/tlshd", "-s", "-c", str(CONFIG)]
SAN_IPS = 32  # the server certificate covers 127.0.0.1 .. 127.0.0.32
TRACE_EVENTS = [
    "handshake/handshake_submit",
    "handshake/handshake_submit_err",
    "handshake/handshake_cmd_accept",
    "handshake/handshake_cmd_accept_err",
    "handshake/handshake_cmd_done",
    "handshake/handshake_cmd_done_err",
    "handshake/handshake_complete",
    "handshake/handshake_cancel",
    "handshake/handshake_cancel_none",
    "handshake/handshake_cancel_busy",
    "handshake/handshake_destruct",
    "handshake/tls_alert_send",
    "handshake/tls_alert_recv",
]


def sh(cmd: list[str] | str, check: bool = True, timeout: float | None = None,
       **kw: object) -> subprocess.CompletedProcess:  # fmt: skip
    """Run a command, capture its output as text."""
    p = subprocess.run(cmd, shell=isinstance(cmd, str), capture_output=True, text=True,
                       timeout=timeout, check=False, **kw)  # type: ignore[call-overload]  # fmt: skip
    if check and p.returncode != 0:
        raise RuntimeError(f"{cmd!r} failed rc={p.returncode}: {p.stdout}{p.stderr}")
    return p


def uptime() -> float:
    return float(Path("/proc/uptime").read_text().split()[0])


def log(msg: str) -> None:
    print(f"[{uptime():8.2f}] {msg}", flush=True)


# ----------------------------------------------------------------------- PKI


def make_pki(pki: Path = PKI, ip_sans: list[str] | None = None) -> Path:
    """ECDSA P-256 CA, server cert, client cert: the one PKI builder of the lab
    and the benchmark.  The server's SAN is localhost, tlshd-lab and `ip_sans`
    (default 127.0.0.1 .. 127.0.0.32)."""
    pki.mkdir(parents=True, exist_ok=True)
    if (pki / "client.pem").exists():
        return pki
    if ip_sans is None:
        ip_sans = [f"127.0.0.{i}" for i in range(1, SAN_IPS + 1)]
    sans = ",".join(["DNS:localhost", "DNS:tlshd-lab"] + [f"IP:{a}" for a in ip_sans])
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes"]
    sh(["openssl", "req", "-x509", *ec, "-keyout", "ca.key", "-out", "ca.pem", "-days", "30",
        "-subj", "/CN=tlshd lab CA", "-addext", "basicConstraints=critical,CA:TRUE",
        "-addext", "keyUsage=critical,keyCertSign,cRLSign"], cwd=pki)  # fmt: skip
    for name, ext in (
        ("server", f"subjectAltName={sans}\nextendedKeyUsage=serverAuth\n"),
        ("client", "subjectAltName=DNS:lab-client\nextendedKeyUsage=clientAuth\n"),
    ):
        sh(["openssl", "req", *ec, "-keyout", f"{name}.key", "-out", f"{name}.csr",
            "-subj", f"/CN=lab-{name}"], cwd=pki)  # fmt: skip
        (pki / f"{name}.ext").write_text(
            "basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature\n" + ext
        )
        sh(["openssl", "x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
            "-CAcreateserial", "-days", "30", "-extfile", f"{name}.ext", "-out", f"{name}.pem"],
           cwd=pki)  # fmt: skip
    for f in pki.iterdir():
        os.chmod(f, 0o600 if f.suffix == ".key" else 0o644)
    return pki


def write_config(pki: Path = PKI, extra: str = "", loglevel: int = 1) -> Path:
    """Upstream-format /etc/tlshd/config, used by both daemons."""
    CONFIG.parent.mkdir(parents=True, exist_ok=True)
    text = f"[debug]\nloglevel={loglevel}\ntls=0\nnl=0\n\n"
    for side in ("client", "server"):
        text += (
            f"[authenticate.{side}]\n"
            f"x509.truststore={pki}/ca.pem\n"
            f"x509.certificate={pki}/{side}.pem\n"
            f"x509.private_key={pki}/{side}.key\n\n"
        )
    CONFIG.write_text(text + extra)
    CONFIG.chmod(0o644)
    return CONFIG


# ----------------------------------------------------------------------- daemon


def daemon_kind(kind: str | None = None) -> str:
    kind = kind or os.environ.get("LAB_DAEMON") or "ours"
    if kind not in ("ours", "upstream"):
        raise ValueError(f"daemon kind must be ours or upstream, not {kind!r}")
    return kind


def _genl_listener_inodes() -> set[str]:
    """Inodes of NETLINK_GENERIC sockets subscribed to some multicast group."""
    out = set()
    for line in Path("/proc/net/netlink").read_text().splitlines()[1:]:
        f = line.split()
        # sk Eth Pid Groups Rmem Wmem Dump Locks Drops Inode
        if len(f) >= 10 and f[1] == "16" and int(f[3], 16) != 0:
            out.add(f[9])
    return out


def _pids_tree(root: int) -> list[int]:
    kids: dict[int, list[int]] = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                ppid = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            kids.setdefault(ppid, []).append(int(d.name))
    out, todo = [], [root]
    while todo:
        p = todo.pop()
        out.append(p)
        todo += kids.get(p, [])
    return out


def _listening(pid: int) -> bool:
    want = _genl_listener_inodes()
    for p in _pids_tree(pid):
        try:
            for fd in Path(f"/proc/{p}/fd").iterdir():
                m = re.match(r"socket:\[(\d+)\]", os.readlink(fd))
                if m and m.group(1) in want:
                    return True
        except OSError:
            continue
    return False


def alive(pid: int) -> bool:
    try:
        st = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return st != "Z"


last_start_seconds: float | None = None  # start_daemon(): time until it listened


def start_daemon(kind: str | None = None, wait: float = 60.0) -> int:
    """Start the handshake daemon; return its pid once it listens on netlink."""
    kind = daemon_kind(kind)
    sh(["modprobe", "tls"])
    if not CONFIG.exists():
        make_pki()
        write_config()
    argv = OURS if kind == "ours" else UPSTREAM
    logf = open(RESULTS / f"daemon-{kind}.log", "a")  # noqa: SIM115
    logf.write(f"==== [{uptime():.2f}] starting {' '.join(argv)}\n")
    logf.flush()
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=logf, stderr=logf,
                            start_new_session=True)  # fmt: skip
    PIDFILE.write_text(f"{proc.pid}\n")
    t0 = time.monotonic()
    while time.monotonic() - t0 < wait:
        if proc.poll() is not None:
            raise RuntimeError(f"{kind} daemon exited rc={proc.returncode} at start-up "
                               f"(see daemon-{kind}.log)")  # fmt: skip
        if _listening(proc.pid):
            global last_start_seconds
            last_start_seconds = round(time.monotonic() - t0, 2)
            log(f"{kind} daemon pid {proc.pid} listening after {last_start_seconds}s")
            return proc.pid
        time.sleep(0.2)
    raise RuntimeError(f"{kind} daemon pid {proc.pid} not listening on netlink after {wait}s")


def nice_limit(pid: int) -> int | None:
    """The soft RLIMIT_NICE of `pid` ("Max nice priority" in /proc/PID/limits)."""
    try:
        for line in Path(f"/proc/{pid}/limits").read_text().splitlines():
            if line.startswith("Max nice priority"):
                return int(line.split()[3])
    except (OSError, ValueError, IndexError):
        pass
    return None


def daemon_pid() -> int | None:
    try:
        pid = int(PIDFILE.read_text())
    except (OSError, ValueError):
        return None
    return pid if alive(pid) else None


def stop_daemon(sig: int = signal.SIGTERM, timeout: float = 15.0) -> None:
    pid = daemon_pid()
    if pid is None:
        return
    tree = _pids_tree(pid)
    os.kill(pid, sig)
    t0 = time.monotonic()
    while alive(pid) and time.monotonic() - t0 < timeout:
        time.sleep(0.1)
    if sig != signal.SIGKILL:
        for p in tree:
            if alive(p):
                os.kill(p, signal.SIGKILL)
    with open(RESULTS / f"daemon-{daemon_kind()}.log", "a") as f:
        f.write(f"==== [{uptime():.2f}] sent signal {sig} to {pid}\n")


def kill_daemon() -> int | None:
    """SIGKILL the daemon's main process only (its children are left alone)."""
    pid = daemon_pid()
    if pid is not None:
        stop_daemon(signal.SIGKILL)
    return pid


# ----------------------------------------------------------------------- tracing


def trace_on() -> None:
    if not (TRACING / "events").is_dir():
        sh(["mount", "-t", "tracefs", "tracefs", str(TRACING)], check=False)
    (TRACING / "buffer_size_kb").write_text("8192\n")
    # The pid -> comm cache behind each trace line holds 128 tasks by default;
    # a boot's worth of short-lived processes evicts a kworker that submitted a
    # handshake before the trace is read, and the line then says "<...>"
    # (NVMe tells client from server by that comm).
    cmdlines = TRACING / "saved_cmdlines_size"
    if cmdlines.exists():
        cmdlines.write_text("8192\n")
    for ev in TRACE_EVENTS:
        f = TRACING / "events" / ev / "enable"
        if f.exists():
            f.write_text("1\n")
    for f in (TRACING / "events" / "sunrpc").glob("*tls*/enable"):
        f.write_text("1\n")
    (TRACING / "trace").write_text("")
    (TRACING / "tracing_on").write_text("1\n")


def trace_mark(text: str) -> None:
    with open(TRACING / "trace_marker", "w") as f:
        f.write(text + "\n")


TRACE_RE = re.compile(
    r"^\s*(?P<comm>.+?)-(?P<pid>\d+)\s+\[\d+\].*?\s(?P<ts>\d+\.\d+):\s+(?P<event>\w+):\s*(?P<rest>.*)$"
)


def comm_of(traced: str, pid: int) -> str:
    """The trace's comm, or the live task's when the trace lost it ("<...>":
    evicted from the comm cache); kworkers outlive the scenario."""
    if traced != "<...>":
        return traced
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip() or traced
    except OSError:
        return traced


def read_trace() -> list[dict]:
    """Parsed trace lines: comm, pid, ts, event, fields (key=value)."""
    out = []
    for line in (TRACING / "trace").read_text(errors="replace").splitlines():
        if line.startswith("#"):
            continue
        m = TRACE_RE.match(line)
        if not m:
            continue
        rest = m.group("rest")
        fields = dict(re.findall(r"(\w+)=(\S+)", rest))
        pid = int(m.group("pid"))
        out.append({"comm": comm_of(m.group("comm").strip(), pid), "pid": pid,
                    "ts": float(m.group("ts")), "event": m.group("event"), "fields": fields,
                    "text": rest})  # fmt: skip
    return out


def read_trace_since(mark: str) -> list[dict]:
    """Trace events after the (last) trace marker that contains ``mark``."""
    events = read_trace()
    for i in range(len(events) - 1, -1, -1):
        e = events[i]
        if e["event"] == "tracing_mark_write" and mark in e["text"]:
            return events[i + 1 :]
    return []


def fold_requests(events: list[dict]) -> list[dict]:
    """The one trace folder: one record per handshake request, in submit order.

    A record starts at `handshake_submit` (or `_submit_err`), or at the first
    event of a request address not seen before: the kernel frees a request at
    completion and may reuse its address for the next one, so an address is
    not an identity.  Fields: req, events, role (server if nfsd submitted it),
    submit_comm, t_submit, t_accept, t_done, done_fd, t_complete, status,
    cancel_events, t_cancel, errors, latency (submit -> complete).  Requests
    whose submit is not in `events`, and failed submissions, are left out."""
    reqs: dict[str, dict] = {}  # request address -> its latest record
    records: list[dict] = []
    for e in events:
        req = e["fields"].get("req")
        ev = e["event"]
        if not req or not ev.startswith("handshake_") or not req.strip("0"):
            continue  # accept errors carry req=0
        if ev in ("handshake_submit", "handshake_submit_err") or req not in reqs:
            reqs[req] = {"req": req, "events": []}
            records.append(reqs[req])
        r = reqs[req]
        r["events"].append(ev)
        if ev == "handshake_submit":
            r["submit_comm"] = e["comm"]
            r["role"] = "server" if e["comm"].startswith("nfsd") else "client"
            r["t_submit"] = e["ts"]
        elif ev == "handshake_cmd_accept":
            r["t_accept"] = e["ts"]
        elif ev == "handshake_cmd_done":
            r["t_done"] = e["ts"]
            r["done_fd"] = e["fields"].get("fd")
        elif ev == "handshake_complete":
            r["status"] = int(e["fields"].get("status", "0"))
            r["t_complete"] = e["ts"]
        elif ev in ("handshake_cancel", "handshake_cancel_busy", "handshake_cancel_none"):
            r.setdefault("cancel_events", []).append(ev)
            r.setdefault("t_cancel", e["ts"])
        elif ev.endswith("_err"):
            r.setdefault("errors", []).append(f"{ev} {e['text']}")
    for r in records:
        if "t_submit" in r and "t_complete" in r:
            r["latency"] = round(r["t_complete"] - r["t_submit"], 4)
    return [r for r in records if "t_submit" in r]


def handshakes(events: list[dict] | None = None, since: str | None = None) -> list[dict]:
    """`fold_requests` of the trace; ``since`` keeps the events after the
    trace marker containing that text."""
    if events is None:
        events = read_trace_since(since) if since is not None else read_trace()
    return fold_requests(events)


def tls_stat() -> dict[str, int]:
    try:
        text = Path("/proc/net/tls_stat").read_text()
    except OSError:
        return {}
    return {k: int(v) for k, v in (line.split() for line in text.splitlines() if line.strip())}


# ----------------------------------------------------------------------- NFS


def nfs_server(export_opts: str = "rw,insecure,no_root_squash") -> None:
    """nfsd on loopback exporting tmpfs /srv/nfs (tls:mtls) and /srv/nfs/mtls (mtls)."""
    sh(["modprobe", "-a", "tls", "nfsd", "nfsv4"])
    if not os.path.ismount("/var/lib/nfs/rpc_pipefs"):
        sh(["mount", "-t", "rpc_pipefs", "rpc_pipefs", "/var/lib/nfs/rpc_pipefs"])
    if not os.path.ismount("/proc/fs/nfsd"):
        sh(["mount", "-t", "nfsd", "nfsd", "/proc/fs/nfsd"])
    Path("/proc/fs/nfsd/nfsv4gracetime").write_text("10\n")
    Path("/proc/fs/nfsd/nfsv4leasetime").write_text("10\n")
    Path("/srv/nfs").mkdir(parents=True, exist_ok=True)
    sh(["mount", "-t", "tmpfs", "-o", "size=256m", "export", "/srv/nfs"])
    Path("/srv/nfs/mtls").mkdir()
    sh(["mount", "-t", "tmpfs", "-o", "size=64m", "export-mtls", "/srv/nfs/mtls"])
    Path("/etc/exports").write_text(
        f"/srv/nfs *({export_opts},fsid=0,crossmnt,xprtsec=tls:mtls)\n"
        f"/srv/nfs/mtls *({export_opts},fsid=1,xprtsec=mtls)\n"
    )
    sh(["rpcbind", "-w"])
    sh(["exportfs", "-ra"])
    sh(["rpc.mountd"])
    sh(["rpc.nfsd", "-N", "3", "16"])
    log("nfsd up: " + sh(["exportfs", "-v"]).stdout.replace("\n", " | "))


def mount_nfs(server: str, path: str, mnt: str, xprtsec: str, timeout: float = 120,
              extra: str = "") -> dict:  # fmt: skip
    """Mount NFSv4.2 with ``xprtsec``; return rc, output, duration, /proc/mounts line."""
    Path(mnt).mkdir(parents=True, exist_ok=True)
    opts = f"vers=4.2,xprtsec={xprtsec}" + (f",{extra}" if extra else "")
    t0 = time.monotonic()
    try:
        p = sh(["mount", "-t", "nfs4", "-o", opts, f"{server}:{path}", mnt], check=False,
               timeout=timeout)  # fmt: skip
        rc, out = p.returncode, (p.stdout + p.stderr).strip()
    except subprocess.TimeoutExpired:
        rc, out = -1, f"mount timed out after {timeout}s"
    line = next((ln for ln in Path("/proc/mounts").read_text().splitlines()
                 if f" {mnt} " in ln), "")  # fmt: skip
    res = {"rc": rc, "output": out, "seconds": round(time.monotonic() - t0, 2), "opts": opts,
           "source": f"{server}:{path}", "proc_mounts": line}  # fmt: skip
    log(f"mount {server}:{path} {mnt} -o {opts}: rc={rc} {out} ({res['seconds']}s)")
    return res


def umount(mnt: str) -> int:
    return sh(["umount", mnt], check=False, timeout=60).returncode


# ----------------------------------------------------------------------- results


def write_result(name: str, data: dict) -> Path:
    d = RESULTS / "scenarios"
    d.mkdir(parents=True, exist_ok=True)
    p = d / f"{name}.json"
    p.write_text(json.dumps(data, indent=1, sort_keys=True, default=str) + "\n")
    return p


def main(argv: list[str]) -> int:
    if not argv:
        print(__doc__)
        return 2
    cmd, args = argv[0], argv[1:]
    if cmd == "pki":
        print(make_pki(Path(args[0]) if args else PKI))
    elif cmd == "config":
        print(write_config())
    elif cmd == "start-daemon":
        print(start_daemon(args[0] if args else None))
    elif cmd == "stop-daemon":
        stop_daemon()
    elif cmd == "kill-daemon":
        print(kill_daemon())
    elif cmd == "trace-on":
        trace_on()
    elif cmd == "trace-mark":
        trace_mark(" ".join(args))
    elif cmd == "nfs-server":
        nfs_server()
    elif cmd == "tls-stat":
        print(json.dumps(tls_stat(), indent=1))
    elif cmd == "handshakes":
        print(json.dumps(handshakes(since=args[0] if args else None), indent=1))
    else:
        print(f"unknown command {cmd}\n{__doc__}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))


def run_scenarios(
    scenarios: dict, names: list[str], kind: str, prefix: str = "", label: str = "scenario"
) -> int:
    """Run `names` (default: all) of `scenarios` in order, one JSON result each
    (`<prefix><name>.json`); restart the daemon after any scenario that left it
    dead, so later scenarios still meet a live daemon.  Returns the failures."""
    import traceback

    failed = 0
    for name in names or list(scenarios):
        log(f"=== {label} {name} ({kind})")
        t1 = time.monotonic()
        try:
            res = scenarios[name]()
        except Exception as e:
            res = {"ok": False, "error": f"{type(e).__name__}: {e}",
                   "traceback": traceback.format_exc()}  # fmt: skip
        res.update(name=name, daemon=kind, seconds=round(time.monotonic() - t1, 2))
        res["daemon_alive"] = daemon_pid() is not None
        if not res["daemon_alive"]:
            try:
                res["daemon_restarted_pid"] = start_daemon(kind)
            except Exception as e:
                res["daemon_restart_error"] = str(e)
        write_result(f"{prefix}{name}", res)
        log(f"=== {label} {name}: {'ok' if res['ok'] else 'FAILED'} in {res['seconds']}s")
        failed += not res["ok"]
    return failed
