#!/bin/sh
# /init of a lab kernel node's initramfs (packed by ci/build-vm.sh; busybox-static only).
#
# 1. load the modules needed to reach the host (virtio, virtio_net, 9p), in the order
#    modprobe --show-depends gave at build time (/mods/order);
# 2. mount the host's root read-only over 9p (tag hostroot) at /host, with tmpfs over /run, /tmp
#    and /var/tmp (all writable state lives in the guest's memory), and the lab's workdir
#    read-write over 9p (tag labwork) at its own path, so kubeconfig, agent state and logs are
#    where the host expects them;
# 3. chroot into /host and run the guest side of wirekube.lab.vm (network, modules, command
#    server) with the host's Python; power off when it ends.
# Parameters come from the kernel command line: wk.python=, wk.workdir=, wk.config=, wk.keep=.
PATH=/bin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
echo "wirekube-vm: stage 1 on $(cat /proc/sys/kernel/osrelease)"
for m in $(cat /mods/order); do
  insmod "/mods/$m" || echo "wirekube-vm: insmod $m failed"
done
for word in $(cat /proc/cmdline); do
  case "$word" in
    wk.python=*) PY=${word#wk.python=} ;;
    wk.workdir=*) WORKDIR=${word#wk.workdir=} ;;
    wk.config=*) CONFIG=${word#wk.config=} ;;
    wk.keep=*) KEEP=${word#wk.keep=} ;;
  esac
done
fail() { echo "wirekube-vm: $1"; poweroff -f; }
mount -t 9p -o trans=virtio,version=9p2000.L,ro,msize=262144,cache=loose hostroot /host || fail "cannot mount the host root"
mount -t proc proc /host/proc
mount -t sysfs sys /host/sys
mount -t devtmpfs dev /host/dev
mkdir -p /host/dev/pts /host/dev/shm 2>/dev/null
mount -t devpts devpts /host/dev/pts
mount -t tmpfs -o mode=1777 shm /host/dev/shm
# The checkout and its virtualenv (wk.keep=, comma-separated) may live under /tmp or /run (a CI
# clone often does): hold them aside before the tmpfs mounts hide them, and put them back after.
KEPT=""
n=0
for d in $(echo "$KEEP" | tr ',' ' '); do
  mkdir -p "/keep$n" && mount -o bind "/host$d" "/keep$n" && KEPT="$KEPT $n:$d"
  n=$((n + 1))
done
mount -t tmpfs -o mode=0755 run /host/run
mount -t tmpfs -o mode=1777 tmp /host/tmp
mount -t tmpfs -o mode=1777 vartmp /host/var/tmp
for pair in $KEPT; do
  d=${pair#*:}
  mkdir -p "/host$d" 2>/dev/null
  mount -o bind "/keep${pair%%:*}" "/host$d" || fail "cannot keep $d visible"
done
mkdir -p "/host$WORKDIR" /host/run/wireguard /host/run/netns
mount -t 9p -o trans=virtio,version=9p2000.L,rw,msize=262144 labwork "/host$WORKDIR" || fail "cannot mount the lab workdir"
mount -t bpf bpf /host/sys/fs/bpf 2>/dev/null
echo "wirekube-vm: chroot, starting $PY -m wirekube.lab.vm guest $CONFIG"
chroot /host /usr/bin/env -i PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
  HOME=/tmp PYTHONDONTWRITEBYTECODE=1 "$PY" -m wirekube.lab.vm guest "$CONFIG"
echo "wirekube-vm: guest service ended with $?; powering off"
poweroff -f
