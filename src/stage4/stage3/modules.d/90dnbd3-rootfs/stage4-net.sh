#!/bin/bash
# stage4 stage 3: the network part of the dnbd3-rootfs module (boot interface, DHCP, the static ip=
# fallback, downloads from the slxsrv servers) as small functions, sourceable on any host after
# stage4-lib.sh (the tests run them against fixture inputs and HTTP servers on 127.0.0.1).
#
# Settings (kernel arguments rd.stage4.*, read by dnbd3root): STAGE4_DHCP_TIMEOUT (seconds of DHCP,
# default 60), STAGE4_FETCH_ROUNDS (rounds over the servers, default 4), STAGE4_FETCH_WAIT (seconds
# between rounds, default 5), STAGE4_HTTP_TIMEOUT (seconds per download, default 20).

# The MAC address in BOOTIF (iPXE's and pxelinux's 01-aa-bb-cc-dd-ee-ff, or aa:bb:cc:dd:ee:ff), in
# lower case with colons; status 1 if it is none.
slx_bootif_mac() {
    local mac=${1,,}
    mac=${mac//-/:}
    case $mac in 01:??:??:??:??:??:??) mac=${mac#01:} ;; esac
    [[ $mac =~ ^[0-9a-f]{2}(:[0-9a-f]{2}){5}$ ]] || return 1
    printf '%s\n' "$mac"
}

# The interface whose address is MAC (lower case) in NETDIR (default /sys/class/net), or status 1.
slx_iface_by_mac() {
    local mac=$1 dir=${2:-/sys/class/net} dev address
    for dev in "$dir"/*; do
        [ -r "$dev/address" ] || continue
        read -r address < "$dev/address"
        if [ "${address,,}" = "$mac" ] && [ "${dev##*/}" != lo ]; then
            printf '%s\n' "${dev##*/}"
            return 0
        fi
    done
    return 1
}

# A netmask (255.255.255.0) or a prefix length (24) as a prefix length; status 1 if it is neither.
slx_prefix_len() {
    local mask=$1 value=0 octet inverted bits=32
    case $mask in
        [0-9] | [12][0-9] | 3[0-2]) printf '%s\n' "$mask"; return 0 ;;
    esac
    [[ $mask =~ ^[0-9]{1,3}\.[0-9]{1,3}\.[0-9]{1,3}\.[0-9]{1,3}$ ]] || return 1
    for octet in ${mask//./ }; do
        octet=$((10#$octet))
        [ "$octet" -le 255 ] || return 1
        value=$((value * 256 + octet))
    done
    inverted=$((~value & 0xffffffff))
    [ $(((inverted + 1) & inverted)) = 0 ] || return 1  # the ones must be contiguous
    while [ "$inverted" != 0 ]; do
        inverted=$((inverted >> 1))
        bits=$((bits - 1))
    done
    printf '%s\n' "$bits"
}

_slx_ipv4() {
    [[ $1 =~ ^[0-9]{1,3}\.[0-9]{1,3}\.[0-9]{1,3}\.[0-9]{1,3}$ ]]
}

# The static form of ip= (kernel and dracut: <client>:<server>:<gateway>:<netmask>:<host>:<device>:none)
# as "ADDRESS/PREFIX GATEWAY DEVICE", - for an empty gateway or device. Status 1 for any other form
# (ip=dhcp and the like: DHCP is what stage 3 does anyway), with the reason on stderr.
slx_parse_ip_arg() {
    local client _server gateway netmask _host device autoconf
    IFS=: read -r client _server gateway netmask _host device autoconf _ <<< "$1"
    case $autoconf in '' | none | off) ;; *) printf 'ip=%s: not a static address\n' "$1" >&2; return 1 ;; esac
    _slx_ipv4 "$client" || { printf 'ip=%s: no IPv4 client address\n' "$1" >&2; return 1; }
    if [ -n "$gateway" ] && ! _slx_ipv4 "$gateway"; then
        printf 'ip=%s: the gateway is not an IPv4 address\n' "$1" >&2
        return 1
    fi
    local prefix=24
    if [ -n "$netmask" ] && ! prefix=$(slx_prefix_len "$netmask"); then
        printf 'ip=%s: bad netmask %s\n' "$1" "$netmask" >&2
        return 1
    fi
    printf '%s/%s %s %s\n' "$client" "$prefix" "${gateway:--}" "${device:--}"
}

