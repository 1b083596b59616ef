"""The real-kernel lab from the command line.

  python3 -m tests.lab demo   [--daemon ours|upstream]   NFS over TLS (tls, mtls), explained
  python3 -m tests.lab shell  [--daemon ours|upstream]   interactive guest (daemon + nfsd up)
  python3 -m tests.lab run    [--daemon D] SCRIPT        any guest script, results kept
  python3 -m tests.lab build  [--refresh]                build/refresh the cache only
  python3 -m tests.lab clean                             remove the cache

Every command but clean takes --image trixie|forky|forky-6.12 (default trixie:
Debian 13's 6.12 kernel, upstream tlshd 1.0.0; forky: the newest 7.x kernel from
trixie-backports, a forky root with upstream 1.4.0; forky-6.12: that root on
6.12).  build --image all builds every image.

Needs root (it installs qemu-system-x86, debootstrap, busybox-static, ... when
missing).  The first call builds the cache (a few minutes); later calls boot
in seconds.  The cache is $TLSHD_LAB_CACHE (default /var/cache/tlshd-lab).
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import sys
import time
from pathlib import Path

from tests.lab.build import DEFAULT_PROFILE, PROFILES, LabError, cache_dir, ensure_image, log

SHELL_SETUP = """#!/bin/sh
lab pki >/dev/null && lab config >/dev/null && lab trace-on && lab start-daemon >/dev/null \\
  && lab nfs-server
cat <<EOF
lab: the daemon ($LAB_DAEMON, log in /lab/results/daemon-$LAB_DAEMON.log) and nfsd are up.
  mount -t nfs4 -o vers=4.2,xprtsec=tls 127.0.0.1:/ /mnt/a     # or xprtsec=mtls
  cat /proc/net/tls_stat; cat /sys/kernel/tracing/trace; lab handshakes
  lab kill-daemon; lab start-daemon; lab stop-daemon
EOF
"""


def _fmt_hs(h: dict) -> str:
    status = h.get("status")
    st = "cancelled (no DONE)" if status is None else f"status={status}"
    lat = f", {h['latency'] * 1000:.0f} ms submit→complete" if "latency" in h else ""
    return f"{h.get('role', '?'):6} handshake {st}{lat}"


def _daemon_lines(log_text: str, limit: int = 16) -> list[str]:
    """The daemon's one-line handshake outcomes (ours: supervisor lines with the cipher)."""
    pat = re.compile(r"handshake (succeeded|failed)|was successful|Handshake .*fail", re.I)
    lines = [ln for ln in log_text.splitlines() if pat.search(ln)]
    if len(lines) > limit:
        lines = [f"... {len(lines) - limit} earlier lines", *lines[-limit:]]
    return lines


