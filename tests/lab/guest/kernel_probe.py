#!/opt/tlshd/bin/python
"""What the booted kernel (and the root's tools) offer for issue 12's features.

Runs in the lab guest with the project's venv (it reuses tlshd.netlink's codec)
and NO handshake daemon: it is itself the only listener of the handshake family.
Writes /lab/results/scenarios/kernel_probe.json; tests/lab/test_kernel_probe.py
asserts on it.  Probes, each independent of the others:

* ``family``: the handshake family's ops and their flags (GETFAMILY; the DONE op
  carries GENL_ADMIN_PERM where DONE requires CAP_NET_ADMIN) and the request
  policy of every op (GETPOLICY dump: attribute types, value ranges; DONE's
  STATUS range is where the kernel bounds it by MAX_ERRNO).
* ``accept_keyring``: whether an ACCEPT reply carries HANDSHAKE_A_ACCEPT_KEYRING.
  A request policy lists only what userspace may *send*, and ACCEPT's request
  has HANDLER_CLASS alone, so GETPOLICY cannot tell; this probe takes one real
  request instead: an NVMe/TCP host connect with ``--tls`` (the host always
  passes its keyring, .nvme unless ``keyring=`` is given), ACCEPTs it, records
  the attributes and fails it with DONE(EACCES).
* ``tls_sockopt``: TLS_TX_MAX_PAYLOAD_LEN (RFC 8449 record size limit, Linux
  6.19) get/set on a loopback TCP socket with the tls ULP, before and after
  TLS_TX is installed (upstream 1.4.0 sets it after TLS_TX and treats
  ENOPROTOOPT as fatal).
* ``nvme``: the options /dev/nvme-fabrics accepts (``concat``, ``tls``,
  ``keyring``, ``tls_key``, ``dhchap_*``), whether nvme-cli knows
  ``connect --concat``, and nvmet's per-host and per-port configfs attributes.
"""

from __future__ import annotations

import errno
import json
import os
import platform
import re
import socket
import struct
import subprocess
import sys
import time
import traceback
from pathlib import Path

import labguest as lg

from tlshd import netlink as nl
from tlshd.uapi import (
    SOL_TLS,
    TCP_ULP,
    TLS_1_3_VERSION,
    TLS_TX,
    AcceptAttr,
    DoneAttr,
    HandshakeCmd,
    TlsCipher,
)

# include/uapi/linux/genetlink.h
CTRL_ATTR_OPS = 6
CTRL_ATTR_OP_ID = 1
CTRL_ATTR_OP_FLAGS = 2
GENL_FLAGS = {0x01: "admin-perm", 0x02: "do", 0x04: "dump", 0x08: "has-policy",
              0x10: "uns-admin-perm"}  # fmt: skip
# include/uapi/linux/netlink.h: enum netlink_policy_type_attr / netlink_attribute_type
POLICY_FIELDS = {1: "type", 2: "min_s", 3: "max_s", 4: "min_u", 5: "max_u", 6: "min_len",
                 7: "max_len", 8: "nested_policy", 9: "nested_maxtype", 10: "bitfield32_mask",
                 12: "mask"}  # fmt: skip
NL_ATTR_TYPES = ["invalid", "flag", "u8", "u16", "u32", "u64", "s8", "s16", "s32", "s64",
                 "binary", "string", "nul-string", "nested", "nested-array", "bitfield32",
                 "sint", "uint"]  # fmt: skip
# include/uapi/linux/tls.h (Linux 6.19): the maximum plaintext of a TX record
TLS_TX_MAX_PAYLOAD_LEN = 5
HOSTID = "5d0c6a1e-2f43-4b7e-8a90-1c2d3e4f5a6b"
HOSTNQN = f"nqn.2014-08.org.nvmexpress:uuid:{HOSTID}"
SUBNQN = "nqn.2026-11.io.tlshd-lab:probe"
HERE = Path(__file__).resolve().parent


def _name(enum: type, value: int) -> str:
    return enum(value).name if value in enum.__members__.values() else str(value)


