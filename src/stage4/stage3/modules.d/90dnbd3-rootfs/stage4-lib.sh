#!/bin/bash
# stage4 stage 3: the logic of the dnbd3-rootfs dracut module as small functions, sourceable on any
# host (the tests run them against fixture inputs). Nothing here needs dracut.
#
# Contract (docs/client-boot.md): configuration from http://<slxsrv>/<slxbase>/config (shell
# KEY='value' lines), overridden by SLX_* keys on the kernel command line; the image
# SLX_DNBD3_IMAGE at SLX_DNBD3_RID from the first of SLX_DNBD3_SERVERS (HOST or HOST:PORT,
# space-separated, port 5003) that serves it, on /dev/dnbd0; xloop opens the qcow2 read-only with a
# partition scan; the root partition is the one whose GPT name, else whose filesystem label, is
# SLX_SYSTEM_PARTITION_IDENTIFIER.
#
# The module's own settings (STAGE4_*: timeouts, rounds, from rd.stage4.* kernel arguments) stay out of
# the SLX_ namespace, which belongs to the site's config.

STAGE4_DNBD3_PORT=5003
_slx_keys=""  # the SLX_* keys set by slx_parse_config and slx_apply_cmdline, in order

# One console line for the operator, with a fixed prefix (stage4 netboot reports it verbatim).
slx_fail_line() {
    printf 'stage4: %s\n' "$*"
}

# Stop the boot: the one line on the console, then the emergency shell (rd.shell) or, after
# SLX_REBOOT_TIMEOUT seconds (default 60), a reboot: a lab PC tries again instead of waiting for someone.
# Only in the initramfs (dracut's getargbool and emergency_shell).
slx_stop_boot() {
    printf '%s\n' "$1" > "${STAGE4_CONSOLE:-/dev/console}"
    if getargbool 0 rd.shell; then
        emergency_shell -n stage4 "$1"
    else
        local wait=${SLX_REBOOT_TIMEOUT:-60}
        case $wait in '' | *[!0-9]*) wait=60 ;; esac
        sleep "$wait"
        systemctl --no-block reboot 2> /dev/null || reboot -f
    fi
    exit 1
}

# Undo the quoting of one shell value: 'single' (with '\'' inside), "double" (with \" \\ \$ \`), or bare.
slx_unquote() {
    local value=$1 out="" rest
    while [ -n "$value" ]; do
        case $value in
            \'*)
                rest=${value#\'}
                case $rest in *\'*) ;; *) return 1 ;; esac
                out=$out${rest%%\'*}
                value=${rest#*\'}
                ;;
            \"*)
                rest=${value#\"}
                local part=""
                while :; do
                    case $rest in
                        '') return 1 ;;
                        \\[\"\\\$\`]*) part=$part${rest:1:1}; rest=${rest:2} ;;
                        \"*) rest=${rest#\"}; break ;;
                        *) part=$part${rest:0:1}; rest=${rest:1} ;;
                    esac
                done
                out=$out$part
                value=$rest
                ;;
            [[:space:]]*|\#*)
                break
                ;;
            \\?*)
                out=$out${value:1:1}
                value=${value:2}
                ;;
            *)
                rest=${value%%[\\\'\"[:space:]]*}
                out=$out$rest
                value=${value#"$rest"}
                ;;
        esac
    done
    printf '%s' "$out"
}

# Set SLX_* variables from KEY=value lines (a config file) without running it as a script: the file
# comes over the network. Other keys, comments and malformed lines are ignored.
slx_parse_config() {
    local line key value
    while IFS= read -r line || [ -n "$line" ]; do
        line=${line#"${line%%[![:space:]]*}"}
        line=${line#export }
        case $line in
            SLX_*=*) ;;
            *) continue ;;
        esac
        key=${line%%=*}
        case $key in *[!A-Za-z0-9_]*) continue ;; esac
        value=$(slx_unquote "${line#*=}") || continue
        printf -v "$key" '%s' "$value"
        _slx_key "$key"
    done
}

# The words of a kernel command line; "double quotes" group words, as the kernel's parser does.
slx_cmdline_words() {
    local line=$1 word="" quoted=0 char i
    for ((i = 0; i < ${#line}; i++)); do
        char=${line:i:1}
        if [ "$char" = '"' ]; then
            quoted=$((1 - quoted))
        elif [ "$quoted" = 0 ] && [[ $char == [[:space:]] ]]; then
            [ -n "$word" ] && printf '%s\n' "$word"
            word=""
        else
            word=$word$char
        fi
    done
    [ -n "$word" ] && printf '%s\n' "$word"
}

# The value of NAME= on a kernel command line (the last one wins), or status 1.
slx_cmdline_get() {
    local name=$1 line=$2 word found=1 value=""
    while IFS= read -r word; do
        case $word in "$name="*) value=${word#*=}; found=0 ;; esac
    done <<< "$(slx_cmdline_words "$line")"
    [ "$found" = 0 ] && printf '%s' "$value"
    return $found
}

# (Here-strings, not process substitution: an initramfs may lack /dev/fd.)
# SLX_* keys given directly on the kernel command line override those of the config file.
slx_apply_cmdline() {
    local word key
    while IFS= read -r word; do
        case $word in SLX_*=*) ;; *) continue ;; esac
        key=${word%%=*}
        case $key in *[!A-Za-z0-9_]*) continue ;; esac
        printf -v "$key" '%s' "${word#*=}"
        _slx_key "$key"
    done <<< "$(slx_cmdline_words "$1")"
}

_slx_key() {
    case " $_slx_keys " in *" $1 "*) ;; *) _slx_keys="${_slx_keys:+$_slx_keys }$1" ;; esac
}

# SLX_DNBD3_RID as dnbd3-client reads it: decimal 0-65535 (0: the latest), no sign, no leading zero
# (010 would be octal 8 to the shell's arithmetic and 10 to dnbd3-client). Otherwise one line, status 1.
slx_check_rid() {
    case $1 in
        0 | [1-9] | [1-9][0-9] | [1-9][0-9][0-9] | [1-9][0-9][0-9][0-9]) return 0 ;;
        [1-9][0-9][0-9][0-9][0-9]) [ "$1" -le 65535 ] && return 0 ;;
    esac
    slx_fail_line "SLX_DNBD3_RID '$1' is not a revision (a decimal number 0-65535 without leading zeros; 0 = the latest)"
    return 1
}

