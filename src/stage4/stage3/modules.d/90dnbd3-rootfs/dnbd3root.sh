#!/bin/bash
# dnbd3-rootfs: set up /dev/mapper/root for a Stage4 client (run once by dracut's initqueue, after udev
# settled). Every failure prints ONE line "stage4: ..." on the console and stops the boot: an emergency
# shell only with rd.shell on the command line, else a reboot after SLX_REBOOT_TIMEOUT seconds (60).
# What stage 4 gets from here (/opt/openslx/config, config.tgz) is put into the new root by the
# pre-pivot hook stage4-handover.
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
# shellcheck source-path=SCRIPTDIR source=stage4-net.sh  # installed as /lib/stage4-net.sh
. /lib/stage4-net.sh
# shellcheck source-path=SCRIPTDIR source=stage4-writable.sh  # installed as /lib/stage4-writable.sh
. /lib/stage4-writable.sh

PATH=/usr/sbin:/usr/bin:/sbin:/bin:/usr/local/sbin:/usr/local/bin
STATE=/run/stage4
mkdir -p "$STATE" /run/openslx

stop_boot() {
    slx_stop_boot "$1"
}

last_line() {
    grep -v '^[[:space:]]*$' "$1" | tail -n 1
}

cmdline=$(getcmdline)

# The module's own settings: rd.stage4.* kernel arguments (whole seconds / counts), never the config's.
setting() {
    local value
    value=$(slx_cmdline_get "rd.stage4.$1" "$cmdline") || return 0
    case $value in
        '' | *[!0-9]*) stop_boot "$(slx_fail_line "rd.stage4.$1=$value is not a whole number")" ;;
    esac
    printf -v "$2" '%s' "$value"
}
setting dhcp_timeout STAGE4_DHCP_TIMEOUT
setting fetch_rounds STAGE4_FETCH_ROUNDS
setting fetch_wait STAGE4_FETCH_WAIT
setting http_timeout STAGE4_HTTP_TIMEOUT
setting probe_timeout STAGE4_PROBE_TIMEOUT
setting watch_interval STAGE4_WATCH_INTERVAL  # stage 4's writable-layer watcher (stage4-writable.sh)
# SLX_* keys of the command line count from the start (SLX_REBOOT_TIMEOUT for a failure before the
# config is in); they are applied again after the config file, which they override.
slx_apply_cmdline "$cmdline"

# Network: the interface named by BOOTIF (its MAC), else every one; DHCP for STAGE4_DHCP_TIMEOUT
# seconds, else a static ip= of the command line.
interfaces=()
if bootif=$(slx_cmdline_get BOOTIF "$cmdline"); then
    mac=$(slx_bootif_mac "$bootif") || stop_boot "$(slx_fail_line "BOOTIF=$bootif is not 01-<MAC> or a MAC address")"
    dev=$(slx_iface_by_mac "$mac") || stop_boot "$(slx_fail_line "BOOTIF=$bootif: no network interface has the address $mac")"
    interfaces=("$dev")
else
    for dev in /sys/class/net/*; do
        [ "${dev##*/}" = lo ] || interfaces+=("${dev##*/}")
    done
fi
[ "${#interfaces[@]}" != 0 ] || stop_boot "$(slx_fail_line "no network interface")"
network="DHCP=ipv4"
if ! netif=$(slx_dhcp "${interfaces[@]}" 2> "$STATE/dhcp.log"); then
    static=$(slx_cmdline_get ip "$cmdline") \
        || stop_boot "$(slx_fail_line "no DHCP lease on ${interfaces[*]} within ${STAGE4_DHCP_TIMEOUT:-60} s and no ip= on the command line")"
    configured=$(slx_static_ip "$static" "${interfaces[0]}" 2> "$STATE/ip.log") \
        || stop_boot "$(slx_fail_line "no DHCP lease on ${interfaces[*]} within ${STAGE4_DHCP_TIMEOUT:-60} s; $(last_line "$STATE/ip.log")")"
    netif=${configured%%$'\n'*}
    network=${configured#*$'\n'}
fi
# The root file system comes over this interface: systemd-networkd in stage 4 (which /run is handed to)
# must keep its address and routes, else the root stalls and networkd with it. Sorted before the image's
# own .network files, so it is the one that matches this interface.
mkdir -p /run/systemd/network
printf '[Match]\nMACAddress=%s\n\n[Network]\n%s\nKeepConfiguration=yes\n' \
    "$(cat "/sys/class/net/$netif/address")" "$network" > /run/systemd/network/10-stage4-netroot.network

# Configuration: the file from the boot servers (any of slxsrv, in random order, for a few rounds), then
# SLX_* keys of the command line.
slxsrv=$(slx_cmdline_get slxsrv "$cmdline")
slxbase=$(slx_cmdline_get slxbase "$cmdline")
slxprot=$(slx_cmdline_get slxprot "$cmdline") || slxprot=http
fetch() {  # FILE OUT: FILE below slxbase from any of slxsrv, or the one line naming the last failure
    local urls
    mapfile -t urls <<< "$(slx_server_urls "$slxprot" "$slxsrv" "$slxbase" "$1")"
    slx_fetch_any "$2" "${urls[@]}" 2> "$STATE/http.log" \
        || stop_boot "$(slx_fail_line "could not fetch $1 from ${slxsrv} in ${STAGE4_FETCH_ROUNDS:-4} rounds (last: $(last_line "$STATE/http.log"))")"
}
if [ -n "$slxsrv" ]; then
    fetch config "$STATE/config.fetched"
    fetched=$(tail -n 1 "$STATE/http.log")
    fetched=${fetched%: ok}
    slx_parse_config < "$STATE/config.fetched"
fi
slx_apply_cmdline "$cmdline"

image=$SLX_DNBD3_IMAGE
rid=${SLX_DNBD3_RID:-0}
identifier=${SLX_SYSTEM_PARTITION_IDENTIFIER:-SLX_SYS}
[ -n "$image" ] || stop_boot "$(slx_fail_line "SLX_DNBD3_IMAGE is not set (config ${fetched:-none}, kernel command line)")"
why=$(slx_check_rid "$rid") || stop_boot "$why"
# For stage 4: /opt/openslx/config in the new root (the pre-pivot hook stage4-handover copies it).
slx_write_config > "$STATE/config"

# The site's config.tgz (SLX_CONFIG_NAME, below slxbase on the same servers), unpacked into the new root
# by stage4-handover; checked now, while a failure can still stop the boot cleanly.
if [ -n "${SLX_CONFIG_NAME:-}" ]; then
    case /$SLX_CONFIG_NAME/ in
        */../* | *//*) stop_boot "$(slx_fail_line "SLX_CONFIG_NAME '$SLX_CONFIG_NAME' is not a file name below slxbase")" ;;
    esac
    [ -n "$slxsrv" ] || stop_boot "$(slx_fail_line "SLX_CONFIG_NAME is set but there is no slxsrv= to fetch it from")"
    fetch "$SLX_CONFIG_NAME" "$STATE/config.tgz"
    why=$(slx_check_archive "$STATE/config.tgz" "$SLX_CONFIG_NAME") || stop_boot "$why"
fi

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
