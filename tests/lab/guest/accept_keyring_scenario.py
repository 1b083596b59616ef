#!/usr/bin/python3
"""NVMe/TCP connect whose host PSK lives only in a keyring passed with --keyring.

Issue 12, item 1: since Linux 6.17 the kernel names the consumer's keyring in
ACCEPT (HANDSHAKE_A_ACCEPT_KEYRING).  Here the host's retained PSK is inserted
only into a keyring of its own, ``tlshd-tenant`` (``nvme gen-tls-key
--keyring``), and ``nvme connect --tls --keyring tlshd-tenant`` makes the host
hand that keyring and that key's serial to the daemon (written to
/dev/nvme-fabrics as ``keyring=<serial>``, see fabrics_connect).  nvmet's port keyring
is always ``.nvme``, so the target's copy of the same PSK (``nvme
check-tls-key --insert``) is a separate key there.  Same target as
nvme_scenarios.py.

Writes /lab/results/scenarios/accept_keyring.json.
"""

from __future__ import annotations

import os
import sys
import time
import traceback
from pathlib import Path

import labguest as lg
import nvme_scenarios as nv

TENANT = "tlshd-tenant"


def insert_keys() -> dict:
    ring = int(nv.keyctl("newring", TENANT, "@u"))
    # nvme-cli (another process, not possessing it) must add to it, and the
    # kernel must link it into the daemon's process keyring at ACCEPT
    nv.keyctl("setperm", str(ring), nv.KEY_PERM_ALL)
    gen = nv.run(["nvme", "gen-tls-key", f"--hostnqn={nv.HOSTNQN}", f"--subsysnqn={nv.SUBNQN}",
                  "--hmac=1", "--identity=1", f"--keyring={TENANT}", "--insert"])  # fmt: skip
    if gen["rc"] != 0:
        raise RuntimeError(f"nvme gen-tls-key --keyring failed: {gen['output']}")
    interchange = next(
        ln.strip() for ln in gen["output"].splitlines() if ln.startswith("NVMeTLSkey-")
    )
    in_tenant = [int(s) for s in nv.keyctl("rlist", str(ring)).split()]
    if len(in_tenant) != 1:
        raise RuntimeError(f"want one key in {TENANT}, it holds {in_tenant}")
    check = nv.run(["nvme", "check-tls-key", f"--hostnqn={nv.HOSTNQN}",
                    f"--subsysnqn={nv.SUBNQN}", "--identity=1", f"--keydata={interchange}",
                    "--insert"])  # fmt: skip
    if check["rc"] != 0:
        raise RuntimeError(f"nvme check-tls-key --insert failed: {check['output']}")
    host_key = nv.describe(in_tenant[0])
    target_keys = [k for k in nv.nvme_keys() if k["serial"] != host_key["serial"]
                   and k["description"].startswith(host_key["description"])]  # fmt: skip
    return {"ring": ring, "host_key": host_key, "target_keys": target_keys,
            "interchange": interchange, "gen": gen, "check": check}  # fmt: skip


def fabrics_connect(opts: str) -> dict:
    """What ``nvme connect --tls --keyring`` should do, written to the kernel
    directly: nvme-cli 2.16 did not pass ``keyring=`` on (measured: the host
    then used the .nvme key).  The kernel looks the PSK up in that keyring."""
    out: dict = {"opts": opts}
    fd = os.open("/dev/nvme-fabrics", os.O_RDWR)
    try:
        os.write(fd, opts.encode())
        out["reply"] = os.read(fd, 4096).decode(errors="replace").strip()
        out["rc"] = 0
    except OSError as e:
        out["rc"] = e.errno
        out["error"] = e.strerror
    finally:
        os.close(fd)
    lg.log(f"connect {opts}: {out}")
    return out


def connect(keys: dict) -> dict:
    mark = "LAB accept_keyring begin"
    lg.trace_mark(mark)
    res: dict = {"keys": keys}
    res["connect"] = fabrics_connect(f"{nv.RAW_OPTS},keyring={keys['ring']}")
    ctrls = nv.ctrl_of_subsys()
    res["ctrls"] = ctrls
    if res["connect"]["rc"] == 0 and ctrls:
        c = ctrls[0]
        res["ctrl"] = {a: nv.sysfs(c, a) for a in ("state", "tls_key", "tls_keyring")}
        tls_key = res["ctrl"]["tls_key"]
        res["tls_key_serial"] = int(tls_key, 16) if tls_key else None
        dev = nv.wait_namespace()
        res["device"] = dev
        if dev:
            res["io"] = nv.io_check(dev)
        res["disconnect"] = nv.run(["nvme", "disconnect", "-n", nv.SUBNQN], timeout=60)
    res["handshakes"] = nv.handshakes(mark)
    res["hs"] = nv.hs_summary(res["handshakes"])
    return res


def main() -> int:
    out: dict = {"ok": False, "kernel": Path("/proc/sys/kernel/osrelease").read_text().strip()}
    try:
        lg.sh(["modprobe", "-a", "tls", "nvme-keyring", "nvme-fabrics", "nvme-tcp", "nvmet",
               "nvmet-tcp"])  # fmt: skip
        target = nv.run(["sh", str(nv.HERE / "nvme_target.sh"), nv.SUBNQN, nv.HOSTNQN,
                         nv.TRADDR, nv.TRSVCID])  # fmt: skip
        if target["rc"] != 0:
            raise RuntimeError(f"nvme_target.sh failed: {target['output']}")
        keys = insert_keys()
        lg.make_pki()
        lg.write_config()
        lg.trace_on()
        out["daemon_pid"] = lg.start_daemon("ours")
        out.update(connect(keys))
        time.sleep(0.5)
        lg.stop_daemon()
        log = (lg.RESULTS / "daemon-ours.log").read_text(errors="replace")
        out["accept_keyring_log"] = [ln for ln in log.splitlines() if "ACCEPT keyring" in ln]
        out["ok"] = True  # the test judges
    except Exception as e:
        out["error"] = f"{type(e).__name__}: {e}"
        out["traceback"] = traceback.format_exc()
    lg.write_result("accept_keyring", out)
    return 0 if out["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