def demo(daemon: str, image: str = DEFAULT_PROFILE) -> int:
    from tests.lab.vm import run_guest

    out = Path(f"/tmp/tlshd-lab-demo-{time.strftime('%Y%m%d-%H%M%S')}")
    log(f"demo: booting the {image} lab with {daemon} tlshd (results in {out})")
    res = run_guest(
        "#!/bin/sh\nexec python3 /lab/run/nfs_scenarios.py tls_mount mtls_mount status_report\n",
        daemon=daemon,
        timeout=900,
        results_dir=out,
        echo=True,
        image=image,
    )
    print("\n" + "=" * 78)
    print(f"tlshd lab demo: {daemon} daemon, image {image}, kernel {res.kernel}")
    print(f"guest wall time {res.seconds:.0f}s (image check {res.build_seconds:.0f}s)")
    setup = res.scenario("setup") or {}
    if not setup.get("ok"):
        print(f"SETUP FAILED: {setup.get('error')}\n{res.text('scenario.log')[-3000:]}")
        return 1
    ok = True
    for name in ("tls_mount", "mtls_mount"):
        sc = res.scenario(name)
        if sc is None:
            print(f"\n{name}: no result (see {out}/scenario.log)")
            ok = False
            continue
        m = sc["mount"]
        print(f"\n--- mount -t nfs4 -o {m['opts']} {m['source']}  →  rc={m['rc']} "
              f"{m['output']} ({m['seconds']}s)")  # fmt: skip
        if m["proc_mounts"]:
            print(f"    /proc/mounts: {m['proc_mounts']}")
        for h in sc["handshakes"]:
            print("    " + _fmt_hs(h))
        io = sc.get("io", {})
        if io:
            same = (io.get("server_sees_same"), io.get("read_back_same"))
            print(f"    wrote {io['bytes']} bytes through the mount: server copy identical="
                  f"{same[0]}, read back identical={same[1]}")  # fmt: skip
        before, mounted = sc["tls_stat_before"], sc.get("tls_stat_mounted", {})
        keys = ("TlsCurrTxSw", "TlsCurrRxSw", "TlsTxSw", "TlsRxSw", "TlsDecryptError")
        stat = [f"{k} {before.get(k, 0)}→{mounted.get(k, before.get(k, 0))}" for k in keys]
        print("    /proc/net/tls_stat (before→mounted): " + ", ".join(stat))
        ok &= bool(sc.get("ok"))
    print(f"\n--- {daemon} daemon log (handshake outcomes):")
    for ln in _daemon_lines(res.text(f"daemon-{daemon}.log")):
        print("    " + ln)
    status = res.scenario("status_report") or {}
    if status.get("text"):
        print(f"\n--- tlshd status (after the mounts):\n{status['text'].rstrip()}")
    print(f"\nresults, dmesg, trace, daemon log: {out}")
    print("DEMO " + ("PASSED" if ok else "FAILED"))
    return 0 if ok else 1


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python3 -m tests.lab", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    sub = ap.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build", help="build or refresh the cached kernel/root/initramfs")
    b.add_argument("--refresh", action="store_true", help="re-resolve the newest kernel")
    b.add_argument("--extra", nargs="*", default=[], help="extra Debian packages")
    b.add_argument("--image", choices=(*PROFILES, "all"), default=DEFAULT_PROFILE)
    sub.add_parser("clean", help="remove the whole cache")
    d = sub.add_parser("demo", help="NFS over TLS with our daemon, explained")
    d.add_argument("--daemon", choices=("ours", "upstream"), default="ours")
    s = sub.add_parser("shell", help="interactive guest")
    s.add_argument("--daemon", choices=("ours", "upstream"), default="ours")
    s.add_argument("--bare", action="store_true", help="no daemon, no nfsd")
    r = sub.add_parser("run", help="run a guest script")
    r.add_argument("script", type=Path)
    r.add_argument("--daemon", choices=("ours", "upstream"), default="ours")
    r.add_argument("--timeout", type=int, default=900)
    r.add_argument("--results", type=Path)
    r.add_argument("--extra", nargs="*", default=[], help="extra Debian packages")
    for p in (d, s, r):
        p.add_argument("--image", choices=tuple(PROFILES), default=DEFAULT_PROFILE,
                       help="image profile (default %(default)s)")  # fmt: skip
    args = ap.parse_args(argv)
    try:
        if args.cmd == "build":
            for name in PROFILES if args.image == "all" else (args.image,):
                t0 = time.monotonic()
                img = ensure_image(args.extra, refresh=args.refresh, image=name)
                took = time.monotonic() - t0
                log(f"image {name} ready in {took:.0f}s: kernel {img.kernel.version}, "
                    f"root {img.root}, initramfs {img.initramfs}")  # fmt: skip
        elif args.cmd == "clean":
            d = cache_dir()
            log(f"removing {d}")
            shutil.rmtree(d, ignore_errors=True)
        elif args.cmd == "demo":
            return demo(args.daemon, args.image)
        elif args.cmd == "shell":
            from tests.lab.vm import run_guest

            script = "#!/bin/sh\ntrue\n" if args.bare else SHELL_SETUP
            res = run_guest(script, daemon=args.daemon, interactive=True, image=args.image)
            print(f"results: {res.results_dir}")
        elif args.cmd == "run":
            from tests.lab.vm import run_guest

            res = run_guest(args.script.read_text(), daemon=args.daemon, timeout=args.timeout,
                            extra_packages=args.extra, results_dir=args.results,
                            echo=True, image=args.image)  # fmt: skip
            print(json.dumps({"returncode": res.returncode, "results_dir": str(res.results_dir),
                              "image": res.image, "kernel": res.kernel,
                              "timed_out": res.timed_out, "timings": res.timings}))  # fmt: skip
            return 0 if res.returncode == 0 else 1
    except LabError as e:
        print(f"lab: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
