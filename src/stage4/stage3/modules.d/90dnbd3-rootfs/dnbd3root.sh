#!/bin/bash
# dnbd3-rootfs: set up /dev/mapper/root for a Stage4 client (run once by dracut's initqueue, after udev
# settled). Every failure prints ONE line "stage4: ..." on the console and stops the boot: an emergency
# shell only with rd.shell on the command line, else the machine halts with the line on screen.
#
# Writable layer (stage4-writable.sh): device-mapper over a local partition (a thin snapshot by default)
# or, without one, a non-persistent snapshot of the root partition over a zram RAM disk, as OpenSLX
# clients have it: / is a plain block device, /dev/mapper/root, so the image's own fstab,
# systemd's fsck/remount logic and stage-4 tools (resize2fs, dmsetup) see what they expect; the RAM
# holds only the changed 4 KiB chunks, compressed. An overlayfs root would turn / into a file-system
# union that the image's PARTLABEL fstab entry and block-level tools cannot describe.
# shellcheck source=/dev/null  # dracut's library, only in the initramfs
command -v getarg > /dev/null || . /lib/dracut-lib.sh
# shellcheck source-path=SCRIPTDIR source=stage4-lib.sh  # installed as /lib/stage4-lib.sh
. /lib/stage4-lib.sh
# shellcheck source-path=SCRIPTDIR source=stage4-writable.sh  # installed as /lib/stage4-writable.sh
. /lib/stage4-writable.sh

PATH=/usr/sbin:/usr/bin:/sbin:/bin:/usr/local/sbin:/usr/local/bin
STATE=/run/stage4
mkdir -p "$STATE"

stop_boot() {
    printf '%s\n' "$1" > /dev/console
    if getargbool 0 rd.shell; then
        emergency_shell -n stage4 "$1"
    else
        systemctl --no-block halt 2> /dev/null || halt -f
    fi
    exit 1
}

last_line() {
    grep -v '^[[:space:]]*$' "$1" | tail -n 1
}

cmdline=$(getcmdline)

# Network: a DHCP lease on the first interface that gets one.
tried=""
netif=""
for dev in /sys/class/net/*; do
    dev=${dev##*/}
    [ "$dev" = lo ] && continue
    tried="$tried $dev"
    ip link set "$dev" up
    if busybox udhcpc -f -q -n -t 8 -T 2 -i "$dev" -s /lib/stage4-udhcpc.sh > "$STATE/dhcp.log" 2>&1; then
        netif=$dev
        break
    fi
done
[ -n "$netif" ] || stop_boot "$(slx_fail_line "no DHCP lease on any network interface (tried${tried:- none})")"
# The root file system comes over this interface: systemd-networkd in stage 4 (which /run is handed to)
# must keep its address and routes, else the root stalls and networkd with it. Sorted before the image's
# own .network files, so it is the one that matches this interface.
mkdir -p /run/systemd/network
printf '[Match]\nMACAddress=%s\n\n[Network]\nDHCP=ipv4\nKeepConfiguration=yes\n' \
    "$(cat "/sys/class/net/$netif/address")" > /run/systemd/network/10-stage4-netroot.network

# Configuration: the file from the boot server, then SLX_* keys of the command line.
slxsrv=$(slx_cmdline_get slxsrv "$cmdline")
slxbase=$(slx_cmdline_get slxbase "$cmdline")
slxprot=$(slx_cmdline_get slxprot "$cmdline") || slxprot=http
if [ -n "$slxsrv" ]; then
    urls=""
    fetched=""
    for srv in ${slxsrv//,/ }; do
        url="$slxprot://$srv/${slxbase#/}"
        url="${url%/}/config"
        urls="$urls $url"
        if slx_http_get "$url" > "$STATE/config.fetched" 2> "$STATE/http.log"; then
            fetched=$url
            break
        fi
    done
    [ -n "$fetched" ] || stop_boot "$(slx_fail_line "could not fetch the configuration (tried${urls}: $(last_line "$STATE/http.log"))")"
    slx_parse_config < "$STATE/config.fetched"
fi
slx_apply_cmdline "$cmdline"

image=$SLX_DNBD3_IMAGE
rid=${SLX_DNBD3_RID:-0}
identifier=${SLX_SYSTEM_PARTITION_IDENTIFIER:-SLX_SYS}
[ -n "$image" ] || stop_boot "$(slx_fail_line "SLX_DNBD3_IMAGE is not set (config ${fetched:-none}, kernel command line)")"
case $rid in '' | *[!0-9]*) stop_boot "$(slx_fail_line "SLX_DNBD3_RID '$rid' is not a number")" ;; esac
for key in SLX_DNBD3_SERVERS SLX_DNBD3_IMAGE SLX_DNBD3_RID SLX_SYSTEM_PARTITION_IDENTIFIER; do
    printf "%s='%s'\n" "$key" "${!key}"
done > "$STATE/config"

# /dev/dnbd0 from the first server that has this revision.
modprobe dnbd3 || stop_boot "$(slx_fail_line "the dnbd3 kernel module did not load")"
server=$(slx_pick_server "$image" "$rid" "$SLX_DNBD3_SERVERS") || stop_boot "$server"
if ! dnbd3-client -h "$(slx_server_order "$server" "$SLX_DNBD3_SERVERS")" -i "$image" -r "$rid" -d /dev/dnbd0 \
    > "$STATE/dnbd3-client.log" 2>&1; then
    stop_boot "$(slx_fail_line "dnbd3-client could not attach $image:$rid from $server: $(last_line "$STATE/dnbd3-client.log")")"
fi
info "dnbd3-rootfs: $image revision $rid attached as /dev/dnbd0 from $server"

# xloop: the qcow2 as a block device with its partitions.
{ modprobe xloop && modprobe xloop_file_fmt_qcow; } || stop_boot "$(slx_fail_line "the xloop kernel modules did not load")"
if ! loopdev=$(xlosetup -f --show -P -r -t QCOW /dev/dnbd0 2> "$STATE/xlosetup.log"); then
    why=$(last_line "$STATE/xlosetup.log")
    kernel=$(dmesg | grep -i xloop | tail -n 1 | sed 's/^\[[^]]*\] *//')
    stop_boot "$(slx_fail_line "xloop refused /dev/dnbd0: ${why:-no reason given}${kernel:+ (kernel: $kernel)}")"
fi
udevadm settle --timeout=30
for _ in $(seq 1 50); do
    [ -n "$(slx_partitions "$loopdev")" ] && break
    sleep 0.2
done
part=$(slx_pick_partition "$loopdev" "$identifier") || stop_boot "$part"

# The writable layer (stage4-writable.sh): on the local partition SLX_WRITABLE_DEVICE_IDENTIFIER, else in RAM.
layer=$(SLX_WRITABLE_LOG="$STATE/dmsetup.log" slx_writable_layer "$part" "$image" "$rid") || stop_boot "$layer"
printf '%s\n' "$layer" > /dev/console
udevadm settle --timeout=30
info "dnbd3-rootfs: /dev/mapper/root over $part ($loopdev over /dev/dnbd0)"
exit 0