# The effective SLX_* keys (config file, then command line) as KEY='value' lines for stage 4's
# /opt/openslx/config: sourcing it in any POSIX shell only assigns (single quotes, ' as '\'').
slx_write_config() {
    local key value q="'\\''"
    for key in $_slx_keys; do
        value=${!key}
        printf "%s='%s'\n" "$key" "${value//\'/$q}"
    done
}

# A config.tgz as it may be unpacked into the new root: a gzip'ed tar whose members all stay below the
# directory it is unpacked in (no absolute name, no .. component). Otherwise one line, status 1.
slx_check_archive() {
    local file=$1 name listing warnings
    if ! listing=$(busybox tar -tzf "$file" 2> "$file.why"); then
        slx_fail_line "$2 is not a gzip'ed tar archive ($(tail -n 1 "$file.why"))"
        return 1
    fi
    # busybox tar strips a leading / or ../ (and says so): such a member was meant for outside the root
    warnings=$(grep -i 'removing leading' "$file.why" | head -n 1)
    rm -f "$file.why"
    if [ -n "$warnings" ]; then
        slx_fail_line "$2 has a member outside the root (${warnings#tar: }); nothing unpacked"
        return 1
    fi
    while IFS= read -r name; do
        [ -n "$name" ] || continue
        case /$name/ in
            //* | */../*)
                slx_fail_line "$2 has a member outside the root ($name); nothing unpacked"
                return 1
                ;;
        esac
    done <<< "$listing"
}

# SLX_DNBD3_SERVERS as HOST:PORT lines, in order (commas tolerated, IPv6 as [ADDR]:PORT).
slx_server_list() {
    local server
    for server in ${1//,/ }; do
        case $server in
            \[*\]:*) printf '%s\n' "$server" ;;
            \[*\]) printf '%s:%s\n' "$server" "$STAGE4_DNBD3_PORT" ;;
            *:*:*) printf '[%s]:%s\n' "$server" "$STAGE4_DNBD3_PORT" ;;
            *:*) printf '%s\n' "$server" ;;
            *) printf '%s:%s\n' "$server" "$STAGE4_DNBD3_PORT" ;;
        esac
    done
}

# HOST[:PORT] or [IPv6][:PORT] of a URL as "HOST PORT" (the address without brackets; DEFAULT if no port).
slx_host_port() {
    local hostport=$1 host
    case $hostport in
        \[*\]:*) host=${hostport%]:*}; printf '%s %s\n' "${host#[}" "${hostport##*]:}" ;;
        \[*\]) host=${hostport%]}; printf '%s %s\n' "${host#[}" "$2" ;;
        *:*:*) printf '%s %s\n' "$hostport" "$2" ;;
        *:*) printf '%s %s\n' "${hostport%:*}" "${hostport##*:}" ;;
        *) printf '%s %s\n' "$hostport" "$2" ;;
    esac
}

