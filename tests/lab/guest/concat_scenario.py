#!/usr/bin/python3
"""NVMe/TCP secure channel concatenation: ``nvme connect --concat``.

Issue 12, item 2.  No PSK is provisioned.  The host authenticates the admin
queue with DH-HMAC-CHAP over plain TCP, asking for a new TLS PSK (secure
channel concatenation, Linux 6.15); host and nvmet each derive the PSK from
the DH-HMAC-CHAP session and put it into ``.nvme`` as a "psk" key whose
identity is "NVMe1G<hmac> <hostnqn> <subnqn> <digest>" (G: generated; one
key, host and nvmet insert the same description); the host
then reconnects the admin queue, and connects its I/O queues, over TLS with
that key, which the handshake daemon receives by serial (host) or finds by
the identity the host sends (nvmet).

The target is nvme_target.sh's with addr_treq "not required" (the first
admin connection is not TLS) and the host's DH-HMAC-CHAP key, hash and DH
group in nvmet's configfs (hosts/<hostnqn>/dhchap_*); concatenation needs a
DH group (the PSK comes from the DH exchange).

One boot, both daemons one after the other (ours, then upstream as the
reference), each: a SHA-256 connect (ffdhe2048), the controller's sysfs, a
controller reset (authentication again: a new PSK), 1 MiB of I/O,
disconnect; then the same with SHA-384 (ffdhe3072, a 48-byte PSK), no reset.
Writes /lab/results/scenarios/concat.json.
"""

from __future__ import annotations

import sys
import time
import traceback
from pathlib import Path

import labguest as lg
import nvme_scenarios as nv

# DH-HMAC-CHAP settings per run: nvme gen-dhchap-key -m (1: SHA-256, 2: SHA-384),
# nvmet's dhchap_hash and a DH group (concatenation needs one)
AUTH = {
    "sha256": {"hmac": "1", "hash": "hmac(sha256)", "dhgroup": "ffdhe2048"},
    "sha384": {"hmac": "2", "hash": "hmac(sha384)", "dhgroup": "ffdhe3072"},
}
HOST_CFS = Path("/sys/kernel/config/nvmet/hosts") / nv.HOSTNQN
CTRL_ATTRS = ("state", "transport", "tls_key", "tls_configured_key", "tls_keyring",
              "dhchap_secret", "dhchap_ctrl_secret")  # fmt: skip


def setup_target() -> dict:
    res = nv.run(["sh", str(nv.HERE / "nvme_target.sh"), nv.SUBNQN, nv.HOSTNQN, nv.TRADDR,
                  nv.TRSVCID, "not required"])  # fmt: skip
    if res["rc"] != 0:
        raise RuntimeError(f"nvme_target.sh failed: {res['output']}")
    port = Path("/sys/kernel/config/nvmet/ports/1")
    res["port"] = {a: (port / a).read_text().strip() for a in ("addr_tsas", "addr_treq")}
    return res


def set_host_auth(name: str) -> str:
    """A new DH-HMAC-CHAP host secret, given to nvmet's host entry with its
    hash and DH group; returns the secret for nvme connect --dhchap-secret."""
    auth = AUTH[name]
    gen = nv.run(["nvme", "gen-dhchap-key", "-m", auth["hmac"], "-n", nv.HOSTNQN])
    lines = [ln.strip() for ln in gen["output"].splitlines() if ln.startswith("DHHC-1:")]
    if gen["rc"] != 0 or not lines:
        raise RuntimeError(f"nvme gen-dhchap-key failed: {gen['output']}")
    (HOST_CFS / "dhchap_key").write_text(lines[-1] + "\n")
    (HOST_CFS / "dhchap_hash").write_text(auth["hash"] + "\n")
    (HOST_CFS / "dhchap_dhgroup").write_text(auth["dhgroup"] + "\n")
    return lines[-1]


def tls_key_of(ctrl: str) -> tuple[dict, int | None, dict | None]:
    """The controller's TLS attributes, its tls_key serial and that key."""
    attrs = {a: nv.sysfs(ctrl, a) for a in CTRL_ATTRS}
    serial = int(attrs["tls_key"], 16) if attrs["tls_key"] else None
    key = None
    if serial:
        try:
            key = nv.describe(serial)
        except RuntimeError as e:
            key = {"error": str(e)}
        # its /proc/keys line now ("<description>: <payload bytes>"): a reset
        # revokes the key it replaces, leaving ": 0" there
        key["proc"] = next((k["description"] for k in nv.nvme_keys() if k["serial"] == serial),
                           None)  # fmt: skip
    return attrs, serial, key