def request(tr: nl.RealNetlinkTransport, data: bytes, seq: int) -> list[nl.NetlinkMessage]:
    """Send one request, collect its replies up to NLMSG_DONE or the ACK/error."""
    tr.send(data)
    out: list[nl.NetlinkMessage] = []
    while True:
        for msg in nl.parse_messages(tr.recv()):
            if msg.seq != seq:
                continue
            if msg.type == nl.NLMSG_ERROR:
                ack = nl.decode_error(msg)
                if ack.error:
                    raise OSError(ack.error, f"{os.strerror(ack.error)} ({ack.extack})")
                return out
            if msg.type == nl.NLMSG_DONE:
                return out
            out.append(msg)
            if not msg.flags & nl.NLM_F_MULTI:
                return out


def _policy_spec(spec: bytes) -> dict:
    out: dict = {}
    for kind, value in nl.iter_attrs(spec):
        name = POLICY_FIELDS.get(kind, f"attr{kind}")
        if kind == 1:
            t = struct.unpack("=I", value)[0]
            out[name] = NL_ATTR_TYPES[t] if t < len(NL_ATTR_TYPES) else t
        elif len(value) == 8:
            out[name] = struct.unpack("=q" if kind in (2, 3) else "=Q", value)[0]
        elif len(value) == 4:
            out[name] = struct.unpack("=I", value)[0]
    return out


def probe_family() -> dict:
    tr = nl.RealNetlinkTransport()
    tr.settimeout(5)
    try:
        fam = request(tr, nl.encode_getfamily(1), 1)[0]
        info = nl.decode_family(fam)
        ops = {}
        _cmd, attrs = nl._genl_attrs(fam)
        for attr_type, value in nl.iter_attrs(attrs):
            if attr_type == CTRL_ATTR_OPS:
                for _i, op in nl.iter_attrs(value):
                    fields = dict(nl.iter_attrs(op))
                    op_id = struct.unpack("=I", fields[CTRL_ATTR_OP_ID])[0]
                    flags = struct.unpack("=I", fields.get(CTRL_ATTR_OP_FLAGS, b"\0" * 4))[0]
                    ops[_name(HandshakeCmd, op_id)] = {"id": op_id, "flags": flags,
                                      "flag_names": [n for b, n in GENL_FLAGS.items()
                                                     if flags & b]}  # fmt: skip
        # whole-family policy dump (no CTRL_ATTR_OP): every op's do-policy index
        attrs = nl.encode_attr(nl.CTRL_ATTR_FAMILY_ID, struct.pack("=H", info.family_id))
        dump = nl.NLM_F_REQUEST | nl.NLM_F_DUMP
        getpolicy = nl.encode_genl(nl.GENL_ID_CTRL, nl.CTRL_CMD_GETPOLICY, nl.CTRL_VERSION, 2,
                                   attrs, dump)  # fmt: skip
        msgs = request(tr, getpolicy, 2)
        do_policy: dict[int, int] = {}
        policies: dict[int, dict[int, dict]] = {}
        for msg in msgs:
            _cmd, attrs = nl._genl_attrs(msg)
            for attr_type, value in nl.iter_attrs(attrs):
                if attr_type == nl.CTRL_ATTR_OP_POLICY:
                    for op, op_attrs in nl.iter_attrs(value):
                        for kind, idx in nl.iter_attrs(op_attrs):
                            if kind == nl.CTRL_ATTR_POLICY_DO:
                                do_policy[op] = struct.unpack("=I", idx)[0]
                elif attr_type == nl.CTRL_ATTR_POLICY:
                    for pidx, pol in nl.iter_attrs(value):
                        for attr, spec in nl.iter_attrs(pol):
                            policies.setdefault(pidx, {})[attr] = _policy_spec(spec)
        op_policy = {}
        for op, pidx in sorted(do_policy.items()):
            enum = DoneAttr if op == HandshakeCmd.DONE else AcceptAttr
            op_policy[_name(HandshakeCmd, op)] = {
                _name(enum, a): spec for a, spec in sorted(policies.get(pidx, {}).items())
            }
        # what the daemon's own probe (tlshd.netlink) concludes
        hn = nl.HandshakeNetlink()
        hn._cmd = nl.RealNetlinkTransport()
        hn._cmd.settimeout(5)
        hn.family_id = info.family_id
        daemon_done_maxattr = hn.probe_done_attrs()
        hn._cmd.close()
        return {"family_id": info.family_id, "mcast_groups": info.mcast_groups, "ops": ops,
                "op_policy": op_policy, "daemon_done_maxattr": daemon_done_maxattr}  # fmt: skip
    finally:
        tr.close()


