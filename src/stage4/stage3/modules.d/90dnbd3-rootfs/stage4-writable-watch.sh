#!/bin/sh
# dnbd3-rootfs, run in stage 4 by the runtime unit stage4-writable-watch.service that stage 3 leaves in
# /run: warns before the writable layer is full, where writes to / start to fail with I/O errors. Every
# STAGE4_WATCH_INTERVAL seconds (rd.stage4.watch_interval, default 5) it reads `dmsetup status` of the
# layer's devices: the thin pool stage4-pool (data and metadata) and every dm snapshot of
# /run/openslx/dmsetup.state (the RAM layer's root, a table's snapshot lines). When one gets to 80 % and
# to 95 % full it prints one line on the console and into the journal (through /dev/kmsg), once per
# crossing: again only after it went below the mark. The functions up to slx_watch_check are pure and
# tested on the host by tests/test_stage3_writable.py.

SLX_WATCH_MARKS="80 95"
# (POSIX sh has no local variables: the functions' own start with w_.)

# The usage of a device by its `dmsetup status` line STATUS ("0 <sectors> <target> <args>"), as
# "<percent> <used bytes> <total bytes> <part>" for the fuller part ("snapshot COW", "thin-pool data" or
# "thin-pool metadata"); "failed <target> <word>" when the target says it failed or overflowed; nothing
# when there is nothing to measure (another target, a zero total, a status it does not know).
slx_usage() {
    # shellcheck disable=SC2086  # the status words, split on purpose
    set -- $1
    [ $# -ge 4 ] || return 0
    w_sectors=$2 w_target=$3
    shift 3
    case $w_target in
        snapshot)
            case $1 in
                # Invalid: full (our N and P stores) or failed; Overflow: full, a PO/NO store
                Invalid | Overflow) echo "failed snapshot $1" ;;
                */*) _slx_usage_of "$1" 512 "snapshot COW" ;;
            esac
            ;;
        thin-pool)
            case $1 in
                Fail | Error) echo "failed thin-pool $1" ;;
                *)
                    [ $# -ge 3 ] || return 0
                    # The status has no block size: the pool's length over its number of data blocks
                    # (the data device is whole blocks). Metadata blocks are 4 KiB.
                    w_blocks=${3#*/}
                    [ "$w_blocks" -gt 0 ] 2> /dev/null || return 0
                    w_block=$((w_sectors / w_blocks))
                    w_data=$(_slx_usage_of "$3" $((w_block * 512)) "thin-pool data")
                    w_meta=$(_slx_usage_of "$2" 4096 "thin-pool metadata")
                    if [ -n "$w_meta" ] && [ "${w_meta%% *}" -gt "${w_data%% *}" ]; then
                        echo "$w_meta"
                    else
                        echo "$w_data"
                    fi
                    ;;
            esac
            ;;
    esac
}

# USED/TOTAL (units of UNIT bytes) as "<percent> <used bytes> <total bytes> PART"; nothing if TOTAL is 0.
_slx_usage_of() {
    w_used=${1%/*} w_total=${1#*/}
    case $w_used in '' | *[!0-9]*) return 0 ;; esac
    case $w_total in '' | *[!0-9]*) return 0 ;; esac
    [ "$w_total" -gt 0 ] || return 0
    echo "$((w_used * 100 / w_total)) $((w_used * $2)) $((w_total * $2)) $3"
}

# One round for device NAME: LEVEL is the mark it was at (0, a mark of SLX_WATCH_MARKS, or "failed"),
# STATUS its `dmsetup status` line, FAILS what fails at 100 % ("/", "/ and /dev/mapper/tank"). Prints a
# /dev/kmsg line for every mark crossed upwards since and sets SLX_WATCH_LEVEL to the mark it is at now
# (below a mark again, it warns again at the next crossing). <3> and <2>: above the console level of a
# `quiet` boot and of Debian's kernel.printk = 4 (procps), so the lines reach the console too.
slx_watch_check() {
    w_name=$1 SLX_WATCH_LEVEL=$2 w_fails=$4
    w_usage=$(slx_usage "$3")
    case $w_usage in
        '') return 0 ;;
        failed*)
            [ "$SLX_WATCH_LEVEL" = failed ] \
                || echo "<2>stage4-writable: the writable layer /dev/mapper/$w_name is full or failed (${w_usage#failed }): writes to $w_fails fail"
            SLX_WATCH_LEVEL=failed
            return 0
            ;;
    esac
    # shellcheck disable=SC2086  # the numbers of slx_usage
    set -- $w_usage
    w_part=${w_usage#* * * }
    [ "$SLX_WATCH_LEVEL" = failed ] && SLX_WATCH_LEVEL=0  # a pool that works again
    w_level=0
    for w_mark in $SLX_WATCH_MARKS; do
        [ "$1" -ge "$w_mark" ] || continue
        w_level=$w_mark
        [ "$SLX_WATCH_LEVEL" -ge "$w_mark" ] && continue
        w_prefix="<3>"
        [ "$w_mark" -ge 95 ] && w_prefix="<2>"
        echo "${w_prefix}stage4-writable: warning: the writable layer /dev/mapper/$w_name ($w_part) is $1 % full, over $w_mark %: $2 of $3 bytes used; at 100 % writes to $w_fails fail"
    done
    SLX_WATCH_LEVEL=$w_level
}

# Sourced by the host tests for the functions above: no loop.
[ -n "${STAGE4_WATCH_FUNCTIONS_ONLY:-}" ] && return 0

kmsg=${STAGE4_KMSG:-/dev/kmsg}  # (a file in the host tests)

if ! command -v dmsetup > /dev/null; then
    echo "<3>stage4-writable: no dmsetup in this system (package dmsetup or device-mapper): the writable layer is not watched, no warning before it is full" > "$kmsg"
    exit 0
fi
interval=${STAGE4_WATCH_INTERVAL:-5}
[ "$interval" -gt 0 ] 2> /dev/null || interval=5

# The watched devices, "<name> <what fails at 100 %>": the snapshots of the layer, then the pool with
# the mount points (or device names) of its thin volumes.
devices=""
in_pool=""
while read -r dev mountpoint _; do
    name=${dev#/dev/mapper/}
    shown=$dev
    [ "$mountpoint" = "*" ] || shown=$mountpoint
    case $(dmsetup table "$name" 2> /dev/null) in
        *" snapshot "*) devices="$devices$name $shown
" ;;
        *" thin "*) in_pool="${in_pool:+$in_pool and }$shown" ;;
    esac
done < /run/openslx/dmsetup.state
[ -n "$in_pool" ] && devices="${devices}stage4-pool $in_pool
"
if [ -z "$devices" ]; then
    echo "<3>stage4-writable: no snapshot or thin pool in /run/openslx/dmsetup.state: the writable layer is not watched" > "$kmsg"
    exit 0
fi

levels=""  # "<name>=<level> ...", of the last round
while :; do
    next=""
    while read -r name what_fails; do
        [ -n "$name" ] || continue
        previous=0
        for pair in $levels; do
            [ "${pair%=*}" = "$name" ] && previous=${pair##*=}
        done
        slx_watch_check "$name" "$previous" "$(dmsetup status "$name" 2> /dev/null)" "$what_fails" \
            > "$kmsg"
        next="$next $name=$SLX_WATCH_LEVEL"
    done << EOF
$devices
EOF
    levels=$next
    sleep "$interval"
done
