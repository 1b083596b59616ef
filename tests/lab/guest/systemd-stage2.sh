#!/bin/sh
# Stage 2 of the lab guest booted with the kernel argument lab.init=systemd
# (guest/init switch_roots here instead of stage2.sh; the root needs the
# systemd package: run_guest(..., extra_packages=("systemd",))).
#
#   no argument (PID 1): write the lab's units, masks and settings into /etc
#       (the root is a tmpfs overlay: nothing persists), then exec systemd.
#   "run" (lab-scenario.service): install the project's wheel, run
#       /lab/run/scenario, collect logs into /lab/results; the unit powers the
#       guest off when this exits (SuccessAction=/FailureAction=poweroff).
export PATH=/lab/run/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
export HOME=/root LANG=C.UTF-8 PYTHONDONTWRITEBYTECODE=1 PYTHONPATH=/lab/run
R=/lab/results
E=/etc/systemd/system

if [ "$1" != run ]; then
    echo "lab: systemd stage 2: preparing units"
    # Boot only sysinit.target + lab-scenario.service (lab.target), and mask what
    # is useless here and slow under TCG, waits for hardware, or prompts on the console.
    for u in systemd-firstboot.service systemd-pstore.service systemd-random-seed.service \
             systemd-tpm2-setup-early.service systemd-tpm2-setup.service \
             systemd-pcrmachine.service systemd-pcrphase-sysinit.service \
             systemd-pcrphase.service systemd-hibernate-clear.service \
             systemd-journal-catalog-update.service systemd-update-done.service \
             systemd-machine-id-commit.service systemd-sysusers.service ldconfig.service \
             proc-sys-fs-binfmt_misc.automount systemd-binfmt.service \
             sys-kernel-config.mount sys-fs-fuse-connections.mount dev-hugepages.mount \
             systemd-networkd.service systemd-networkd.socket \
             nvmf-autoconnect.service nvmefc-boot-connections.service \
             getty.target serial-getty@ttyS0.service \
             sys-kernel-debug.mount dev-mqueue.mount kmod-static-nodes.service \
             systemd-tmpfiles-setup-dev-early.service systemd-tmpfiles-setup-dev.service \
             systemd-modules-load.service systemd-sysctl.service systemd-remount-fs.service \
             systemd-journal-flush.service; do
        ln -sf /dev/null "$E/$u"
    done
    mkdir -p /etc/systemd/journald.conf.d /etc/systemd/system.conf.d "$E/poweroff.target.d"
    # volatile journal; no rate limit (the scenario turns PID 1's debug log on)
    printf '[Journal]\nStorage=volatile\nRateLimitBurst=0\n' \
        > /etc/systemd/journald.conf.d/lab.conf
    printf '[Manager]\nDefaultTimeoutStopSec=20s\n' > /etc/systemd/system.conf.d/lab.conf
    # a wedged shutdown must not eat the host's timeout
    printf '[Unit]\nJobTimeoutSec=60s\n' > "$E/poweroff.target.d/lab.conf"
    cat > "$E/lab.target" <<'EOF'
[Unit]
Description=tlshd lab: sysinit and the scenario
Requires=sysinit.target
After=sysinit.target
Wants=lab-scenario.service
AllowIsolate=yes
EOF
    cat > "$E/lab-scenario.service" <<'EOF'
[Unit]
Description=tlshd lab scenario (/lab/run/scenario)
After=sysinit.target
SuccessAction=poweroff
FailureAction=poweroff
[Service]
Type=exec
ExecStart=/bin/sh /lab/run/systemd-stage2.sh run
StandardOutput=journal+console
StandardError=journal+console
EOF
    ln -sf lab.target "$E/default.target"
    exec /lib/systemd/systemd
fi

# ---- lab-scenario.service
. /lab/run/env
cd /
echo "lab: systemd $(systemctl --version | head -1 | cut -d' ' -f2) is PID 1 ($(cat /proc/1/comm));" \
    "scenario service up at $(cut -d' ' -f1 /proc/uptime)s, kernel $(uname -r)"
echo 1 > /proc/sys/kernel/sysrq
mkdir -p /var/lib/nfs/rpc_pipefs
if ls /lab/run/wheels/*.whl >/dev/null 2>&1; then
    t0=$(cut -d' ' -f1 /proc/uptime)
    if /opt/tlshd/bin/python /lab/run/install_wheel.py /lab/run/wheels/*.whl \
            > $R/install.log 2>&1; then
        echo "lab: project installed in $(awk -v t0="$t0" '{print $1-t0}' /proc/uptime)s"
    else
        echo "lab: INSTALL FAILED (see install.log)"; tail -5 $R/install.log
    fi
fi
t0=$(cut -d' ' -f1 /proc/uptime)
( cd $R && /lab/run/scenario ) > $R/scenario.log 2>&1 &
spid=$!
tail -f $R/scenario.log --pid=$spid 2>/dev/null &
tpid=$!
wait $spid
rc=$?
sleep 0.2; kill $tpid 2>/dev/null
echo "lab: scenario exited rc=$rc after $(awk -v t0="$t0" '{print $1-t0}' /proc/uptime)s"
echo $rc > $R/rc
dmesg > $R/dmesg.txt 2>&1
[ -r /sys/kernel/tracing/trace ] && cat /sys/kernel/tracing/trace > $R/trace.txt 2>/dev/null
cat /proc/net/tls_stat > $R/tls_stat.txt 2>/dev/null
ps -eo pid,ppid,user,stat,etime,args > $R/ps.txt 2>&1
journalctl --sync 2>/dev/null
journalctl -b --no-pager -o short-monotonic > $R/journal.txt 2>&1
sync
echo "LAB-EXIT rc=$rc (systemd powers off)"
exit 0