# HTTP/1.0 GET of http://HOST[:PORT]/PATH (HOST may be [IPv6]) with bash's /dev/tcp: the body on stdout, status 0 only for
# a 200 reply (a status line other than 200 goes to stderr).
_slx_http_get() {
    local rest=${1#http://} hostport path host port status line
    hostport=${rest%%/*}
    path=/${rest#"$hostport"}
    path=/${path#//}
    read -r host port <<< "$(slx_host_port "$hostport" 80)"
    if ! { exec 3<>"/dev/tcp/$host/$port"; } 2> /dev/null; then
        printf 'no connection to %s\n' "$hostport" >&2
        return 1
    fi
    printf 'GET %s HTTP/1.0\r\nHost: %s\r\nConnection: close\r\n\r\n' "$path" "$hostport" >&3
    IFS= read -r status <&3
    status=${status%$'\r'}
    case $status in
        "HTTP/1."?" 200"*) ;;
        *) printf '%s\n' "${status:-no reply}" >&2; return 1 ;;
    esac
    while IFS= read -r line <&3; do
        [ -z "${line%$'\r'}" ] && break
    done
    cat <&3
}

slx_http_get() {
    case $1 in
        http://*) ;;
        *) printf 'only http:// is supported\n' >&2; return 1 ;;
    esac
    timeout "${STAGE4_HTTP_TIMEOUT:-20}" bash -c "$(declare -f slx_host_port _slx_http_get); _slx_http_get \"\$1\"" _ "$1"
    local status=$?
    [ "$status" = 124 ] && printf 'no reply within %s s\n' "${STAGE4_HTTP_TIMEOUT:-20}" >&2
    return $status
}

_slx_le16() {
    printf '\\x%02x\\x%02x' $(($1 & 255)) $(($1 >> 8 & 255))
}

# One DNBD3 handshake (SELECT_IMAGE, protocol version 3): status 0 if HOST:PORT serves IMAGE at RID
# (0: any revision). A server that lacks the image or the revision closes without a reply.
_slx_handshake() {
    local host=$1 port=$2 image=$3 rid=$4 len reply
    host=${host#[}
    host=${host%]}
    len=$((2 + ${#image} + 1 + 2 + 1))
    { exec 3<>"/dev/tcp/$host/$port"; } 2> /dev/null || return 1
    {
        printf '\x73\x72\x02\x00%b\x00\x00' "$(_slx_le16 "$len")"
        printf '\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00'
        printf "\\x03\\x00"
        printf '%s' "$image"
        printf '\x00%b\x00' "$(_slx_le16 "$rid")"
    } >&3
    reply=$(head -c 4 <&3 | od -An -tx1 | tr -d ' \n')
    exec 3>&-
    [ "$reply" = "73720200" ]
}

slx_probe() {
    timeout "${STAGE4_PROBE_TIMEOUT:-5}" bash -c "$(declare -f _slx_le16 _slx_handshake); _slx_handshake \"\$@\"" \
        _ "$@" 2>/dev/null
}

# The first server of the list that serves IMAGE at RID, printed as HOST:PORT; otherwise one failure
# line naming what was tried and status 1.
slx_pick_server() {
    local image=$1 rid=$2 servers=$3 server host port tried="" knows=0
    while IFS= read -r server; do
        [ -n "$server" ] || continue
        host=${server%:*}
        port=${server##*:}
        tried="$tried $server"
        if slx_probe "$host" "$port" "$image" "$rid"; then
            printf '%s\n' "$server"
            return 0
        fi
        if [ "${rid:-0}" != 0 ] && slx_probe "$host" "$port" "$image" 0; then
            knows=1
        fi
    done <<< "$(slx_server_list "$servers")"
    if [ -z "$tried" ]; then
        slx_fail_line "no DNBD3 server configured (SLX_DNBD3_SERVERS is empty)"
    elif [ "$knows" = 1 ]; then
        slx_fail_line "revision $rid of $image missing on every server (tried${tried})"
    else
        slx_fail_line "no DNBD3 server answered for $image (tried${tried})"
    fi
    return 1
}

# The chosen server first, then the others in their order (the kernel client fails over to them).
slx_server_order() {
    local chosen=$1 servers=$2 server list=$1
    while IFS= read -r server; do
        [ -n "$server" ] && [ "$server" != "$chosen" ] && list="$list $server"
    done <<< "$(slx_server_list "$servers")"
    printf '%s\n' "$list"
}

# The partitions of a block device (sysfs), in order.
slx_partitions() {
    local disk=${1#/dev/} part
    for part in /sys/class/block/"$disk"/"$disk"*; do
        [ -e "$part/partition" ] && printf '/dev/%s\n' "${part##*/}"
    done | sort -V
}

# The root partition: GPT partition name = IDENTIFIER first, else filesystem label = IDENTIFIER.
slx_pick_partition() {
    local disk=$1 identifier=$2 part
    local parts
    parts=$(slx_partitions "$disk")
    for part in $parts; do
        if [ "$(blkid -p -o value -s PART_ENTRY_NAME "$part" 2>/dev/null)" = "$identifier" ]; then
            printf '%s\n' "$part"
            return 0
        fi
    done
    for part in $parts; do
        if [ "$(blkid -p -o value -s LABEL "$part" 2>/dev/null)" = "$identifier" ]; then
            printf '%s\n' "$part"
            return 0
        fi
    done
    slx_fail_line "no partition named or labelled $identifier on $disk"
    return 1
}