def wait_live(ctrl: str, timeout: float = 30) -> str | None:
    t0 = time.monotonic()
    state = nv.sysfs(ctrl, "state")
    while state != "live" and time.monotonic() - t0 < timeout:
        time.sleep(0.2)
        state = nv.sysfs(ctrl, "state")
    return state


def controller_reset(ctrl: str) -> dict:
    """nvme reset: the host authenticates again and derives a new PSK."""
    mark = f"LAB concat reset {ctrl} {time.monotonic()}"
    lg.trace_mark(mark)
    res: dict = {"reset": nv.run(["nvme", "reset", f"/dev/{ctrl}"], timeout=60)}
    res["state"] = wait_live(ctrl)
    res["ctrl"], res["tls_key_serial"], res["tls_key"] = tls_key_of(ctrl)
    res["hs"] = nv.hs_summary(nv.handshakes(mark))
    return res


def concat_connect(kind: str, auth: str, reset: bool) -> dict:
    """nvme connect --concat with the AUTH[auth] settings, [a controller
    reset,] I/O through the namespace, disconnect."""
    mark = f"LAB concat {kind} {auth} begin"
    lg.trace_mark(mark)
    nd = len(nv.dmesg_lines())
    res: dict = {"daemon": kind, "auth": AUTH[auth], "psk_keys_before": nv.nvme_keys()}
    keys_before = {k["serial"] for k in res["psk_keys_before"]}
    secret = set_host_auth(auth)
    res["connect"] = nv.run(
        ["nvme", "connect", "-t", "tcp", "-a", nv.TRADDR, "-s", nv.TRSVCID, "-n", nv.SUBNQN,
         f"--hostnqn={nv.HOSTNQN}", f"--hostid={nv.HOSTID}",
         f"--nr-io-queues={nv.NR_IO_QUEUES}", f"--dhchap-secret={secret}", "--concat", "-v"],
        timeout=90,
    )  # fmt: skip
    ctrls = nv.ctrl_of_subsys()
    res["ctrls"] = ctrls
    if ctrls:
        c = ctrls[0]
        res["ctrl"], res["tls_key_serial"], res["tls_key"] = tls_key_of(c)
        res["hs_connect"] = nv.hs_summary(nv.handshakes(mark))
        if reset and res["connect"]["rc"] == 0:
            res["after_reset"] = controller_reset(c)
        dev = nv.wait_namespace()
        res["device"] = dev
        if dev:
            res["io"] = nv.io_check(dev)
        res["disconnect"] = nv.run(["nvme", "disconnect", "-n", nv.SUBNQN], timeout=60)
        time.sleep(0.5)
        for left in nv.ctrl_of_subsys():  # connected after all: clear it for the next run
            Path(f"/sys/class/nvme/{left}/delete_controller").write_text("1\n")
    res["new_keys"] = [k for k in nv.nvme_keys() if k["serial"] not in keys_before]
    res["handshakes"] = nv.handshakes(mark)
    res["hs"] = nv.hs_summary(res["handshakes"])
    res["alerts"] = nv.alerts_since(mark)
    res["dmesg"] = nv.dmesg_since(nd)
    return res


def daemon_runs(kind: str) -> dict:
    """SHA-256 with a controller reset, then SHA-384, under one daemon."""
    out: dict = {"daemon_pid": lg.start_daemon(kind)}
    try:
        out["sha256"] = concat_connect(kind, "sha256", reset=True)
        out["sha384"] = concat_connect(kind, "sha384", reset=False)
    finally:
        lg.stop_daemon()
    log = (lg.RESULTS / f"daemon-{kind}.log").read_text(errors="replace").splitlines()
    out["daemon_log_tail"] = log[-80:]
    return out


def main() -> int:
    out: dict = {"ok": False, "kernel": Path("/proc/sys/kernel/osrelease").read_text().strip()}
    try:
        lg.sh(["modprobe", "-a", "tls", "nvme-keyring", "nvme-fabrics", "nvme-tcp",
               "nvmet", "nvmet-tcp"])  # fmt: skip
        out["fabrics_options"] = Path("/dev/nvme-fabrics").read_text().strip()
        out["nvme_cli"] = nv.run(["nvme", "version"])["output"]
        out["target"] = setup_target()
        lg.make_pki()
        lg.write_config(loglevel=2)
        lg.trace_on()
        out["runs"] = {kind: daemon_runs(kind) for kind in ("ours", "upstream")}
        out["ok"] = True  # the test judges
    except Exception as e:
        out["error"] = f"{type(e).__name__}: {e}"
        out["traceback"] = traceback.format_exc()
    lg.write_result("concat", out)
    return 0 if out["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
