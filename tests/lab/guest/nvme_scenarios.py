#!/usr/bin/python3
"""NVMe/TCP over TLS (PSK) scenarios, run in ONE guest boot against one daemon.

Host and target live in the same kernel and talk over 127.0.0.1:4420, so each
connect makes one client (host, CLIENTHELLO PSK) and one server (nvmet,
SERVERHELLO PSK) handshake per NVMe queue: the admin queue plus
``NR_IO_QUEUES`` I/O queues.  Both sides find the PSK in the ``.nvme`` keyring
(the host by hostnqn/subnqn, the daemon's server side by the identity the
client sends), so one key inserted with ``nvme gen-tls-key --insert`` serves
both.

Each scenario writes /lab/results/scenarios/nvme_<name>.json; tests/lab/
test_nvme.py asserts on them.  Usage: ``nvme_scenarios.py [NAME...]``.

``nvme_scenarios.py --badkey DESCRIPTION`` is the helper of the negative
scenarios: run under ``keyctl session -`` (a private session keyring the
daemon cannot see), it adds a "psk" key with DESCRIPTION and a random secret
to a private keyring, makes it readable by uid 0 (the daemon must read it by
serial, as it reads any host PSK), and connects with ``tls_key=<serial>``
written straight to /dev/nvme-fabrics.  It prints one JSON line.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import subprocess
import sys
import time
import traceback
from pathlib import Path

import labguest as lg

HOSTID = "0c4a8f9e-6b1d-4c2e-9a51-3f2d7e8b1a10"
HOSTNQN = f"nqn.2014-08.org.nvmexpress:uuid:{HOSTID}"
SUBNQN = "nqn.2024-11.io.tlshd-lab:nvme-tls"
TRADDR = "127.0.0.1"
TRSVCID = "4420"
NR_IO_QUEUES = 1
QUEUES = 1 + NR_IO_QUEUES  # admin + I/O: handshakes per side and connect
BACKING = Path("/srv/nvme/ns1.img")
IO_BYTES = 1024 * 1024
KEY_PERM_ALL = "0x3f3f0000"  # possessor all, user all
RAW_OPTS = (
    f"nqn={SUBNQN},transport=tcp,traddr={TRADDR},trsvcid={TRSVCID},hostnqn={HOSTNQN},"
    f"hostid={HOSTID},nr_io_queues={NR_IO_QUEUES},tls"
)
HERE = Path(__file__).resolve().parent


def run(cmd: list[str], timeout: float = 60, **kw: object) -> dict:
    t0 = time.monotonic()
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False,
                           **kw)  # type: ignore[call-overload]  # fmt: skip
        rc, out = p.returncode, (p.stdout + p.stderr).strip()
    except subprocess.TimeoutExpired:
        rc, out = -1, f"timed out after {timeout}s"
    res = {"cmd": " ".join(cmd), "rc": rc, "output": out[-4000:],
           "seconds": round(time.monotonic() - t0, 2)}  # fmt: skip
    lg.log(f"{res['cmd']}: rc={rc} ({res['seconds']}s) {out[-300:]}")
    return res


def dmesg_lines() -> list[str]:
    return subprocess.run(
        ["dmesg"], capture_output=True, text=True, check=False
    ).stdout.splitlines()


def dmesg_since(n: int) -> list[str]:
    return [ln for ln in dmesg_lines()[n:] if re.search(r"nvme|tls|handshake|key", ln, re.I)]


# ----------------------------------------------------------------------- keys


def keyctl(*args: str, stdin: bytes | None = None) -> str:
    p = subprocess.run(["keyctl", *args], input=stdin, capture_output=True, check=False)
    if p.returncode != 0:
        raise RuntimeError(f"keyctl {' '.join(args)}: {p.stderr.decode(errors='replace')}")
    return p.stdout.decode().strip()


def describe(serial: int) -> dict:
    """type, uid, gid, perm and description of a key (keyctl rdescribe)."""
    typ, uid, _gid, perm, desc = keyctl("rdescribe", str(serial)).split(";", 4)
    return {"serial": serial, "type": typ, "uid": uid, "perm": perm, "description": desc}


def nvme_keys() -> list[dict]:
    """The keys in .nvme, from /proc/keys (serial hex, description)."""
    out = []
    for line in Path("/proc/keys").read_text().splitlines():
        f = line.split(None, 8)
        if len(f) == 9 and f[7] == "psk":
            out.append({"serial": int(f[0], 16), "perm": f[6], "description": f[8]})
    return out


def insert_psk() -> dict:
    """A retained PSK, identity version 1, HMAC SHA-256, inserted into .nvme."""
    res = run(["nvme", "gen-tls-key", f"--hostnqn={HOSTNQN}", f"--subsysnqn={SUBNQN}",
               "--hmac=1", "--identity=1", "--insert"])  # fmt: skip
    if res["rc"] != 0:
        raise RuntimeError(f"nvme gen-tls-key failed: {res['output']}")
    prefix = f"NVMe1R01 {HOSTNQN} {SUBNQN}"
    keys = [k for k in nvme_keys() if k["description"].startswith(prefix)]
    if len(keys) != 1:
        raise RuntimeError(f"want one .nvme key {prefix!r}, /proc/keys has {nvme_keys()}")
    key = describe(keys[0]["serial"])
    key["interchange"] = res["output"].splitlines()[-1] if res["output"] else ""
    return key


# ----------------------------------------------------------------------- host side


def ctrl_of_subsys() -> list[str]:
    """Host controllers (nvmeN) connected to SUBNQN."""
    out = []
    for c in sorted(Path("/sys/class/nvme").glob("nvme*")):
        try:
            if (c / "subsysnqn").read_text().strip() == SUBNQN:
                out.append(c.name)
        except OSError:
            continue
    return out


def wait_namespace(timeout: float = 20) -> str | None:
    """/dev/nvmeXnY of SUBNQN's namespace 1 once the host has scanned it."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        for s in Path("/sys/class/nvme-subsystem").glob("nvme-subsys*"):
            try:
                if (s / "subsysnqn").read_text().strip() != SUBNQN:
                    continue
            except OSError:
                continue
            for d in sorted(s.iterdir()):
                if re.fullmatch(r"nvme\d+n1", d.name) and Path(f"/dev/{d.name}").exists():
                    return f"/dev/{d.name}"
        time.sleep(0.2)
    return None