def _tls_pair() -> tuple[socket.socket, socket.socket, socket.socket]:
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(1)
    cli = socket.create_connection(srv.getsockname())
    acc, _ = srv.accept()
    return srv, cli, acc


def _try(fn, *args) -> dict:  # type: ignore[no-untyped-def]
    try:
        return {"ok": True, "value": fn(*args)}
    except OSError as e:
        return {"ok": False, "errno": errno.errorcode.get(e.errno or 0, e.errno), "error": str(e)}


def probe_tls_sockopt() -> dict:
    lg.sh(["modprobe", "tls"])
    out: dict = {}
    srv, cli, acc = _tls_pair()
    try:
        cli.setsockopt(socket.IPPROTO_TCP, TCP_ULP, b"tls")

        def get() -> int:
            return struct.unpack("=H", cli.getsockopt(SOL_TLS, TLS_TX_MAX_PAYLOAD_LEN, 2))[0]

        def put(n: int) -> int:
            cli.setsockopt(SOL_TLS, TLS_TX_MAX_PAYLOAD_LEN, struct.pack("=H", n))
            return get()

        out["get_before_tx"] = _try(get)
        out["set_1024_before_tx"] = _try(put, 1024)
        # struct tls12_crypto_info_aes_gcm_128: version, cipher, iv[8], key[16], salt[4], seq[8]
        info = struct.pack("=HH", TLS_1_3_VERSION, TlsCipher.AES_GCM_128) + bytes(8 + 16 + 4 + 8)
        out["tls_tx"] = _try(cli.setsockopt, SOL_TLS, TLS_TX, info)
        out["get_after_tx"] = _try(get)
        out["set_4095_after_tx"] = _try(put, 4095)
        out["set_32_after_tx"] = _try(put, 32)  # below the 63/64 minimum: EINVAL expected
    finally:
        for s in (cli, acc, srv):
            s.close()
    st = out["get_before_tx"]
    out["supported"] = st["ok"] or st.get("errno") != "ENOPROTOOPT"
    # what the daemon's own capability probe concludes (not on older checkouts)
    try:
        from tlshd.supervisor.tlsmodule import tx_max_payload_len_supported
    except ImportError:
        out["daemon_probe"] = None
    else:
        out["daemon_probe"] = tx_max_payload_len_supported()
    return out


def probe_nvme() -> dict:
    out: dict = {}
    lg.sh(["modprobe", "-a", "nvme-tcp", "nvmet", "nvmet-tcp"], check=False)
    try:
        opts = Path("/dev/nvme-fabrics").read_text().strip()
    except OSError as e:
        opts = f"error: {e}"
    out["fabrics_options_raw"] = opts
    names = sorted({o.split("=")[0] for o in opts.split(",") if o})
    out["fabrics_options"] = names
    for want in ("concat", "tls", "keyring", "tls_key", "dhchap_secret", "dhchap_ctrl_secret"):
        out[f"fabrics_has_{want}"] = want in names
    helptext = lg.sh(["nvme", "connect", "--help"], check=False)
    out["nvme_cli_version"] = lg.sh(["nvme", "version"], check=False).stdout.strip()
    out["nvme_cli_connect_concat"] = "--concat" in helptext.stdout + helptext.stderr
    cfs = Path("/sys/kernel/config")
    if not os.path.ismount(cfs):
        lg.sh(["mount", "-t", "configfs", "configfs", str(cfs)], check=False)
    nvmet = cfs / "nvmet"
    host = nvmet / "hosts" / "probe-host"
    port = nvmet / "ports" / "9"
    try:
        host.mkdir()
        port.mkdir()
        out["nvmet_host_attrs"] = sorted(p.name for p in host.iterdir())
        out["nvmet_port_attrs"] = sorted(p.name for p in port.iterdir())
        (port / "addr_trtype").write_text("tcp\n")
        out["nvmet_port_tsas"] = (port / "addr_tsas").read_text().strip()
    except OSError as e:
        out["nvmet_error"] = str(e)
    finally:
        for d in (port, host):
            if d.is_dir():
                d.rmdir()
    return out


