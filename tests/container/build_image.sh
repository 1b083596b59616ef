#!/usr/bin/env bash
# Build the tlshd container image without a Docker daemon, and smoke-test it.
#
#   tests/container/build_image.sh [build|check|all] [TARGET...]
#
#   build   buildah bud of TARGETs (default: runtime dev) from the Dockerfile
#   check   run `tlshd -v` and `tlshd --check-config` in each built TARGET and
#           check the runtime image has no shell, no pip and no apt/dpkg
#   all     build, then check (the default)
#   clean   remove the storage and caches (images, layers, debootstrap debs)
#
# The base image is debian:trixie-slim when a registry can be reached.  When it
# cannot (this project's machines reach only the Debian and PyPI archives), a
# trixie minbase made with debootstrap is imported as localhost/tlshd-base:trixie
# and used instead; the Dockerfile's BASE_IMAGE argument selects it.
#
# Environment:
#   TLSHD_CONTAINER_CACHE  storage and caches (default /var/cache/tlshd-container)
#   TLSHD_IMAGE            image name (default localhost/tlshd); tags = targets
#   TLSHD_BASE_IMAGE       use this base, skip the registry probe and debootstrap
#   TLSHD_MIRROR           Debian archive for debootstrap (default: apt's own)
#
# Needs root, buildah, and debootstrap for the fallback base.  Uses its own
# container storage (vfs driver, no overlay/fuse needed) and chroot isolation,
# so it also works inside a VM or container without cgroup delegation.
set -euo pipefail

REPO=$(cd "$(dirname "$0")/../.." && pwd)
CACHE=${TLSHD_CONTAINER_CACHE:-/var/cache/tlshd-container}
IMAGE=${TLSHD_IMAGE:-localhost/tlshd}
REGISTRY_BASE=docker.io/library/debian:trixie-slim
LOCAL_BASE=localhost/tlshd-base:trixie
BASE_MAX_AGE_DAYS=7
SUITE=trixie

export BUILDAH_ISOLATION=chroot
BUILDAH=(buildah --root "$CACHE/storage" --runroot "$CACHE/run" --storage-driver vfs)

log() { printf 'build_image: %s\n' "$*" >&2; }
die() { log "$*"; exit 1; }

need() {
    command -v "$1" >/dev/null || die "$1 not found (apt-get install $2)"
}

debian_mirror() {
    if [[ -n ${TLSHD_MIRROR:-} ]]; then
        echo "$TLSHD_MIRROR"
        return
    fi
    local uri
    uri=$(grep -hE '^(URIs:|deb )' /etc/apt/sources.list.d/*.sources /etc/apt/sources.list \
        2>/dev/null | grep -v security | sed -E 's/^URIs:[[:space:]]*//; s/^deb (\[[^]]*\] )?//' \
        | awk '{print $1}' | grep -m1 '/debian' || true)
    echo "${uri:-http://deb.debian.org/debian}"
}

image_exists() {
    "${BUILDAH[@]}" inspect --type image "$1" >/dev/null 2>&1
}

# A minbase trixie root imported as an image, rebuilt when older than a week
# so that its packages get security updates.
build_local_base() {
    local stamp=$CACHE/base.stamp
    if image_exists "$LOCAL_BASE" && [[ -n $(find "$stamp" -mtime -"$BASE_MAX_AGE_DAYS" 2>/dev/null) ]]; then
        log "reusing $LOCAL_BASE"
        return
    fi
    need debootstrap debootstrap
    local mirror tmp ctr
    mirror=$(debian_mirror)
    tmp=$(mktemp -d "$CACHE/base.XXXXXX")
    log "debootstrap $SUITE minbase from $mirror"
    mkdir -p "$CACHE/debs"
    if ! debootstrap --variant=minbase --cache-dir="$CACHE/debs" "$SUITE" "$tmp/root" "$mirror" \
        >"$tmp/debootstrap.out" 2>&1; then
        tail -20 "$tmp/debootstrap.out" >&2
        die "debootstrap failed"
    fi
    printf 'deb %s %s main\n' "$mirror" "$SUITE" >"$tmp/root/etc/apt/sources.list"
    rm -rf "$tmp/root/var/cache/apt/archives/"*.deb "$tmp/root/var/lib/apt/lists/"*
    : >"$tmp/root/etc/resolv.conf"
    tar -C "$tmp/root" --numeric-owner -cf "$tmp/root.tar" .
    ctr=$("${BUILDAH[@]}" from scratch)
    "${BUILDAH[@]}" add "$ctr" "$tmp/root.tar" / >/dev/null
    "${BUILDAH[@]}" config --env PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
        --cmd /bin/bash "$ctr"
    "${BUILDAH[@]}" commit --quiet --rm "$ctr" "$LOCAL_BASE" >/dev/null
    rm -rf "$tmp"
    touch "$stamp"
    log "imported $LOCAL_BASE"
}

