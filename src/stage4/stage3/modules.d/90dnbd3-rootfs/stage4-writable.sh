#!/bin/bash
# dnbd3-rootfs: the writable layer under /dev/mapper/root (sourced by dnbd3root.sh; the functions up to
# slx_writable_plan are pure and tested on the host by tests/test_stage3_writable.py).
#
# A local partition whose GPT name is SLX_WRITABLE_DEVICE_IDENTIFIER, if one appears within
# SLX_WRITABLE_DEVICE_IDENTIFIER_TIMEOUT_IN_SECONDS, is laid out by SLX_WRITABLE_DEVICE_PARTITION_TABLE
# (lines "<type> <name> <size> [<crypt>]", or separated by ';', default "thin-snapshot root 100%"):
#   [0, 1 MiB)        the stage4 record: which revision a persistent layer belongs to
#   [1 MiB, +meta)    thin-pool metadata (only when a thin-* line exists): 1/1024 of the rest, 4 MiB..16 GiB
#   then every line in order gets its size (N K|M|G|T, or N % of what follows the metadata), rounded down
#   to 1 MiB; a line that asks for more than is left gets the rest (first come, first served).
# thin-snapshot: a thin volume whose external origin is the read-only root partition; its size is its
#   slice or the origin's, whichever is larger (stage 4 grows the file system into it).
# thin-volume: an empty thin volume.  snapshot: dm-snapshot of the root partition, its COW on the slice.
# linear: the slice itself.  Thin slices together are the pool's data device.  Every device is
# /dev/mapper/<name>; the one named root is the root. Without such a partition: a dm snapshot in RAM
# (zram). /run/openslx/dmsetup.state lists the devices ("<dev> <mountpoint|*> type=1").

SLX_ALIGN=2048       # sectors: 1 MiB
SLX_THIN_CHUNK=128   # sectors: 64 KiB pool blocks
SLX_RECORD=stage4-writable-v1
SLX_DEFAULT_TABLE='thin-snapshot root 100%'

# The sectors of SIZE ("N" + K/M/G/T, or "N%" of USABLE sectors), rounded down to 1 MiB; status 1 if SIZE
# is no such size.
slx_size_sectors() {
    local size=$1 usable=$2 n sectors
    if [[ $size =~ ^([0-9]{1,3})%$ ]]; then
        n=$((10#${BASH_REMATCH[1]}))
        ((n >= 1 && n <= 100)) || return 1
        sectors=$((usable * n / 100))
    elif [[ $size =~ ^([0-9]{1,9})([KMGTkmgt])$ ]]; then
        n=$((10#${BASH_REMATCH[1]}))
        case ${BASH_REMATCH[2]} in
            [Kk]) sectors=$((n * 2)) ;;
            [Mm]) sectors=$((n * 2048)) ;;
            [Gg]) sectors=$((n * 2097152)) ;;
            *) sectors=$((n * 2147483648)) ;;
        esac
    else
        return 1
    fi
    printf '%s\n' $((sectors / SLX_ALIGN * SLX_ALIGN))
}

# The lines of a partition table, checked: "<type> <name> <size>" each, or one "stage4: ..." line naming
# the first bad line and status 1.
slx_writable_lines() {
    local table=$1 line type name size crypt extra names=" " root="" out=""
    local what="SLX_WRITABLE_DEVICE_PARTITION_TABLE"
    table=${table//;/$'\n'}
    while IFS= read -r line; do
        line=${line%%#*}
        read -r type name size crypt extra <<< "$line"
        [ -n "$type" ] || continue
        if [ -z "$size" ] || [ -n "$extra" ]; then
            slx_fail_line "$what line '$line': not '<type> <name> <size> [<crypt>]'"
            return 1
        fi
        case $type in
            thin-snapshot | thin-volume | snapshot | linear) ;;
            *)
                slx_fail_line "$what line '$line': type '$type' is not thin-snapshot, thin-volume, snapshot or linear"
                return 1
                ;;
        esac
        if ! [[ $name =~ ^[A-Za-z0-9_][A-Za-z0-9_.-]{0,63}$ ]] || [[ $name == stage4-* ]]; then
            slx_fail_line "$what line '$line': name '$name' is not letters, digits, '_', '.', '-' (or starts with stage4-)"
            return 1
        fi
        if [[ $names == *" $name "* ]]; then
            slx_fail_line "$what line '$line': name '$name' is used twice"
            return 1
        fi
        names="$names$name "
        if ! slx_size_sectors "$size" 0 > /dev/null; then
            slx_fail_line "$what line '$line': size '$size' is not N followed by K, M, G or T, nor 1-100%"
            return 1
        fi
        if [[ $size != *% ]] && [ "$(slx_size_sectors "$size" 0)" = 0 ]; then
            slx_fail_line "$what line '$line': size '$size' is less than 1 MiB"
            return 1
        fi
        case $crypt in
            '' | 0 | no) ;;
            *)
                slx_fail_line "$what line '$line': encryption ('$crypt') is not supported"
                return 1
                ;;
        esac
        if [ "$name" = root ]; then
            case $type in
                thin-snapshot | snapshot) root=$type ;;
                *)
                    slx_fail_line "$what line '$line': root must be a thin-snapshot or a snapshot"
                    return 1
                    ;;
            esac
        fi
        out="$out$type $name $size"$'\n'
    done <<< "${table:-$SLX_DEFAULT_TABLE}"  # lines may also be separated by ';' (a one-line config value)
    if [ -z "$root" ]; then
        slx_fail_line "$what has no thin-snapshot or snapshot named root"
        return 1
    fi
    printf '%s' "$out"
}