def probe_accept_keyring() -> dict:
    """Take one real NVMe/TCP host handshake request and look at its ACCEPT reply."""
    out: dict = {}
    lg.sh(["sh", str(HERE / "nvme_target.sh"), SUBNQN, HOSTNQN, "127.0.0.1", "4420"])
    gen = lg.sh(["nvme", "gen-tls-key", f"--hostnqn={HOSTNQN}", f"--subsysnqn={SUBNQN}",
                 "--hmac=1", "--identity=1", "--insert"])  # fmt: skip
    out["gen_tls_key"] = gen.stdout.strip().splitlines()[-1:]
    keys = {line.split()[8]: int(line.split()[0], 16) for line in
            Path("/proc/keys").read_text().splitlines() if len(line.split()) >= 9}  # fmt: skip
    out["nvme_keyring_serial"] = keys.get(".nvme:")  # /proc/keys shows "name:" for keyrings
    hn = nl.HandshakeNetlink()
    hn.open()  # joins the tlshd group: this process is the handshake daemon now
    connect = subprocess.Popen(
        ["nvme", "connect", "-t", "tcp", "-a", "127.0.0.1", "-s", "4420", "-n", SUBNQN,
         f"--hostnqn={HOSTNQN}", f"--hostid={HOSTID}", "--tls", "--nr-io-queues=1"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 30
        params = None
        while params is None and time.monotonic() < deadline:
            params = hn.accept()
            if params is None:
                time.sleep(0.05)  # polling for the kernel's request, bounded by the deadline
        if params is None:
            out["error"] = "no handshake request within 30s"
            return out
        out["accept"] = params.to_wire()
        out["keyring_attr_present"] = params.keyring is not None
        out["keyring_is_nvme"] = params.keyring == out["nvme_keyring_serial"]
        hn.done(params.sockfd, errno.EACCES)
        os.close(params.sockfd)
        try:
            text, _ = connect.communicate(timeout=60)
            out["connect"] = {"rc": connect.returncode, "output": text.strip()[-500:]}
        except subprocess.TimeoutExpired:
            out["connect"] = {"rc": None, "output": "still running after 60s"}
    finally:
        if connect.poll() is None:
            connect.kill()
            connect.wait()
        hn.close()
    return out


def versions() -> dict:
    q = lg.sh(["dpkg-query", "-W", "ktls-utils", "nvme-cli", "nfs-common", "openssl",
               "gnutls-bin", "python3"], check=False).stdout  # fmt: skip
    osr = dict(re.findall(r'^(\w+)="?([^"\n]*)"?$', Path("/etc/os-release").read_text(), re.M))
    return {"uname": platform.release(), "os": osr.get("PRETTY_NAME"),
            "packages": dict(line.split("\t", 1) for line in q.splitlines() if "\t" in line),
            "image": os.environ.get("LAB_IMAGE")}  # fmt: skip


PROBES = {
    "versions": versions,
    "family": probe_family,
    "tls_sockopt": probe_tls_sockopt,
    "nvme": probe_nvme,
    "accept_keyring": probe_accept_keyring,
}


def main(names: list[str]) -> int:
    result: dict = {}
    failed = 0
    for name in names or list(PROBES):
        lg.log(f"=== probe {name}")
        try:
            result[name] = PROBES[name]()
        except Exception as e:  # one broken probe must not hide the others
            result[name] = {
                "error": f"{type(e).__name__}: {e}",
                "traceback": traceback.format_exc(),
            }
            failed += 1
        lg.log(f"{name}: {json.dumps(result[name], default=str)[:2000]}")
    lg.write_result("kernel_probe", result)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
