"""Post-quantum interop on the forky image: OpenSSL 3.6 and GnuTLS 3.8 peers.

Issue 12, item 5.  Run with the daemon's Python (``/opt/tlshd/bin/python``).
One boot:

1. PKI: the lab's ECDSA one (labguest.make_pki) plus an ML-DSA-65 CA with
   ML-DSA-65 server and client leaves; a config with both pairs in both roles
   (``x509.pq.*``) and a trust store holding both CAs; ``tlshd --check-config``.
2. The engine (real kTLS) as server against ``openssl s_client`` and
   ``gnutls-cli``, and as client against ``openssl s_server`` and
   ``gnutls-serv`` serving the ML-DSA certificate: the key exchange group and
   the signature each side reports.
3. Our daemon with that config: an NFS ``xprtsec=mtls`` mount, both ends
   ours; the daemon's log says which certificate each peer presented.

Writes /lab/results/scenarios/pq.json.
"""

from __future__ import annotations

import datetime
import ipaddress
import socket
import subprocess
import sys
import threading
import time
import traceback
from pathlib import Path

import labguest as lg
import nfs_scenarios as nfs

from tlshd.openssl_conf import ensure_openssl_conf

ensure_openssl_conf()  # before OpenSSL loads, as the daemon's CLI does

from cryptography import x509  # noqa: E402
from cryptography.hazmat.primitives import serialization  # noqa: E402
from cryptography.hazmat.primitives.asymmetric import mldsa  # noqa: E402
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID  # noqa: E402
from tlshd.supervisor import tlsmodule  # noqa: E402
from tlshd.workers.engine import HandshakeContext, perform_handshake  # noqa: E402

from tlshd.config import load_config  # noqa: E402
from tlshd.credentials import load_credentials  # noqa: E402
from tlshd.log import handshake_logger  # noqa: E402
from tlshd.params import HandshakeParams  # noqa: E402
from tlshd.uapi import AuthMode, MsgType  # noqa: E402

PKI = lg.PKI
PORT = 4433


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _write_key(path: Path, key: mldsa.MLDSA65PrivateKey) -> None:
    path.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                       serialization.PrivateFormat.PKCS8,
                                       serialization.NoEncryption()))  # fmt: skip
    path.chmod(0o600)


