# tlshd (Python) container image.
#
# Targets:
#   runtime (default)  python3 + the tlshd virtualenv, no shell, no package
#                      manager, no pip; one flattened layer
#   dev                runtime plus a shell, apt, keyutils, procps, iproute2,
#                      openssl and kmod, for debugging
#
# Run (tlshd needs root with CAP_NET_ADMIN in the host network namespace, whose
# handshake requests it serves; --privileged also lifts the default seccomp
# profile, which forbids keyctl/add_key):
#   docker run -d --name tlshd --privileged --network host \
#       -v /etc/tlshd:/etc/tlshd:ro tlshd
# See docs/operations.md.  tests/container/build_image.sh builds it without a
# registry (debootstrap base) when Docker Hub cannot be reached.

# Both stages must use the same base: the virtualenv points at the base's
# /usr/bin/python3, and its wheels are built for that Python.
ARG BASE_IMAGE=debian:trixie-slim
# OCI labels (build_image.sh passes them from git): the project version, the
# commit the image is built from, and the repository it comes from.
ARG TLSHD_VERSION=0.1.0
ARG TLSHD_REVISION=unknown
ARG TLSHD_SOURCE=unknown

# --- build: a wheel of the project, installed with its dependencies into a venv
FROM ${BASE_IMAGE} AS build
ARG DEBIAN_FRONTEND=noninteractive
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-venv ca-certificates \
 && rm -rf /var/lib/apt/lists/*
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1
WORKDIR /src
COPY pyproject.toml ./
COPY tlshd/ tlshd/
COPY supervisor/ supervisor/
COPY workers/ workers/
# The wheel's data files (pyproject.toml): man pages, the unit, the example
# config; pip puts them in /opt/tlshd/share (man pages in share/man).
COPY man/ man/
COPY systemd/ systemd/
COPY etc/ etc/
# Dependencies come as binary wheels where they exist (pure-Python sdists such
# as sdnotify still build); there is no compiler, so a C extension without a
# wheel fails the build instead of compiling something untested.
# Optional secret "pip_cert": a CA bundle for a TLS-intercepting proxy in front
# of PyPI (build_image.sh passes the host's); it never lands in a layer.
RUN --mount=type=secret,id=pip_cert,required=false \
    if [ -s /run/secrets/pip_cert ]; then export PIP_CERT=/run/secrets/pip_cert; fi \
 && python3 -m venv /opt/tlshd \
 && /opt/tlshd/bin/pip wheel --no-deps --wheel-dir /wheels . \
 && /opt/tlshd/bin/pip install --prefer-binary /wheels/tlshd-*.whl \
 && /opt/tlshd/bin/pip uninstall -y pip \
 && /opt/tlshd/bin/tlshd -v

# --- runtime-base: what both final images share
FROM ${BASE_IMAGE} AS runtime-base
ARG DEBIAN_FRONTEND=noninteractive
# python3: the interpreter the venv links to.  ca-certificates: the system
# trust store, used when no x509.truststore is configured (as upstream).
# libseccomp2: the workers' seccomp filter (pyseccomp loads it).
# tlshd: the workers' own account ([worker] user), shared with no other process.
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 ca-certificates libseccomp2 \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --system --user-group --no-create-home --home-dir /nonexistent \
            --shell /usr/sbin/nologin tlshd
COPY --from=build /opt/tlshd /opt/tlshd
# A minimal configuration (every key commented out); mount your own over it.
COPY etc/config.example /etc/tlshd/config

# --- dev: runtime plus debugging tools (shell, apt, keyctl, ps, ip, openssl)
FROM runtime-base AS dev
ARG DEBIAN_FRONTEND=noninteractive
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends keyutils procps iproute2 openssl kmod \
 && rm -rf /var/lib/apt/lists/*
ENV PATH=/opt/tlshd/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    PYTHONUNBUFFERED=1
ARG TLSHD_VERSION
ARG TLSHD_REVISION
ARG TLSHD_SOURCE
LABEL org.opencontainers.image.title="tlshd (dev)" \
      org.opencontainers.image.description="Linux TLS handshake daemon (Python), debug variant" \
      org.opencontainers.image.licenses="GPL-2.0-only" \
      org.opencontainers.image.version="${TLSHD_VERSION}" \
      org.opencontainers.image.revision="${TLSHD_REVISION}" \
      org.opencontainers.image.source="${TLSHD_SOURCE}"
VOLUME ["/etc/tlshd"]
ENTRYPOINT ["/opt/tlshd/bin/tlshd"]
CMD ["-s"]

# --- runtime-rootfs: strip the package manager, the shells and perl.  The dpkg
# status database stays: it is data, and image scanners read it to list the
# packages (and their CVEs).  This is the last step that can run a shell.
FROM runtime-base AS runtime-rootfs
RUN rm -rf /var/lib/apt /var/cache/apt /var/cache/debconf /var/log/* \
           /etc/apt /usr/lib/apt /usr/lib/dpkg /usr/share/doc /usr/share/man \
           /usr/share/info /usr/share/perl* /usr/lib/*/perl* /usr/share/lintian \
 && rm -f /usr/bin/apt* /usr/bin/dpkg* /usr/sbin/dpkg* /usr/bin/debconf* \
          /usr/sbin/update-* /usr/bin/perl* \
          /usr/bin/bash /usr/bin/rbash /usr/bin/dash /usr/bin/sh

# --- runtime (default): one layer, so nothing removed above survives below it
FROM scratch AS runtime
# hadolint ignore=DL3067
COPY --from=runtime-rootfs / /
ENV PATH=/opt/tlshd/bin:/usr/sbin:/usr/bin \
    PYTHONUNBUFFERED=1
ARG TLSHD_VERSION
ARG TLSHD_REVISION
ARG TLSHD_SOURCE
LABEL org.opencontainers.image.title="tlshd" \
      org.opencontainers.image.description="Linux TLS handshake daemon (Python), drop-in for ktls-utils' tlshd" \
      org.opencontainers.image.licenses="GPL-2.0-only" \
      org.opencontainers.image.version="${TLSHD_VERSION}" \
      org.opencontainers.image.revision="${TLSHD_REVISION}" \
      org.opencontainers.image.source="${TLSHD_SOURCE}"
# Configuration, certificates and keys; mount read-only.
VOLUME ["/etc/tlshd"]
# No shell in this image: the health check runs the status client directly.
HEALTHCHECK --interval=30s --timeout=5s --start-period=10s \
    CMD ["/opt/tlshd/bin/tlshd", "status"]
# Root is required (CAP_NET_ADMIN for the handshake netlink family, root's
# kernel keyrings); workers drop to [worker] user (tlshd) with no capabilities.
# hadolint ignore=DL3002
USER 0:0
ENTRYPOINT ["/opt/tlshd/bin/tlshd"]
CMD ["-s"]