def sysfs(ctrl: str, attr: str) -> str | None:
    try:
        return Path(f"/sys/class/nvme/{ctrl}/{attr}").read_text().strip()
    except OSError:
        return None


def io_check(dev: str) -> dict:
    """dd a random pattern to the namespace (O_DIRECT), read it back, compare.

    Also compare with the target's backing file: the bytes must have gone
    through the TLS-protected NVMe/TCP queues to nvmet.
    """
    data = os.urandom(IO_BYTES)
    digest = hashlib.sha256(data).hexdigest()
    Path("/tmp/nvme-pattern").write_bytes(data)
    out: dict = {"bytes": IO_BYTES, "sha256": digest, "device": dev}
    t0 = time.monotonic()
    w = run(["dd", "if=/tmp/nvme-pattern", f"of={dev}", "bs=64k", "oflag=direct",
             "conv=fsync"], timeout=120)  # fmt: skip
    out["write_ok"] = w["rc"] == 0
    out["write"] = w
    Path("/proc/sys/vm/drop_caches").write_text("3\n")
    r = subprocess.run(["dd", f"if={dev}", "bs=64k", "iflag=direct",
                        f"count={IO_BYTES // 65536}"], capture_output=True, timeout=120,
                       check=False)  # fmt: skip
    out["read_rc"] = r.returncode
    out["read_back_same"] = r.returncode == 0 and hashlib.sha256(r.stdout).hexdigest() == digest
    with open(BACKING, "rb") as f:
        out["target_file_same"] = hashlib.sha256(f.read(IO_BYTES)).hexdigest() == digest
    out["seconds"] = round(time.monotonic() - t0, 2)
    return out


# ----------------------------------------------------------------------- handshakes


def handshakes(mark: str) -> list[dict]:
    """Handshake records since ``mark``; the role comes from the submitter.

    The host submits from the process that writes /dev/nvme-fabrics (nvme,
    python3), nvmet-tcp from its accept work item (a kworker).
    """
    hs = lg.handshakes(since=mark)
    for h in hs:
        comm = h.get("submit_comm", "")
        known = comm and comm != "<...>"
        h["role"] = "server" if comm.startswith("kworker") else "client" if known else "?"
    return hs


