#!/usr/bin/env bash
# Installs everything the daemon, its tests and the QEMU lab need on a fresh
# Debian machine (run as root): Debian packages, then a virtualenv in .venv with
# the project installed editable plus its test extras.
set -euo pipefail
cd "$(dirname "$0")/.."

APT_PACKAGES=(
    # real TLS peers for the engine tests
    openssl gnutls-bin
    # kernel keyrings
    keyutils libkeyutils1
    # the workers' seccomp filter (pyseccomp loads libseccomp.so.2)
    libseccomp2
    # the real-kernel lab (tests/lab)
    qemu-system-x86 debootstrap busybox-static cpio kmod zstd xz-utils
    # the container image (tests/container) and the unit's security score
    buildah systemd
    # the man pages render without warnings (tests/test_man.py)
    groff-base man-db
)

missing=()
for pkg in "${APT_PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "ok installed" || missing+=("$pkg")
done
if ((${#missing[@]})); then
    if [[ $(id -u) -ne 0 ]]; then
        echo "setup.sh: missing Debian packages (${missing[*]}); run as root" >&2
        exit 1
    fi
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}"
fi

# The workers' own account (tlshd.config.DEFAULT_WORKER_USER), as on a server:
# the daemon tests drop privileges to it, and configs that leave [worker] user
# unset would otherwise carry the "falls back to nobody" warning.
if ! getent passwd tlshd >/dev/null; then
    if [[ $(id -u) -eq 0 ]]; then
        useradd --system --user-group --no-create-home --home-dir /nonexistent \
            --shell /usr/sbin/nologin tlshd
    else
        echo "setup.sh: no 'tlshd' account; as root: useradd --system tlshd" >&2
    fi
fi

if [[ ! -x .venv/bin/python ]]; then
    python3 -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -e ".[test]"
echo "setup.sh: ready (.venv)"