# The layout of a writable partition of SECTORS sectors: "meta <start> <sectors>" (with thin lines),
# then "<type> <name> <start> <sectors>" per line; or one "stage4: ..." line and status 1.
slx_writable_plan() {
    local table=$1 total=$2 lines type name size meta=0 cursor usable want out=""
    lines=$(slx_writable_lines "$table") || { printf '%s\n' "$lines"; return 1; }
    if grep -q '^thin-' <<< "$lines"; then
        meta=$(((total - SLX_ALIGN) / 1024 / SLX_ALIGN * SLX_ALIGN + SLX_ALIGN))
        ((meta < 4 * SLX_ALIGN)) && meta=$((4 * SLX_ALIGN))
        ((meta > 16 * 1024 * SLX_ALIGN)) && meta=$((16 * 1024 * SLX_ALIGN))
    fi
    cursor=$((SLX_ALIGN + meta))
    usable=$((total / SLX_ALIGN * SLX_ALIGN - cursor))
    if ((usable < SLX_ALIGN)); then
        slx_fail_line "the writable partition ($((total / 2048)) MiB) is too small for the layer"
        return 1
    fi
    ((meta > 0)) && out="meta $SLX_ALIGN $meta"$'\n'
    while read -r type name size; do
        want=$(slx_size_sectors "$size" "$usable")
        ((want > usable - (cursor - SLX_ALIGN - meta))) && want=$((usable - (cursor - SLX_ALIGN - meta)))
        if ((want < SLX_ALIGN)); then
            slx_fail_line "SLX_WRITABLE_DEVICE_PARTITION_TABLE line '$type $name $size': no space left (the lines before it took $(((cursor - SLX_ALIGN - meta) / 2048)) of $((usable / 2048)) MiB)"
            return 1
        fi
        out="$out$type $name $cursor $want"$'\n'
        cursor=$((cursor + want))
    done <<< "$lines"
    printf '%s' "$out"
}

# The partition of a local disk whose GPT name is IDENTIFIER, waited for up to TIMEOUT seconds; status 1
# if none.
slx_writable_find() {
    local identifier=$1 timeout=$2 tries part name
    tries=$((timeout * 2))
    while :; do
        for part in /sys/class/block/*; do
            name=${part##*/}
            [ -e "$part/partition" ] || continue
            case $name in xloop* | loop* | dnbd* | zram* | dm-*) continue ;; esac
            if [ "$(blkid -p -o value -s PART_ENTRY_NAME "/dev/$name" 2> /dev/null)" = "$identifier" ]; then
                printf '/dev/%s\n' "$name"
                return 0
            fi
        done
        ((tries-- > 0)) || return 1
        sleep 0.5
    done
}

_slx_dm() {
    local name=$1
    shift
    printf '%s\n' "$@" | dmsetup create "$name" >> "$SLX_WRITABLE_LOG" 2>&1 \
        || { slx_fail_line "device-mapper refused $name: $(tail -n 1 "$SLX_WRITABLE_LOG")"; return 1; }
}

_slx_zero() {
    dd if=/dev/zero of="$1" bs=4096 count=1 conv=notrunc,fsync status=none 2>> "$SLX_WRITABLE_LOG"
}

