#!/bin/sh
# Stage 2 of the tlshd lab guest, run as PID 1 after switch_root.
# Mounts the basics, installs the project under test (a fresh wheel built on
# the host for this run), runs /lab/run/scenario, collects logs into
# /lab/results and powers off.  /lab/run/env holds the run's settings.
export PATH=/lab/run/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
export HOME=/root LANG=C.UTF-8 PYTHONDONTWRITEBYTECODE=1 PYTHONPATH=/lab/run
R=/lab/results
cd /
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t tmpfs -o mode=1777 tmpfs /tmp
mount -t tmpfs -o mode=0755 tmpfs /run
mkdir -p /dev/pts /dev/shm /run/lock /var/lib/nfs/rpc_pipefs /sys/kernel/tracing
mount -t devpts devpts /dev/pts
mount -t tmpfs tmpfs /dev/shm
mount -t tracefs tracefs /sys/kernel/tracing 2>/dev/null
ln -sf /proc/self/fd /dev/fd 2>/dev/null
hostname tlshd-lab
ip link set lo up
echo 1 > /proc/sys/kernel/sysrq
. /lab/run/env
echo "lab: stage2 up at $(cut -d' ' -f1 /proc/uptime)s, kernel $(uname -r), daemon=$LAB_DAEMON"

# system logger (upstream tlshd and ours both log to syslog)
busybox syslogd -n -O $R/syslog.log &

# the project under test, installed fresh into the venv baked into the root
if ls /lab/run/wheels/*.whl >/dev/null 2>&1; then
    t0=$(cut -d' ' -f1 /proc/uptime)
    if [ "$LAB_INSTALLER" = pip ]; then
        set -- /opt/tlshd/bin/python -m pip install --no-deps --no-index --no-compile \
            --disable-pip-version-check --root-user-action=ignore
    else
        set -- /opt/tlshd/bin/python /lab/run/install_wheel.py
    fi
    if "$@" /lab/run/wheels/*.whl > $R/install.log 2>&1; then
        echo "lab: project installed in $(awk -v t0=$t0 '{print $1-t0}' /proc/uptime)s"
    else
        echo "lab: INSTALL FAILED (see install.log)"; tail -5 $R/install.log
    fi
fi

rc=0
if [ "$LAB_MODE" = shell ]; then
    echo "lab: interactive shell; 'exit' powers the guest off"
    [ -x /lab/run/scenario ] && /lab/run/scenario
    setsid busybox cttyhack /bin/bash -l
else
    t0=$(cut -d' ' -f1 /proc/uptime)
    ( cd $R && /lab/run/scenario ) > $R/scenario.log 2>&1 &
    spid=$!
    # stream the scenario log to the console while it runs
    tail -f $R/scenario.log --pid=$spid 2>/dev/null &
    tpid=$!
    wait $spid
    rc=$?
    sleep 0.2; kill $tpid 2>/dev/null
    echo "lab: scenario exited rc=$rc after $(awk -v t0=$t0 '{print $1-t0}' /proc/uptime)s"
fi
echo $rc > $R/rc
dmesg > $R/dmesg.txt 2>&1
[ -r /sys/kernel/tracing/trace ] && cat /sys/kernel/tracing/trace > $R/trace.txt 2>/dev/null
cat /proc/net/tls_stat > $R/tls_stat.txt 2>/dev/null
ps -eo pid,ppid,user,stat,etime,args > $R/ps.txt 2>&1
sync
echo "LAB-EXIT rc=$rc"
echo o > /proc/sysrq-trigger
sleep 30
