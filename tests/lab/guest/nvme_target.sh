#!/bin/sh
# NVMe/TCP target over TLS 1.3 (PSK) on loopback, configured through nvmet's
# configfs (kernel 6.12 attribute names).  Usage:
#
#   nvme_target.sh SUBNQN HOSTNQN [TRADDR] [TRSVCID] [TREQ]
#
# Creates one subsystem with one namespace backed by a 64 MiB file on a tmpfs
# (/srv/nvme/ns1.img, buffered I/O since the file lives on tmpfs), lets only
# HOSTNQN in, and exposes it on a TCP port with addr_tsas=tls1.3.  Writing
# tls1.3 makes the kernel set addr_treq to "required" and needs the port's
# keyring (.nvme, from nvme-keyring.ko) to exist.  The PSK itself is not set
# here: nvmet-tcp upcalls the handshake daemon, which finds the key by the
# identity the host sends.  TREQ (e.g. "not required", which secure channel
# concatenation needs: its first admin connection is plain TCP) is written to
# addr_treq after addr_tsas.
set -eu
SUB=$1
HOST=$2
TRADDR=${3:-127.0.0.1}
TRSVCID=${4:-4420}
TREQ=${5:-}
CFS=/sys/kernel/config/nvmet

modprobe -a nvmet nvmet-tcp
mountpoint -q /sys/kernel/config || mount -t configfs configfs /sys/kernel/config
[ -d "$CFS" ] || { echo "nvme_target: $CFS missing after modprobe nvmet" >&2; exit 1; }

mkdir -p /srv/nvme
mountpoint -q /srv/nvme || mount -t tmpfs -o size=96m nvme-backing /srv/nvme
truncate -s 64M /srv/nvme/ns1.img

# the host, and a subsystem that admits only that host
mkdir "$CFS/hosts/$HOST"
mkdir "$CFS/subsystems/$SUB"
echo 0 > "$CFS/subsystems/$SUB/attr_allow_any_host"
ln -s "$CFS/hosts/$HOST" "$CFS/subsystems/$SUB/allowed_hosts/$HOST"

# namespace 1: the file
NS="$CFS/subsystems/$SUB/namespaces/1"
mkdir "$NS"
echo /srv/nvme/ns1.img > "$NS/device_path"
echo 1 > "$NS/buffered_io"
echo 1 > "$NS/enable"

# the port: trtype first (writing it resets tsas), then tls1.3
P="$CFS/ports/1"
mkdir "$P"
echo tcp > "$P/addr_trtype"
echo ipv4 > "$P/addr_adrfam"
echo "$TRADDR" > "$P/addr_traddr"
echo "$TRSVCID" > "$P/addr_trsvcid"
echo tls1.3 > "$P/addr_tsas"
[ -z "$TREQ" ] || echo "$TREQ" > "$P/addr_treq"
ln -s "$CFS/subsystems/$SUB" "$P/subsystems/$SUB"

echo "nvme_target: $SUB on tcp $TRADDR:$TRSVCID tsas=$(cat "$P/addr_tsas")" \
    "treq=$(cat "$P/addr_treq") host=$HOST ns1=$(cat "$NS/device_path")"