# Lay out PART by PLAN over ORIGIN (the root partition); RECORD: what a persistent layer is tagged with
# ("" = not persistent). Prints the console words "<kind> <bytes> <fresh|kept>" or a "stage4: ..." line.
slx_writable_disk() {
    local part=$1 origin=$2 plan=$3 record=$4 found="" state=fresh
    local origin_sectors type name start sectors id=0 data="" offset=0 kind="" size=0 virt
    origin_sectors=$(cat "/sys/class/block/${origin#/dev/}/size")
    found=$(head -c 512 "$part" | tr -d '\0')
    if [ -n "$record" ] && [ "$found" = "$record" ]; then
        state=kept
    else
        if [ -n "$record" ] && [[ $found == "$SLX_RECORD "* ]]; then
            printf 'stage4-writable: %s held another layer (%s): starting a fresh one\n' \
                "$part" "${found#"$SLX_RECORD "}" > /dev/console
        fi
        { printf '%s' "$record"; head -c $((4096 - ${#record})) /dev/zero; } \
            | dd of="$part" bs=4096 count=1 iflag=fullblock conv=notrunc,fsync status=none 2>> "$SLX_WRITABLE_LOG"
    fi
    mkdir -p /run/openslx
    : > /run/openslx/dmsetup.state
    while read -r type name start sectors; do
        case $type in
            meta)
                _slx_dm stage4-meta "0 $start linear $part $name" || return 1
                [ $state = kept ] || _slx_zero /dev/mapper/stage4-meta
                ;;
            thin-*)
                data="${data:+$data$'\n'}$offset $sectors linear $part $start"
                offset=$((offset + sectors))
                ;;
        esac
    done <<< "$plan"
    if [ -n "$data" ]; then
        _slx_dm stage4-data "$data" || return 1
        _slx_dm stage4-pool "0 $offset thin-pool /dev/mapper/stage4-meta /dev/mapper/stage4-data $SLX_THIN_CHUNK 0" \
            || return 1
    fi
    while read -r type name start sectors; do
        virt=$sectors
        case $type in
            thin-*)
                id=$((id + 1))
                if [ $state = fresh ]; then
                    dmsetup message stage4-pool 0 "create_thin $id" >> "$SLX_WRITABLE_LOG" 2>&1 \
                        || { slx_fail_line "the thin pool on $part refused volume $id: $(tail -n 1 "$SLX_WRITABLE_LOG")"; return 1; }
                fi
                if [ "$type" = thin-snapshot ]; then
                    # never smaller than the origin; whole pool blocks (the end past the origin reads zeros)
                    ((virt < origin_sectors)) && virt=$(((origin_sectors + SLX_THIN_CHUNK - 1) / SLX_THIN_CHUNK * SLX_THIN_CHUNK))
                    _slx_dm "$name" "0 $virt thin /dev/mapper/stage4-pool $id $origin" || return 1
                else
                    _slx_dm "$name" "0 $virt thin /dev/mapper/stage4-pool $id" || return 1
                fi
                ;;
            snapshot)
                _slx_dm "stage4-cow-$name" "0 $sectors linear $part $start" || return 1
                virt=$origin_sectors
                if [ -n "$record" ]; then
                    [ $state = kept ] || _slx_zero "/dev/mapper/stage4-cow-$name"
                    _slx_dm "$name" "0 $virt snapshot $origin /dev/mapper/stage4-cow-$name P 8" || return 1
                else
                    _slx_dm "$name" "0 $virt snapshot $origin /dev/mapper/stage4-cow-$name N 8" || return 1
                fi
                ;;
            linear) _slx_dm "$name" "0 $sectors linear $part $start" || return 1 ;;
            *) continue ;;
        esac
        if [ "$name" = root ]; then
            kind=$type
            size=$((virt * 512))
            printf '/dev/mapper/root / type=1\n' >> /run/openslx/dmsetup.state
        else
            printf '/dev/mapper/%s * type=1\n' "$name" >> /run/openslx/dmsetup.state
        fi
    done <<< "$plan"
    printf '%s %s %s\n' "$kind" "$size" "$state"
}

# The RAM layer: a non-persistent dm snapshot of ORIGIN whose changes live in zram (sized as the RAM).
# Prints the size of the RAM disk in bytes, or a "stage4: ..." line.
slx_writable_ram() {
    local origin=$1 mem_kb=0 key value sectors
    { modprobe zram num_devices=1 && modprobe dm-snapshot; } \
        || { slx_fail_line "the zram or dm-snapshot kernel module did not load"; return 1; }
    while read -r key value _; do
        [ "$key" = MemTotal: ] && mem_kb=$value
    done < /proc/meminfo
    echo $((mem_kb * 1024)) > /sys/block/zram0/disksize \
        || { slx_fail_line "could not size the RAM disk /dev/zram0 for the writable layer"; return 1; }
    sectors=$(cat "/sys/class/block/${origin#/dev/}/size")
    _slx_dm root "0 $sectors snapshot $origin /dev/zram0 N 8" || return 1
    mkdir -p /run/openslx
    printf '/dev/mapper/root / type=1\n' > /run/openslx/dmsetup.state
    printf '%s\n' $((mem_kb * 1024))
}

