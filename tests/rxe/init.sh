#!/bin/sh
# /init of the soft-RoCE test guest: load rdma_rxe, bind rxe0 to a dummy netdev, run the
# checks (and the benchmark when ferry_bench=1 is on the kernel command line), power off.
export PATH=/bin:/sbin:/usr/bin:/usr/sbin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mount -t tmpfs tmpfs /tmp
dmesg -n 1
KVER=$(uname -r)
for m in $(cat /etc/rxe-modules.order); do
    insmod /lib/modules/$KVER/$m 2>/dev/null || echo "init: insmod $m failed"
done
ip link set lo up
ip link add dummy0 type dummy
ip link set dummy0 address 02:00:00:00:00:01
ip addr add 10.99.0.1/24 dev dummy0
ip link set dummy0 up
rdma link add rxe0 type rxe netdev dummy0 || echo "init: rdma link add failed"
# The port turns active and its GIDs appear a moment after the link is added.
for i in 1 2 3 4 5 6 7 8 9 10; do
    grep -q ACTIVE /sys/class/infiniband/rxe0/ports/1/state 2>/dev/null && break
    sleep 1
done
echo "init: rxe0 port state: $(cat /sys/class/infiniband/rxe0/ports/1/state 2>/dev/null)"
/opt/ferry-rdma-check suite --addr 10.99.0.1 --mib ${ferry_mib:-64}
if [ "${ferry_bench:-0}" = 1 ]; then
    /opt/ferry-rdma-check bench --addr 10.99.0.1 --mib ${ferry_mib:-64} --repeats 3
fi
dmesg | grep -iE "segfault|rxe|killed|oom|trap" | tail -n 20
echo "init: done"
poweroff -f