choose_base() {
    if [[ -n ${TLSHD_BASE_IMAGE:-} ]]; then
        echo "$TLSHD_BASE_IMAGE"
        return
    fi
    # One quick try: an unreachable registry fails at once (DNS) or times out.
    if timeout 60 "${BUILDAH[@]}" pull --quiet "$REGISTRY_BASE" >/dev/null 2>&1; then
        echo "$REGISTRY_BASE"
        return
    fi
    log "cannot pull $REGISTRY_BASE; building a local base with debootstrap"
    build_local_base
    echo "$LOCAL_BASE"
}

# The CA bundle pip trusts here (a proxy in front of PyPI may re-sign TLS).
pip_cert() {
    local cert=${PIP_CERT:-}
    [[ -n $cert ]] || cert=$(pip config get global.cert 2>/dev/null || true)
    [[ -n $cert && -s $cert ]] || cert=/etc/ssl/certs/ca-certificates.crt
    echo "$cert"
}

build() {
    local base target
    base=$(choose_base)
    for target in "$@"; do
        log "building $IMAGE:$target (base $base)"
        "${BUILDAH[@]}" bud --quiet --layers --force-rm --format docker --network host \
            --secret id=pip_cert,src="$(pip_cert)" \
            --build-arg BASE_IMAGE="$base" --target "$target" \
            --build-arg TLSHD_REVISION="$(git -C "$REPO" rev-parse HEAD 2>/dev/null || echo unknown)" \
            --build-arg TLSHD_SOURCE="$(git -C "$REPO" remote get-url origin 2>/dev/null || echo unknown)" \
            -t "$IMAGE:$target" -f "$REPO/Dockerfile" "$REPO" >/dev/null
    done
    # vfs stores every layer as a full copy: drop the untagged ones (the layer
    # cache of this build and older images) so the storage does not grow
    "${BUILDAH[@]}" rmi --prune >/dev/null 2>&1 || true
}

# Commands run in one working container per image (vfs copies the whole
# root for each container, so one is much faster than one per command).
CTR=
remove_container() {
    if [[ -n $CTR ]]; then
        "${BUILDAH[@]}" rm "$CTR" >/dev/null 2>&1 || true
        CTR=
    fi
}
trap remove_container EXIT

run_in() {
    "${BUILDAH[@]}" run "$CTR" -- "$@"
}

expect_fail() {
    local what=$1
    shift
    if run_in "$@" >/dev/null 2>&1; then
        die "$what is present in the runtime image"
    fi
}

check_image() {
    local target=$1 image=$IMAGE:$1
    image_exists "$image" || die "$image is not built"
    [[ $("${BUILDAH[@]}" inspect --format '{{.Docker.Config.Entrypoint}}' "$image") \
        == "[/opt/tlshd/bin/tlshd]" ]] || die "$image: unexpected entrypoint"
    log "checking $image"
    CTR=$("${BUILDAH[@]}" from --quiet "$image")
    run_in /opt/tlshd/bin/tlshd -v
    run_in /opt/tlshd/bin/tlshd --check-config
    run_in /opt/tlshd/bin/python -c 'import pwd; pwd.getpwnam("tlshd")'
    if [[ $target == runtime ]]; then
        expect_fail "a shell" /bin/sh -c true
        expect_fail "bash" /bin/bash -c true
        expect_fail "pip" /opt/tlshd/bin/python -m pip --version
        expect_fail "apt-get" /usr/bin/apt-get --version
        expect_fail "dpkg" /usr/bin/dpkg --version
        run_in /opt/tlshd/bin/python -c 'import os; assert os.path.getsize("/var/lib/dpkg/status")'
    else
        run_in /bin/sh -c 'command -v keyctl ps ip openssl modprobe' >/dev/null
    fi
    remove_container
}

check() {
    local target
    for target in "$@"; do
        check_image "$target"
    done
    log "image checks passed: $*"
}

clean() {
    log "removing $CACHE"
    rm -rf "$CACHE"
}

main() {
    [[ $(id -u) -eq 0 ]] || die "must run as root"
    need buildah buildah
    mkdir -p "$CACHE"
    local action=${1:-all}
    [[ $# -gt 0 ]] && shift
    local targets=("$@")
    [[ ${#targets[@]} -gt 0 ]] || targets=(runtime dev)
    case $action in
    build) build "${targets[@]}" ;;
    check) check "${targets[@]}" ;;
    all) build "${targets[@]}" && check "${targets[@]}" ;;
    clean) clean ;;
    *) die "unknown action $action (build, check, all or clean)" ;;
    esac
}

main "$@"
