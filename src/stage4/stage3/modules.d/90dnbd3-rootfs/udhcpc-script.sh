#!/bin/sh
# busybox udhcpc event script: configure the interface with the lease (address, default route, DNS).
# shellcheck disable=SC2154  # interface, ip, router, dns: the lease, set by udhcpc in the environment
case "$1" in
    deconfig)
        ip addr flush dev "$interface"
        ip link set "$interface" up
        ;;
    bound | renew)
        ip addr flush dev "$interface"
        ip addr add "$ip/${mask:-24}" dev "$interface"
        for gateway in $router; do
            ip route replace default via "$gateway" dev "$interface"
            break
        done
        : > /etc/resolv.conf
        for server in $dns; do
            echo "nameserver $server" >> /etc/resolv.conf
        done
        ;;
esac
exit 0