def hs_summary(hs: list[dict]) -> dict:
    done = [h for h in hs if "status" in h]
    return {
        "requests": len(hs),
        "completed": len(done),
        "client_ok": sum(1 for h in done if h["role"] == "client" and h["status"] == 0),
        "server_ok": sum(1 for h in done if h["role"] == "server" and h["status"] == 0),
        "client_statuses": [h["status"] for h in done if h["role"] == "client"],
        "server_statuses": [h["status"] for h in done if h["role"] == "server"],
        "failed_status": sorted({h["status"] for h in done if h["status"] != 0}),
        "cancelled": sum(1 for h in hs if "status" not in h),
        "latencies": [h.get("latency") for h in hs],
    }


def alerts_since(mark: str) -> list[str]:
    return [f"{e['event']}: {e['text']}" for e in lg.read_trace_since(mark)
            if e["event"].startswith("tls_alert")]  # fmt: skip


# ----------------------------------------------------------------------- scenarios


def connect_and_io(name: str, key: dict, io: bool = True) -> dict:
    """nvme connect --tls, I/O through the namespace, nvme disconnect."""
    mark = f"LAB nvme {name} begin"
    lg.trace_mark(mark)
    nd = len(dmesg_lines())
    res: dict = {"tls_stat_before": lg.tls_stat(), "key": key}
    res["connect"] = run(
        ["nvme", "connect", "-t", "tcp", "-a", TRADDR, "-s", TRSVCID, "-n", SUBNQN,
         f"--hostnqn={HOSTNQN}", f"--hostid={HOSTID}", f"--nr-io-queues={NR_IO_QUEUES}",
         "--tls", "-v"], timeout=90,
    )  # fmt: skip
    ctrls = ctrl_of_subsys()
    res["ctrls"] = ctrls
    if res["connect"]["rc"] == 0 and ctrls:
        c = ctrls[0]
        attrs = ("state", "transport", "address", "hostnqn", "tls_key", "tls_keyring")
        res["ctrl"] = {a: sysfs(c, a) for a in attrs}
        tls_key = res["ctrl"]["tls_key"]
        res["tls_key_serial"] = int(tls_key, 16) if tls_key else None
        dev = wait_namespace()
        res["device"] = dev
        if dev and io:
            res["io"] = io_check(dev)
        res["tls_stat_connected"] = lg.tls_stat()
        res["disconnect"] = run(["nvme", "disconnect", "-n", SUBNQN], timeout=60)
        time.sleep(0.5)
        res["ctrls_after_disconnect"] = ctrl_of_subsys()
    res["tls_stat_after"] = lg.tls_stat()
    res["handshakes"] = handshakes(mark)
    res["hs"] = hs_summary(res["handshakes"])
    res["alerts"] = alerts_since(mark)
    res["dmesg"] = dmesg_since(nd)
    io_res = res.get("io", {})
    res["ok"] = (
        res["connect"]["rc"] == 0
        and res.get("tls_key_serial") == key["serial"]
        and (not io or (io_res.get("read_back_same") is True
                        and io_res.get("target_file_same") is True))
        and res.get("disconnect", {}).get("rc") == 0
        and res["hs"]["client_ok"] == QUEUES
        and res["hs"]["server_ok"] == QUEUES
        and not res["hs"]["failed_status"]
    )  # fmt: skip
    return res


def bad_key_scenario(name: str, description: str) -> dict:
    """Connect with a host PSK the target does not share; the connect must fail."""
    mark = f"LAB nvme {name} begin"
    lg.trace_mark(mark)
    nd = len(dmesg_lines())
    res: dict = {"tls_stat_before": lg.tls_stat(), "description": description}
    p = run(["keyctl", "session", "-", sys.executable, str(Path(__file__).resolve()),
             "--badkey", description], timeout=90)  # fmt: skip
    res["helper"] = p
    lines = [ln for ln in p["output"].splitlines() if ln.startswith("{")]
    try:
        res["attempt"] = json.loads(lines[-1])
    except (ValueError, IndexError):
        res["attempt"] = {"error": "helper printed no JSON"}
    res["ctrls_after"] = ctrl_of_subsys()
    for c in res["ctrls_after"]:  # connected after all: remove it for the next scenario
        Path(f"/sys/class/nvme/{c}/delete_controller").write_text("1\n")
    time.sleep(0.5)
    res["tls_stat_after"] = lg.tls_stat()
    res["handshakes"] = handshakes(mark)
    res["hs"] = hs_summary(res["handshakes"])
    res["alerts"] = alerts_since(mark)
    res["dmesg"] = dmesg_since(nd)
    a = res["attempt"]
    res["refused"] = a.get("connected") is False
    hs = res["hs"]
    res["ok"] = (
        res["refused"]
        and bool(hs["client_statuses"])
        and bool(hs["server_statuses"])
        and 0 not in hs["client_statuses"] + hs["server_statuses"]
    )
    return res