# Set the static ip= ARG (see slx_parse_ip_arg) on its device, else on DEFAULT: link up, the address, the
# default route. Prints the device, then the [Network] lines for systemd-networkd; status 1 with the
# reason on stderr.
slx_static_ip() {
    local parsed address gateway dev why
    parsed=$(slx_parse_ip_arg "$1") || return 1
    read -r address gateway dev <<< "$parsed"
    [ "$dev" != - ] || dev=$2
    if [ ! -e "/sys/class/net/$dev" ]; then
        printf 'ip=%s: no network interface %s\n' "$1" "$dev" >&2
        return 1
    fi
    if ! why=$({ ip link set "$dev" up && ip addr add "$address" dev "$dev"; } 2>&1); then
        printf 'ip=%s: could not set %s on %s: %s\n' "$1" "$address" "$dev" "${why##*$'\n'}" >&2
        return 1
    fi
    printf '%s\nAddress=%s\n' "$dev" "$address"
    [ "$gateway" != - ] || return 0
    if ! why=$(ip route replace default via "$gateway" dev "$dev" 2>&1); then
        printf 'ip=%s: could not route via %s: %s\n' "$1" "$gateway" "${why##*$'\n'}" >&2
        return 1
    fi
    printf 'Gateway=%s\n' "$gateway"
}

# DHCP on the interfaces given until one gets a lease: rounds of udhcpc with growing waits, the links
# cycled between rounds, until STAGE4_DHCP_TIMEOUT seconds (default 60) have passed. Prints the
# interface; udhcpc's output goes to stderr.
slx_dhcp() {
    local total=${STAGE4_DHCP_TIMEOUT:-60} start=$SECONDS round=0 wait dev
    while :; do
        wait=$((2 + round))
        [ "$wait" -le 8 ] || wait=8
        for dev in "$@"; do
            ip link set "$dev" up
            if busybox udhcpc -f -q -n -t 3 -T "$wait" -i "$dev" -s "${STAGE4_UDHCPC_SCRIPT:-/lib/stage4-udhcpc.sh}" >&2
            then
                printf '%s\n' "$dev"
                return 0
            fi
        done
        round=$((round + 1))
        [ $((SECONDS - start)) -lt "$total" ] || return 1
        for dev in "$@"; do ip link set "$dev" down; done
        sleep 1
    done
}

# The URLs of FILE below BASE on every server of SERVERS (slxsrv: comma- or space-separated HOST,
# HOST:PORT, [IPv6], [IPv6]:PORT; a bare IPv6 address is put in brackets), one a line.
slx_server_urls() {
    local prot=$1 servers=$2 base=$3 file=$4 srv
    base=${base#/}
    base=${base%/}
    for srv in ${servers//,/ }; do
        case $srv in
            \[*) ;;
            *:*:*) srv="[$srv]" ;;
        esac
        printf '%s://%s/%s%s\n' "$prot" "$srv" "${base:+$base/}" "$file"
    done
}

# The arguments in a random order (bash's RANDOM), one a line.
slx_shuffle() {
    local -a items=("$@")
    local i j swap
    for ((i = ${#items[@]} - 1; i > 0; i--)); do
        j=$((RANDOM % (i + 1)))
        swap=${items[i]}
        items[i]=${items[j]}
        items[j]=$swap
    done
    [ "${#items[@]}" = 0 ] || printf '%s\n' "${items[@]}"
}

# Download the same file from one of URLS into OUT: STAGE4_FETCH_ROUNDS rounds (default 4), each over
# all URLs in a new random order, STAGE4_FETCH_WAIT seconds (default 5) between rounds. Every try is
# one line "URL: ok" or "URL: <why not>" on stderr; status 1 if every try failed.
slx_fetch_any() {
    local out=$1 round url why
    shift
    for ((round = 1; round <= ${STAGE4_FETCH_ROUNDS:-4}; round++)); do
        [ "$round" = 1 ] || sleep "${STAGE4_FETCH_WAIT:-5}"
        while IFS= read -r url; do
            [ -n "$url" ] || continue
            if why=$(slx_http_get "$url" 2>&1 > "$out.part"); then
                mv -f "$out.part" "$out"
                printf '%s: ok\n' "$url" >&2
                return 0
            fi
            printf '%s: %s\n' "$url" "$(printf '%s\n' "${why:-failed}" | tail -n 1)" >&2
        done <<< "$(slx_shuffle "$@")"
    done
    rm -f "$out.part"
    return 1
}