def make_pq_pki() -> dict:
    now = datetime.datetime.now(datetime.UTC)
    ca_key = mldsa.MLDSA65PrivateKey.generate()
    ca = (
        x509.CertificateBuilder().subject_name(_name("tlshd lab ML-DSA CA"))
        .issuer_name(_name("tlshd lab ML-DSA CA")).public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=30))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False, False),
                       critical=True)
        .sign(ca_key, None)
    )  # fmt: skip
    (PKI / "pq-ca.pem").write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    sans = [x509.DNSName("localhost"), x509.DNSName("tlshd-lab")] + [
        x509.IPAddress(ipaddress.ip_address(f"127.0.0.{i}")) for i in range(1, 33)
    ]
    for role, eku, san in (
        ("server", ExtendedKeyUsageOID.SERVER_AUTH, sans),
        ("client", ExtendedKeyUsageOID.CLIENT_AUTH, [x509.DNSName("client.tlshd-lab")]),
    ):
        key = mldsa.MLDSA65PrivateKey.generate()
        cert = (
            x509.CertificateBuilder().subject_name(_name(f"tlshd lab ML-DSA {role}"))
            .issuer_name(ca.subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(hours=1))
            .not_valid_after(now + datetime.timedelta(days=30))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([eku]), critical=False)
            .add_extension(x509.SubjectAlternativeName(san), critical=False)
            .sign(ca_key, None)
        )  # fmt: skip
        (PKI / f"pq-{role}.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        _write_key(PKI / f"pq-{role}.key", key)
    trust = PKI / "trust-both.pem"
    trust.write_bytes((PKI / "ca.pem").read_bytes() + (PKI / "pq-ca.pem").read_bytes())
    return {"trust": str(trust)}


def write_pq_config() -> Path:
    text = "[debug]\nloglevel=1\ntls=0\nnl=0\n\n"
    for side in ("client", "server"):
        text += (
            f"[authenticate.{side}]\n"
            f"x509.truststore={PKI}/trust-both.pem\n"
            f"x509.certificate={PKI}/{side}.pem\n"
            f"x509.private_key={PKI}/{side}.key\n"
            f"x509.pq.certificate={PKI}/pq-{side}.pem\n"
            f"x509.pq.private_key={PKI}/pq-{side}.key\n\n"
        )
    lg.CONFIG.parent.mkdir(parents=True, exist_ok=True)
    lg.CONFIG.write_text(text)
    return lg.CONFIG


def _context(name: str) -> HandshakeContext:
    config = load_config(str(lg.CONFIG))
    return HandshakeContext(
        config=config,
        credentials=load_credentials(config),
        keys=None,  # type: ignore[arg-type]  # no kernel keys: unauth client, x509 server
        deadline=time.monotonic() + 30,
        log=handshake_logger(name, "127.0.0.1"),
    )


def _finish(proc: subprocess.Popen) -> str:
    if proc.stdin:
        proc.stdin.close()
    try:
        out, _ = proc.communicate(timeout=15)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, _ = proc.communicate()
    return out.decode(errors="replace")


def engine_server(name: str, client_cmd: list[str]) -> dict:
    listener = socket.create_server(("127.0.0.1", PORT))
    proc = subprocess.Popen(client_cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT)  # fmt: skip
    listener.settimeout(20)
    sock, _ = listener.accept()
    listener.close()
    params = HandshakeParams(sockfd=sock.fileno(), message_type=MsgType.SERVERHELLO,
                             auth_mode=AuthMode.X509)  # fmt: skip
    r = perform_handshake(sock, params, _context(name))
    time.sleep(0.5)  # let the peer print its summary before its stdin closes
    out = _finish(proc)
    sock.close()
    return {"status": r.status, "detail": r.detail, "group": r.group,
            "cipher": r.cipher, "peer_output": out[-3000:]}  # fmt: skip


def _wait_port(proc: subprocess.Popen) -> None:
    for _ in range(200):
        try:
            socket.create_connection(("127.0.0.1", PORT), 0.2).close()
            return
        except OSError:
            if proc.poll() is not None:
                raise RuntimeError(f"peer server exited: {_finish(proc)}") from None
            time.sleep(0.05)
    raise RuntimeError("peer server did not listen")


def engine_client(name: str, server_cmd: list[str], probe_connects: bool) -> dict:
    proc = subprocess.Popen(server_cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT)  # fmt: skip
    if probe_connects:
        _wait_port(proc)
    else:
        time.sleep(2)
    sock = socket.create_connection(("127.0.0.1", PORT), 10)
    params = HandshakeParams(sockfd=sock.fileno(), message_type=MsgType.CLIENTHELLO,
                             auth_mode=AuthMode.UNAUTH, peername="localhost")  # fmt: skip
    result: dict = {}
    ctx = _context(name)
    t = threading.Thread(target=lambda: result.update(r=perform_handshake(sock, params, ctx)))
    t.start()
    t.join(30)
    r = result["r"]
    time.sleep(0.5)
    proc.terminate()
    out = _finish(proc)
    sock.close()
    return {"status": r.status, "detail": r.detail, "group": r.group,
            "cipher": r.cipher, "peer_output": out[-3000:]}  # fmt: skip


def guarded(run, *args) -> dict:  # type: ignore[no-untyped-def]
    """One sub-scenario; a peer that cannot even start is recorded, not fatal."""
    try:
        return run(*args)
    except Exception as e:
        return {"status": None, "error": f"{type(e).__name__}: {e}"}


def main() -> int:
    out: dict = {"ok": False, "kernel": Path("/proc/sys/kernel/osrelease").read_text().strip()}
    try:
        lg.make_pki()
        out["pki"] = make_pq_pki()
        write_pq_config()
        chk = subprocess.run(["/opt/tlshd/bin/tlshd", "--check-config", "-c", str(lg.CONFIG)],
                             capture_output=True, text=True, timeout=60, check=False)  # fmt: skip
        out["check_config"] = {"rc": chk.returncode, "output": (chk.stdout + chk.stderr)[-3000:]}
        out["versions"] = {
            "openssl": subprocess.run(
                ["openssl", "version"], capture_output=True, text=True, check=False
            ).stdout.strip(),
            "gnutls": subprocess.run(
                ["gnutls-cli", "--version"], capture_output=True, text=True, check=False
            ).stdout.splitlines()[0],
        }
        out["tls_module"] = tlsmodule.ensure_tls_module()
        trust = str(PKI / "trust-both.pem")
        out["server_vs_openssl"] = guarded(engine_server, "pq-s-openssl", [
            "openssl", "s_client", "-connect", f"127.0.0.1:{PORT}", "-CAfile", trust,
            "-verify_return_error", "-tls1_3"])  # fmt: skip
        out["server_vs_gnutls"] = guarded(engine_server, "pq-s-gnutls", [
            "gnutls-cli", "--x509cafile", trust, "--port", str(PORT), "127.0.0.1"])  # fmt: skip
        out["client_vs_openssl"] = guarded(engine_client, "pq-c-openssl", [
            "openssl", "s_server", "-accept", f"127.0.0.1:{PORT}", "-naccept", "2",
            "-cert", str(PKI / "pq-server.pem"), "-key", str(PKI / "pq-server.key"),
            "-tls1_3"], True)  # fmt: skip
        out["client_vs_gnutls"] = guarded(engine_client, "pq-c-gnutls", [
            "gnutls-serv", "--port", str(PORT), "--x509certfile", str(PKI / "pq-server.pem"),
            "--x509keyfile", str(PKI / "pq-server.key")], True)  # fmt: skip
        # GnuTLS without ML-DSA in its signature_algorithms: the classic pair
        classic_sigs = "NORMAL:-SIGN-ALL:+SIGN-ECDSA-SECP256R1-SHA256:+SIGN-ECDSA-SHA256"
        out["server_vs_gnutls_classic"] = guarded(engine_server, "pq-s-gnutls-classic", [
            "gnutls-cli", "--x509cafile", trust, "--priority", classic_sigs,
            "--port", str(PORT), "127.0.0.1"])  # fmt: skip
        out["client_vs_gnutls_classic"] = guarded(engine_client, "pq-c-gnutls-classic", [
            "gnutls-serv", "--port", str(PORT), "--x509certfile", str(PKI / "server.pem"),
            "--x509keyfile", str(PKI / "server.key")], True)  # fmt: skip
        lg.trace_on()
        lg.nfs_server()
        out["daemon_pid"] = lg.start_daemon("ours")
        out["nfs_mtls"] = nfs.mounted_scenario("pq_mtls", "127.0.0.4", "mtls")
        lg.stop_daemon()
        log = (lg.RESULTS / "daemon-ours.log").read_text(errors="replace")
        out["peer_cert_log"] = [ln for ln in log.splitlines() if "peer certificate" in ln][-10:]
        out["ok"] = True  # the test judges
    except Exception as e:
        out["error"] = f"{type(e).__name__}: {e}"
        out["traceback"] = traceback.format_exc()
    lg.write_result("pq", out)
    return 0 if out["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