def badkey_helper(description: str) -> int:
    """Runs in its own session keyring: add the wrong PSK and connect with it."""
    out: dict = {"description": description, "t_start": lg.uptime()}
    try:
        ring = keyctl("newring", "tlshd-lab-wrong", "@s")
        keyctl("setperm", ring, KEY_PERM_ALL)
        serial = keyctl("padd", "psk", description, ring, stdin=os.urandom(32))
        keyctl("setperm", serial, KEY_PERM_ALL)
        out.update(ring=int(ring), serial=int(serial), key=describe(int(serial)))
        opts = f"{RAW_OPTS},tls_key={serial}"
        out["opts"] = opts
        out["t_connect"] = lg.uptime()
        t0 = time.monotonic()
        fd = os.open("/dev/nvme-fabrics", os.O_RDWR)
        try:
            os.write(fd, opts.encode())
            out["connected"] = True
            out["reply"] = os.read(fd, 4096).decode(errors="replace").strip()
        except OSError as e:
            out["connected"] = False
            out["errno"] = e.errno
            out["errno_name"] = errno.errorcode.get(e.errno or 0, str(e.errno))
            out["error"] = e.strerror
        finally:
            os.close(fd)
        out["seconds"] = round(time.monotonic() - t0, 2)
    except Exception as e:
        out["error"] = f"{type(e).__name__}: {e}"
    print(json.dumps(out), flush=True)
    return 0


STATE: dict = {}


def sc_psk_connect() -> dict:
    return connect_and_io("psk_connect", STATE["key"])


def sc_wrong_secret() -> dict:
    """Same identity as the target's key (incl. its digest), different secret."""
    return bad_key_scenario("wrong_secret", STATE["key"]["description"])


def sc_unknown_identity() -> dict:
    """An identity the target has no key for (another PSK digest)."""
    bogus = "bm90LXRoZS1yaWdodC1kaWdlc3Qtbm90LXRoZS1yaWdodC1kaWdlc3QtPQ=="
    return bad_key_scenario("unknown_identity", f"NVMe1R01 {HOSTNQN} {SUBNQN} {bogus}")


def sc_reconnect() -> dict:
    """After the failures: the daemon still serves a good connect."""
    return connect_and_io("reconnect", STATE["key"])


SCENARIOS = {
    "psk_connect": sc_psk_connect,
    "wrong_secret": sc_wrong_secret,
    "unknown_identity": sc_unknown_identity,
    "reconnect": sc_reconnect,
}


def setup(kind: str) -> dict:
    t0 = time.monotonic()
    res: dict = {"daemon": kind, "ok": False}
    try:
        lg.sh(["modprobe", "-a", "tls", "nvme-keyring", "nvme-fabrics", "nvme-tcp", "nvmet",
               "nvmet-tcp"])  # fmt: skip
        res["target"] = run(["sh", str(HERE / "nvme_target.sh"), SUBNQN, HOSTNQN, TRADDR,
                             TRSVCID])  # fmt: skip
        if res["target"]["rc"] != 0:
            raise RuntimeError(f"nvme_target.sh failed: {res['target']['output']}")
        STATE["key"] = res["key"] = insert_psk()
        res["proc_keys"] = Path("/proc/keys").read_text().splitlines()
        lg.make_pki()
        lg.write_config()
        lg.trace_on()
        res["daemon_pid"] = lg.start_daemon(kind)
        res["ok"] = True
    except Exception as e:
        res["error"] = f"{type(e).__name__}: {e}"
        res["traceback"] = traceback.format_exc()
    res["seconds"] = round(time.monotonic() - t0, 2)
    return res


def main(names: list[str]) -> int:
    if names[:1] == ["--badkey"]:
        return badkey_helper(names[1])
    kind = lg.daemon_kind()
    t0 = time.monotonic()
    st = setup(kind)
    lg.write_result("nvme_setup", st)
    if not st["ok"]:
        lg.log(f"setup failed: {st['error']}")
        return 1
    failed = lg.run_scenarios(SCENARIOS, names, kind, prefix="nvme_", label="nvme scenario")
    lg.stop_daemon()
    lg.log(f"all nvme scenarios done in {time.monotonic() - t0:.1f}s, {failed} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