# Stage 4 gets two runtime units (in /run, which switch_root carries over): one grows / when it is
# larger than the file system and prints what the layer is (stage4-writable-stage4.sh), the other warns
# before the layer is full (stage4-writable-watch.sh, every STAGE4_WATCH_INTERVAL seconds).
_slx_writable_unit() {
    mkdir -p /run/systemd/system/multi-user.target.wants
    cp /lib/stage4-writable-stage4.sh /run/openslx/writable-stage4.sh
    cp /lib/stage4-writable-watch.sh /run/openslx/writable-watch.sh
    cat > /run/systemd/system/stage4-writable.service << 'EOF'
[Unit]
Description=stage4: grow / into the writable layer and report it
DefaultDependencies=no
ConditionPathExists=!/etc/initrd-release
After=systemd-remount-fs.service
Before=multi-user.target stage4-marker.service shutdown.target
Conflicts=shutdown.target

[Service]
Type=oneshot
RemainAfterExit=yes
ExecStart=/bin/sh /run/openslx/writable-stage4.sh
EOF
    cat > /run/systemd/system/stage4-writable-watch.service << EOF
[Unit]
Description=stage4: warn before the writable layer is full
DefaultDependencies=no
ConditionPathExists=!/etc/initrd-release
After=stage4-writable.service
Before=shutdown.target
Conflicts=shutdown.target

[Service]
Environment=STAGE4_WATCH_INTERVAL=${STAGE4_WATCH_INTERVAL:-5}
ExecStart=/bin/sh /run/openslx/writable-watch.sh
EOF
    ln -sf ../stage4-writable.service /run/systemd/system/multi-user.target.wants/stage4-writable.service
    ln -sf ../stage4-writable-watch.service \
        /run/systemd/system/multi-user.target.wants/stage4-writable-watch.service
}

# /dev/mapper/root over ORIGIN for revision IMAGE:RID, on the local partition if there is one, else in
# RAM. Prints the one console line saying which, or a "stage4: ..." line and status 1.
slx_writable_layer() {
    local origin=$1 image=$2 rid=$3 identifier=${SLX_WRITABLE_DEVICE_IDENTIFIER:-}
    local timeout=${SLX_WRITABLE_DEVICE_IDENTIFIER_TIMEOUT_IN_SECONDS:-10} part plan record="" words
    local kind size state why
    SLX_WRITABLE_LOG=${SLX_WRITABLE_LOG:-/run/stage4/writable.log}
    plan=$(slx_writable_lines "${SLX_WRITABLE_DEVICE_PARTITION_TABLE:-}") || { printf '%s\n' "$plan"; return 1; }
    [[ $timeout =~ ^[0-9]{1,4}$ ]] \
        || { slx_fail_line "SLX_WRITABLE_DEVICE_IDENTIFIER_TIMEOUT_IN_SECONDS '$timeout' is not a number"; return 1; }
    case ${SLX_WRITABLE_DEVICE_PERSISTENT:-no} in
        yes | 1 | true) record="$SLX_RECORD image=$image rid=$rid" ;;
    esac
    why="no SLX_WRITABLE_DEVICE_IDENTIFIER set"
    if [ -n "$identifier" ]; then
        why="no partition named $identifier within $timeout s"
        if part=$(slx_writable_find "$identifier" "$timeout"); then
            for module in dm-thin-pool dm-snapshot; do
                modprobe "$module" || { slx_fail_line "the $module kernel module did not load"; return 1; }
            done
            plan=$(slx_writable_plan "${SLX_WRITABLE_DEVICE_PARTITION_TABLE:-}" \
                "$(cat "/sys/class/block/${part#/dev/}/size")") || { printf '%s\n' "$plan"; return 1; }
            record="${record:+$record table=$(cksum <<< "$plan" | cut -d' ' -f1)}"
            words=$(slx_writable_disk "$part" "$origin" "$plan" "$record") || { printf '%s\n' "$words"; return 1; }
            read -r kind size state <<< "$words"
            printf 'layer=disk device=%s kind=%s size=%s state=%s\n' "$part" "$kind" "$size" "$state" \
                > /run/openslx/writable
            _slx_writable_unit
            printf 'stage4-writable: /dev/mapper/root = %s of %s on %s (%s bytes, %s%s)\n' "$kind" "$origin" \
                "$part" "$size" "$state" "${record:+, persistent}"
            return 0
        fi
    fi
    size=$(slx_writable_ram "$origin") || { printf '%s\n' "$size"; return 1; }
    printf 'layer=ram device=/dev/zram0 kind=snapshot size=%s state=fresh\n' "$size" > /run/openslx/writable
    _slx_writable_unit
    printf 'stage4-writable: /dev/mapper/root = snapshot of %s in RAM (/dev/zram0, %s bytes): %s\n' \
        "$origin" "$size" "$why"
}
