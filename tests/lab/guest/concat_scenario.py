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
reference), each: connect, the controller's sysfs, 1 MiB of I/O, disconnect.
Writes /lab/results/scenarios/concat.json.
"""

from __future__ import annotations

import sys
import time
import traceback
from pathlib import Path

import labguest as lg
import nvme_scenarios as nv

HASH = "hmac(sha256)"
DHGROUP = "ffdhe2048"
HOST_CFS = Path("/sys/kernel/config/nvmet/hosts") / nv.HOSTNQN
CTRL_ATTRS = ("state", "transport", "tls_key", "tls_configured_key", "tls_keyring",
              "dhchap_secret", "dhchap_ctrl_secret")  # fmt: skip


def setup_target(secret: str) -> dict:
    res = nv.run(["sh", str(nv.HERE / "nvme_target.sh"), nv.SUBNQN, nv.HOSTNQN, nv.TRADDR,
                  nv.TRSVCID, "not required"])  # fmt: skip
    if res["rc"] != 0:
        raise RuntimeError(f"nvme_target.sh failed: {res['output']}")
    (HOST_CFS / "dhchap_key").write_text(secret + "\n")
    (HOST_CFS / "dhchap_hash").write_text(HASH + "\n")
    (HOST_CFS / "dhchap_dhgroup").write_text(DHGROUP + "\n")
    port = Path("/sys/kernel/config/nvmet/ports/1")
    res["port"] = {a: (port / a).read_text().strip() for a in ("addr_tsas", "addr_treq")}
    res["host"] = {a: (HOST_CFS / a).read_text().strip()
                   for a in ("dhchap_hash", "dhchap_dhgroup")}  # fmt: skip
    return res


def dhchap_secret() -> str:
    gen = nv.run(["nvme", "gen-dhchap-key", "-m", "1", "-n", nv.HOSTNQN])
    lines = [ln.strip() for ln in gen["output"].splitlines() if ln.startswith("DHHC-1:")]
    if gen["rc"] != 0 or not lines:
        raise RuntimeError(f"nvme gen-dhchap-key failed: {gen['output']}")
    return lines[-1]


def concat_connect(kind: str, secret: str) -> dict:
    mark = f"LAB concat {kind} begin"
    lg.trace_mark(mark)
    nd = len(nv.dmesg_lines())
    res: dict = {"daemon": kind, "psk_keys_before": nv.nvme_keys()}
    keys_before = {k["serial"] for k in res["psk_keys_before"]}
    res["daemon_pid"] = lg.start_daemon(kind)
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
        res["ctrl"] = {a: nv.sysfs(c, a) for a in CTRL_ATTRS}
        tls_key = res["ctrl"]["tls_key"]
        res["tls_key_serial"] = int(tls_key, 16) if tls_key else None
        if res["tls_key_serial"]:
            try:
                res["tls_key"] = nv.describe(res["tls_key_serial"])
            except RuntimeError as e:
                res["tls_key"] = {"error": str(e)}
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
    lg.stop_daemon()
    log = (lg.RESULTS / f"daemon-{kind}.log").read_text(errors="replace").splitlines()
    res["daemon_log_tail"] = log[-60:]
    return res


def main() -> int:
    out: dict = {"ok": False, "kernel": Path("/proc/sys/kernel/osrelease").read_text().strip()}
    try:
        lg.sh(["modprobe", "-a", "tls", "nvme-keyring", "nvme-fabrics", "nvme-tcp",
               "nvmet", "nvmet-tcp"])  # fmt: skip
        out["fabrics_options"] = Path("/dev/nvme-fabrics").read_text().strip()
        out["nvme_cli"] = nv.run(["nvme", "version"])["output"]
        secret = dhchap_secret()
        out["target"] = setup_target(secret)
        lg.make_pki()
        lg.write_config(loglevel=2)
        lg.trace_on()
        out["runs"] = {kind: concat_connect(kind, secret) for kind in ("ours", "upstream")}
        out["ok"] = True  # the test judges
    except Exception as e:
        out["error"] = f"{type(e).__name__}: {e}"
        out["traceback"] = traceback.format_exc()
    lg.write_result("concat", out)
    return 0 if out["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
