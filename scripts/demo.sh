#!/usr/bin/env bash
# The main job, shown on any development machine: boots the real-kernel lab
# (Debian's 6.12 kernel under QEMU), starts our tlshd in it, mounts NFS over
# TLS (xprtsec=tls and mtls) and prints the handshakes, ciphers and kTLS
# counters.  The first run builds the lab cache (kernel, root fs): minutes.
# On a machine whose own kernel has net/handshake, run the daemon directly:
#   sudo .venv/bin/tlshd -s
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python -m tests.lab demo "$@"
