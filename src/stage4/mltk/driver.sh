#!/bin/bash
# driver.sh init|build|install: run one mltk module's functions inside a stage4 layer, the way mltk's
# setup_target runs them, with the variables and helper functions module.build files use.
#
#   init     (dev layer)  module_init, for every module before the build packages are installed (as
#                         mltk: with the general module.conf only)
#   build    (dev layer)  fetch_source, build, then collect what REQUIRED_BINARIES, _LIBRARIES,
#                         _DIRECTORIES and _FILES name from $MODULE_BUILD_DIR; packs the collected
#                         files and the module folder (module.*, data/) into $STAGE4_MLTK_OUT/$MODULE.tar
#   install  (prod layer) copies data/ and the collected files into / and runs post_copy
#
# Set by the role: MODULE, MODULE_DIR, MODULE_WORK_DIR, MODULE_BUILD_DIR, ROOT_DIR, SYS_VERSIONS,
# SYS_DISTRIBUTION, SYS_VERSION, SYS_CODENAME (the image's release, as mltk's lsb_release gives them),
# STAGE4_MLTK_GIT (build: the host-fetched REQUIRED_GIT trees), STAGE4_MLTK_DOWNLOADS (init, build: what
# the module may download, from stage4's source cache; install: what the result carries of it),
# STAGE4_MLTK_KEEP_DOWNLOADS (build: the result carries them), STAGE4_MLTK_OUT (build), KVER.
# No `set -u` or `set -e`: module files are written for mltk's plain bash. mltk's own rule: a module
# fails by calling perror (a function's return status is only reported).
# On failure the last line on stderr names the module and the function, followed by its last lines.
action=$1
: "${MODULE:?}" "${MODULE_DIR:?}" "${MODULE_WORK_DIR:?}" "${MODULE_BUILD_DIR:?}"
export TARGET_BUILD_DIR=/
export TOOL_STR="[$MODULE]"
export TARGET_KERNEL_LONG="${KVER:-}" KERNEL_CURRENT_VERSION="${KVER:-}"
export KERNEL_HEADERS_DIR="/lib/modules/${KVER:-}/build"
# The image's own kernel is the target kernel (as with mltk's kernel-system module): its files are below /.
KERNEL_BASE_DIR=
if [ -n "${KVER:-}" ] && [ -e "/boot/vmlinuz-$KVER" ]; then KERNEL_BASE_DIR=/; fi
export KERNEL_BASE_DIR
export MLTK_INSTALL=1 DEBIAN_FRONTEND=noninteractive
# What mltk derives from the release and the running system (its distribution.inc, system.inc, paths.inc).
export SYS_DISTRIBUTION="${SYS_DISTRIBUTION:-}" SYS_VERSION="${SYS_VERSION:-}" SYS_CODENAME="${SYS_CODENAME:-}" \
    SYS_VERSIONS="${SYS_VERSIONS:-}"
case $SYS_DISTRIBUTION in
debian | ubuntu) export PACKET_MANAGER=apt PACKET_HANDLER=dpkg LIB64=lib ;;
opensuse) export PACKET_MANAGER=zypper PACKET_HANDLER=rpm LIB64=lib64 ;;
*) export PACKET_MANAGER=yum PACKET_HANDLER=rpm LIB64=lib64 ;;
esac
export X86_64_I386=x86_64 PLATFORM_DPKG=amd64 ARCHREGEX='(amd64|x86[_-]64)'
export ARCH_LIB_DIR=/lib64 ARCH_TRIPLET=
for dir in /usr/lib/x86_64-linux-gnu /lib/x86_64-linux-gnu; do
    [ -e "$dir/libc.so.6" ] && export ARCH_LIB_DIR=${dir#/usr} ARCH_TRIPLET=x86_64-linux-gnu
done
if [ -L /bin ] && [ -L /lib ]; then export USR_SPLIT=no; else export USR_SPLIT=yes; fi
CPU_CORES=$(nproc 2>/dev/null || echo 1)
export CPU_CORES MAKEFLAGS="-j$CPU_CORES"
STAGE4_FUNCTION=setup
log=$(mktemp)
exec 3>&1 4>&2 >"$log" 2>&1

finish() {
    local status=$?
    cat "$log" >&3
    if [ "$status" -ne 0 ]; then
        echo "mltk module $MODULE: $STAGE4_FUNCTION failed (exit $status); its last lines:" >&4
        grep -v '^[[:space:]]*$' "$log" | tail -n 15 | sed 's/^/    /' >&4
    fi
    rm -f "$log"
}
trap finish EXIT
# perror in a command substitution stops the whole driver, as mltk's qnd_exit does.
trap 'exit 1' USR1

# -- the helpers module.build files call (written for stage4, after mltk's documented behaviour) --------
pinfo() { echo "[info]    $TOOL_STR $*"; }
pwarning() { echo "[warning] $TOOL_STR $*"; }
pdebug() { echo "[debug]   $TOOL_STR $*"; }
perror() {
    echo "[error]   $TOOL_STR $*"
    if [ "$BASHPID" != "$$" ]; then kill -USR1 "$$"; fi
    exit 1
}
cde() { cd "$1" || perror "Could not cd to $1"; }
trim() {
    local var=$1
    var="${var#"${var%%[![:space:]]*}"}"
    echo -n "${var%"${var##*[![:space:]]}"}"
}
itrim() { sed -r 's/^\s+//g;s/\s+$//g'; }
tolower() { tr '[:upper:]' '[:lower:]'; }
toupper() { tr '[:lower:]' '[:upper:]'; }

# tarcopy [-i] "FILES" DEST: copy a whitespace-separated list of files (paths as given) below DEST.
tarcopy() {
    local ignore=
    if [ "$1" = "-i" ]; then ignore=--ignore-failed-read; shift; fi
    [ $# -eq 2 ] || perror "tarcopy needs two arguments, got $#"
    local from to
    from=$(trim "$1")
    to=$(trim "$2")
    [ -n "$from" ] || { pwarning "tarcopy called with an empty list (dest was '$to')"; return 0; }
    mkdir -p "$to" || perror "could not create $to"
    # shellcheck disable=SC2086  # the list is word-split, as mltk's tarcopy does
    tar $ignore -cpP $from | tar -xp --keep-directory-symlink -C "$to" || perror "tarcopy to $to failed"
}

# autoclone [DIR]: the REQUIRED_GIT repositories, fetched on the host by stage4 (its source cache:
# offline hosts import them with `stage4 sources import`), copied to DIR (default $MODULE_WORK_DIR/src).
autoclone() {
    [ -n "${REQUIRED_GIT:-}" ] || return 0
    local dstdir=${1:-$MODULE_WORK_DIR/src} url dst
    mkdir -p "$dstdir" || perror "Could not create $dstdir"
    for url in $REQUIRED_GIT; do
        url=${url%%|*}
        dst=${url##*/}
        dst=${dst%.git}
        [ -d "$STAGE4_MLTK_GIT/$dst" ] || perror "autoclone: stage4 did not fetch $url"
        rm -rf "${dstdir:?}/$dst"
        cp -a "$STAGE4_MLTK_GIT/$dst" "$dstdir/$dst" || perror "Could not copy $url to $dstdir/$dst"
        pinfo "Cloned $url to $dstdir/$dst"
    done
}

# -- downloads inside the layer: served from stage4's source cache, never from the network --------------
# The host put each file and git tree the module may fetch into $STAGE4_MLTK_DOWNLOADS, listed in its
# index ("file|git TAB URL TAB ref|- TAB path" lines); download, download_untar, wget, curl and git clone
# serve those by URL and fail on any other URL, naming it and how to seed it.
_served() {
    local kind=$1 url=$2 ref=${3:--} k u r path
    if [ -f "${STAGE4_MLTK_DOWNLOADS:-}/index" ]; then
        while IFS=$'\t' read -r k u r path; do
            if [ "$k" = "$kind" ] && [ "$u" = "$url" ] && [ "$r" = "$ref" ]; then
                echo "$STAGE4_MLTK_DOWNLOADS/$path"
                return 0
            fi
        done <"$STAGE4_MLTK_DOWNLOADS/index"
    fi
    if [ "$kind" = git ]; then
        echo "[error]   $TOOL_STR download $url ($ref, git clone) is not in stage4's source cache;" \
            "seed it with \`stage4 sources import $url --ref $ref DIR\`" >&2
    else
        echo "[error]   $TOOL_STR download $url is not in stage4's source cache;" \
            "seed it with \`stage4 sources import $url FILE --download\`" >&2
    fi
    return 1
}
_deliver() {  # COPY OUT: the served file to OUT ('-': standard output)
    if [ "$2" = - ]; then cat "$1"; else cp "$1" "$2"; fi
}
_remote_name() { local name=${1%%\?*}; echo "${name##*/}"; }

download() {
    local url=$1 file=${2:-} copy
    [ -n "$file" ] || file=$(_remote_name "$url")
    pinfo "Downloading '$file' from '$url' (stage4's source cache)"
    copy=$(_served file "$url") || perror "downloading $url failed"
    _deliver "$copy" "$file" || perror "downloading $url to $file failed"
}
download_untar() {
    local tmp=${3:-dltmp.${1##*/}}
    download "$1" "$tmp"
    mkdir -p "$2"
    tar xf "$tmp" -C "$2/" || perror "could not untar $tmp to $2"
    rm -f "$tmp"
}
wget() {
    local out='' url='' copy
    while [ $# -gt 0 ]; do
        case $1 in
        -O | --output-document) out=$2 && shift ;;
        --output-document=*) out=${1#*=} ;;
        -O?*) out=${1#-O} ;;
        -t | -T | --tries | --timeout | -U | --user-agent | --header | -P) shift ;;
        -*) ;;
        *) url=$1 ;;
        esac
        shift
    done
    [ -n "$out" ] || out=$(_remote_name "$url")
    copy=$(_served file "$url") || return 8 # wget's "server issued an error response"
    _deliver "$copy" "$out"
}
curl() {
    local out=- url='' copy
    while [ $# -gt 0 ]; do
        case $1 in
        -o | --output) out=$2 && shift ;;
        -O | --remote-name) out= ;;
        --retry | --max-time | --connect-timeout | -m | -H | --header | -A | --user-agent | -u | -X | -d | \
            --data | -e | -w | --write-out) shift ;;
        --*) ;;
        -*o) out=$2 && shift ;; # -sSfLo FILE
        -*O*) out= ;;
        -*) ;;
        *) url=$1 ;;
        esac
        shift
    done
    [ -n "$out" ] || out=$(_remote_name "$url")
    copy=$(_served file "$url") || return 22 # curl -f's "HTTP error"
    _deliver "$copy" "$out"
}
git() {
    [ "${1:-}" = clone ] || {
        command git "$@"
        return
    }
    shift
    local ref=HEAD url='' dir='' copy
    while [ $# -gt 0 ]; do
        case $1 in
        -b | --branch) ref=$2 && shift ;;
        --branch=*) ref=${1#*=} ;;
        --depth | --reference | -o | --origin | -c | --config | -j | --jobs) shift ;;
        -*) ;;
        *) if [ -z "$url" ]; then url=$1; else dir=$1; fi ;;
        esac
        shift
    done
    [ -n "$dir" ] || { dir=$(_remote_name "${url%/}") && dir=${dir%.git}; }
    copy=$(_served git "$url" "$ref") || return 128
    if [ -n "$(ls -A "$dir" 2>/dev/null)" ]; then
        echo "fatal: destination path '$dir' already exists and is not an empty directory." >&2
        return 128
    fi
    mkdir -p "$dir" && cp -a "$copy/." "$dir/"
}

escape_search() { sed -e 's/[]\/()$*.^|[]/\\&/g'; }
# Escapes what sed's replacement gives a meaning: '/', '&' (as mltk) and '\' (which mltk leaves as is).
escape_replace() { sed -e 's/[\/&\\]/\\&/g'; }
# nfs_cache_avail: mltk's shared build cache over NFS; stage4 has none (mltk answers 1 without one too).
nfs_cache_avail() { return 1; }
# add_key_value FILE KEY VALUE: append KEY='VALUE' to FILE (below TARGET_BUILD_DIR); nothing when KEY is
# there with this value, quoted or not; perror when it is there with another one.
add_key_value() {
    [ $# -eq 3 ] || perror "add_key_value needs FILE KEY VALUE, got $# arguments"
    [ -n "$2" ] || perror "add_key_value: empty key"
    local file="${TARGET_BUILD_DIR%/}/${1#/}" quoted current
    quoted="'${3//\'/\'\\\'\'}'"
    if [ -s "$file" ]; then
        current=$(sed -n -E "s/^[[:space:]]*$2=(.*)\$/\\1/p" "$file" | tail -n 1 | itrim)
        if [ -n "$current" ]; then
            [ "$current" = "$quoted" ] || [ "$current" = "$3" ] \
                || perror "Cannot set $2 to '$3' in $1 as it is already set to $current"
            return 0
        fi
    fi
    mkdir -p "$(dirname "$file")" || perror "Could not create the folder of $file"
    echo "$2=$quoted" >>"$file" || perror "Could not write to $file"
}
# add_env KEY VALUE: the variable for every session, in /etc/environment.
add_env() {
    [ $# -eq 2 ] || perror "add_env needs KEY VALUE, got $# arguments"
    add_key_value /etc/environment "$1" "$2"
}

# get_link_chain PATH [PREFIX]: PATH (absolute; its folder canonical) and each link it leads through,
# one a line, at most 10 hops; with PREFIX (a folder) the paths below it are printed as ./relative.
get_link_chain() {
    [[ $1 == /* ]] || perror "get_link_chain needs an absolute path, got '$1'"
    [ -e "$1" ] || [ -L "$1" ] || perror "get_link_chain: '$1' does not exist"
    local prefix="" link next hops=0
    if [ $# -ge 2 ]; then
        [ -d "$2" ] || perror "get_link_chain: '$2' is not a folder"
        prefix="$(cd -P -- "$2" && pwd -P)" || perror "get_link_chain: cannot resolve '$2'"
        prefix=${prefix%/}/
    fi
    link="$(cd -P -- "$(dirname -- "$1")" && pwd -P)/$(basename -- "$1")"
    _chain_line "$link" "$prefix"
    while [ -L "$link" ] && [ "$hops" -lt 10 ]; do
        hops=$((hops + 1))
        next=$(readlink -- "$link")
        { [ -n "$next" ] && [ "$next" != "$link" ]; } || break
        [[ $next == /* ]] || next="$(dirname -- "$link")/$next"
        if [ -d "$(dirname -- "$next")" ]; then
            next="$(cd -P -- "$(dirname -- "$next")" && pwd -P)/$(basename -- "$next")"
        fi
        link=$next
        _chain_line "$link" "$prefix"
    done
}
_chain_line() {
    if [ -n "$2" ] && [[ $1 == "$2"* ]]; then
        echo "./${1#"$2"}"
    elif [ -n "$2" ] && [ ! -e "$1" ]; then
        # An absolute link meant inside PREFIX's tree (mltk's build folder).
        if [ -e "$2${1#/}" ] || [ -L "$2${1#/}" ]; then echo "./${1#/}"; fi
    else
        echo "$1"
    fi
}

# copy_kernel: the target kernel and its config to $ROOT_DIR/var/builds/kernel (kernel, config), where
# mltk's modules expect it. stage4 exports that same kernel with the image.
copy_kernel() {
    [ -e "/boot/vmlinuz-$KVER" ] || perror "copy_kernel: no kernel '$KVER' in /boot"
    local dir="$ROOT_DIR/var/builds/kernel"
    mkdir -p "$dir" || perror "copy_kernel: could not create $dir"
    cp "/boot/vmlinuz-$KVER" "$dir/kernel" || perror "copy_kernel: could not copy /boot/vmlinuz-$KVER to $dir"
    # As mltk: the config is copied if there is one.
    cp "/boot/config-$KVER" "$dir/config" 2>/dev/null
    chmod +r "$dir/kernel"
}

# chroot_run DIR < SCRIPT: SCRIPT run by bash as root in a chroot of / whose changes land in DIR: the
# chroot is an overlay (upper: a copy of DIR, on a tmpfs) over this system's root file system, with
# /dev, /proc, /sys and /run bound in; mounts live in a mount namespace of their own. Afterwards DIR holds
# what the script wrote, and each file it removed is listed in DIR/overlay.whiteout.list. A failing
# script is an error; DIR then stays as it was.
chroot_run() {
    [ $# -eq 1 ] || perror "chroot_run needs exactly 1 parameter (the build folder), got $#"
    local dir=$1 tmp status
    mkdir -p "$dir" || perror "chroot_run: could not create $dir"
    grep -qw overlay /proc/filesystems || modprobe overlay || perror "chroot_run: no overlayfs"
    tmp=$(mktemp -d "${TMPDIR:-/tmp}/stage4-chroot.XXXXXX") || perror "chroot_run: no temporary folder"
    cat >"$tmp/script" || perror "chroot_run: could not read the script"
    # shellcheck disable=SC2016  # "$@" is the inner bash's
    unshare -m --propagation private bash -c "$(declare -f _chroot_in_namespace)"'; _chroot_in_namespace "$@"' \
        chroot-run "$tmp" "$(cd "$dir" && pwd -P)"
    status=$?
    rm -rf "$tmp"
    [ "$status" -ne 125 ] || perror "chroot_run: could not set up or take the changes out of the chroot"
    [ "$status" -eq 0 ] || perror "chroot_run: the script in the chroot failed (exit $status)"
}
# The mounts (in chroot_run's own mount namespace), the chroot, and the changes moved to the build folder.
_chroot_in_namespace() {
    local tmp=$1 dir=$2 fs=$1/fs status bound node
    { mkdir "$fs" && mount -t tmpfs stage4-chroot "$fs" && mkdir "$fs/upper" "$fs/work" "$fs/root"; } || return 125
    cp -a "$dir/." "$fs/upper/" || return 125
    mount -t overlay overlay -o "lowerdir=/,upperdir=$fs/upper,workdir=$fs/work" "$fs/root" || return 125
    for bound in /dev /proc /sys /run; do mount --bind "$bound" "$fs/root$bound" || return 125; done
    chroot "$fs/root" /bin/bash <"$tmp/script"
    status=$?
    [ "$status" -eq 0 ] || return "$status"
    umount "$fs/root/dev" "$fs/root/proc" "$fs/root/sys" "$fs/root/run" "$fs/root" || return 125
    rm -f "$fs/upper/overlay.whiteout.list"
    # A removed file is a 0/0 character device in the upper folder.
    find "$fs/upper" -type c | while IFS= read -r node; do
        if [ "$(stat -c %t:%T "$node")" = 0:0 ]; then echo "${node#"$fs/upper"}"; rm -f "$node"; fi
    done >"$tmp/whiteouts"
    if [ -s "$tmp/whiteouts" ]; then cp "$tmp/whiteouts" "$fs/upper/overlay.whiteout.list"; fi
    cp -a "$fs/upper/." "$dir/" || return 125
}

# -- users and groups: mltk's wrappers of useradd and groupadd (its install mode: this system's files) ----
# getuid NAME|ID, getgid NAME|ID: the id of the user (group) of that name, else ID when one has it.
_id_of() { awk -F: -v want="$1" '$1 == want { n = $3 } $3 == want && id == "" { id = $3 }
    END { if (n != "") print n; else if (id != "") print id }' "$2"; }
getuid() { _id_of "$1" /etc/passwd; }
getgid() { _id_of "$1" /etc/group; }
# getusergroup NAME|ID: the primary group id of the user.
getusergroup() { awk -F: -v want="$1" '($1 == want || $3 == want) && g == "" { g = $4 } END { if (g != "") print g }' /etc/passwd; }
# usr_setpw USER PASSWORD: an empty password locks the account ('*'), a crypt hash ($id$...) is taken
# as it is, anything else is hashed (SHA-512).
usr_setpw() {
    local hash=$2 shadow=/etc/shadow tmp
    if [ -z "$hash" ]; then
        hash='*'
    elif ! [[ $hash =~ ^\$[0-9a-z]+\$ ]]; then
        hash=$(openssl passwd -6 "$2" 2>/dev/null || mkpasswd -m sha-512 "$2" 2>/dev/null)
        [ -n "$hash" ] || perror "Could not hash the password of $1 (no openssl or mkpasswd)"
    fi
    grep -q "^$1:" "$shadow" || perror "usr_setpw: no user $1 in $shadow"
    tmp=$(mktemp) || perror "usr_setpw: no temporary file"
    if ! awk -F: -v OFS=: -v u="$1" -v h="$hash" '$1 == u { $2 = h } { print }' "$shadow" >"$tmp" \
        || ! cat "$tmp" >"$shadow"; then
        perror "Could not set the password of $1"
    fi
    rm -f "$tmp"
}

# useradd [OPTIONS] NAME: the system's useradd, unless the user exists as asked (then only the password
# is set, if given); a user that exists otherwise (another uid, system vs normal, another group), a
# taken uid or a missing group is an error. --password "" locks the account ('*') instead of leaving
# it without a password.
useradd() {
    local name=${!#} system=0 uid="" gid="" usergroup=0 password="" setpw=0 existing group="" owner
    local args=("$@")
    while [ $# -gt 0 ]; do
        case $1 in
        -R | --root | -P | --prefix) perror "useradd: $1 is not allowed in a module" ;;
        -r | --system) system=1 ;;
        -U | --user-group) usergroup=1 ;;
        -u | --uid) uid=$2; shift ;;
        -g | --gid) gid=$2; shift ;;
        -p | --password) password=$2; setpw=1; shift ;;
        esac
        shift
    done
    existing=$(getuid "$name")
    if [ "$usergroup" = 1 ]; then
        [ -z "$gid" ] || perror "useradd $name: -U and -g together"
        group=$(getgid "$name")
    elif [ -n "$gid" ]; then
        group=$(getgid "$gid")
        [ -n "$group" ] || perror "useradd $name: no group $gid"
    fi
    if [ -n "$uid" ]; then
        owner=$(awk -F: -v u="$uid" '$3 == u { print $1; exit }' /etc/passwd)
        [ -z "$owner" ] || [ "$owner" = "$name" ] || perror "useradd $name: uid $uid is taken by $owner"
        [ -z "$existing" ] || [ "$existing" = "$uid" ] || perror "useradd $name: exists with uid $existing"
    elif [ -n "$existing" ] && [ "$system" = 1 ] && [ "$existing" -ge 1000 ]; then
        perror "useradd $name: asked for a system user, exists with uid $existing"
    elif [ -n "$existing" ] && [ "$system" = 0 ] && [ "$existing" -lt 1000 ]; then
        perror "useradd $name: asked for a normal user, exists with system uid $existing"
    fi
    if [ -n "$existing" ]; then
        [ -z "$group" ] || [ "$(getusergroup "$name")" = "$group" ] || perror "useradd $name: exists with another group"
    else
        command useradd "${args[@]}" || perror "useradd ${args[*]} failed"
    fi
    if [ "$setpw" = 1 ]; then usr_setpw "$name" "$password"; fi
    return 0
}

# groupadd [OPTIONS] NAME: the system's groupadd, unless the group exists as asked; a taken gid or a
# group that exists otherwise (system vs normal) is an error.
groupadd() {
    local name=${!#} system=0 gid="" existing
    local args=("$@")
    while [ $# -gt 0 ]; do
        case $1 in
        -R | --root | -P | --prefix) perror "groupadd: $1 is not allowed in a module" ;;
        -r | --system) system=1 ;;
        -g | --gid) gid=$2; shift ;;
        esac
        shift
    done
    existing=$(getgid "$name")
    if [ -n "$gid" ] && [ -n "$(awk -F: -v g="$gid" '$3 == g' /etc/group)" ]; then
        [ "$existing" = "$gid" ] && return 0
        perror "groupadd $name: gid $gid is taken"
    elif [ -z "$gid" ] && [ -n "$existing" ]; then
        [ "$system" = 1 ] && [ "$existing" -ge 1000 ] && perror "groupadd $name: exists with the normal gid $existing"
        [ "$system" = 0 ] && [ "$existing" -lt 1000 ] && perror "groupadd $name: exists with the system gid $existing"
        return 0
    fi
    command groupadd "${args[@]}" || perror "groupadd ${args[*]} failed"
}
# add_to_group USER GROUP: USER becomes a member of GROUP (nothing when it is one).
add_to_group() {
    local tmp
    grep -q "^$2:" /etc/group || perror "Cannot add '$1' to '$2': no such group"
    awk -F: -v g="$2" -v u="$1" '$1 == g { n = split($4, m, ","); for (i = 1; i <= n; i++) if (m[i] == u) found = 1 }
        END { exit !found }' /etc/group && return 0
    tmp=$(mktemp) || perror "add_to_group: no temporary file"
    if ! awk -F: -v OFS=: -v g="$2" -v u="$1" '$1 == g { $4 = ($4 == "" ? u : $4 "," u) } { print }' \
        /etc/group >"$tmp" || ! cat "$tmp" >/etc/group; then
        perror "Could not add '$1' to '$2'"
    fi
    rm -f "$tmp"
}

# -- reading the module --------------------------------------------------------------------------------
for name in ${!REQUIRED_*}; do unset "$name"; done
# shellcheck source=/dev/null  # the module's own files, known only at run time
. "$MODULE_DIR/module.conf" || perror "sourcing module.conf failed"
[ "$action" = init ] || for version in $SYS_VERSIONS; do
    if [ -e "$MODULE_DIR/module.conf.$version" ]; then
        # shellcheck source=/dev/null  # the module's own files, known only at run time
        . "$MODULE_DIR/module.conf.$version" || perror "sourcing module.conf.$version failed"
        break
    fi
done
fetch_source() { :; }
build() { :; }
post_copy() { :; }
pre_exec() { :; }
module_init() { :; }
# shellcheck source=/dev/null  # the module's own files, known only at run time
. "$MODULE_DIR/module.build" || perror "sourcing module.build failed"

run() {
    STAGE4_FUNCTION=$1
    pinfo "## $1"
    "$1"
    local status=$?
    [ "$status" -eq 0 ] || pwarning "$1 returned $status"
    STAGE4_FUNCTION=stage4
}

# The files of the content packages: REQUIRED_* entries they provide need not be in the build tree
# (mltk's install mode accepts them the same way).
package_files() {
    local package
    for package in ${REQUIRED_CONTENT_PACKAGES:-}; do
        package=${package#@}
        if command -v dpkg-query >/dev/null; then dpkg-query -L "$package"; else rpm -ql "$package"; fi
    done 2>/dev/null
}

# Collect into $1 (a tree like /) what the REQUIRED_* variables name, from $MODULE_BUILD_DIR.
collect() {
    local dest=$1 entry optional found file list system
    STAGE4_FUNCTION=collect
    list=$(mktemp)
    system=$(mktemp)
    provided=$(package_files)
    mkdir -p "$dest" "$MODULE_BUILD_DIR"
    cde "$MODULE_BUILD_DIR"
    for entry in ${REQUIRED_BINARIES:-}; do
        optional=${entry:0:1}
        entry=${entry#@}
        found=
        while IFS= read -r -d '' file; do
            [ -f "$(readlink -f "$file")" ] && [ -x "$(readlink -f "$file")" ] && { echo "$file" >>"$list"; found=1; }
        done < <(find . -name "$entry" \( -type f -o -type l \) -print0)
        [ -n "$found" ] && continue
        grep -q "/$entry\$" <<<"$provided" && continue
        [ "$optional" = "@" ] && continue
        perror "REQUIRED_BINARIES: $entry is neither in the build tree nor in REQUIRED_CONTENT_PACKAGES"
    done
    for entry in ${REQUIRED_LIBRARIES:-}; do
        found=$(find . -name "$entry.so*" | tee -a "$list")
        [ -n "$found" ] && continue
        grep -qF "/$entry.so" <<<"$provided" && continue
        perror "REQUIRED_LIBRARIES: $entry is neither in the build tree nor in REQUIRED_CONTENT_PACKAGES"
    done
    for entry in ${REQUIRED_DIRECTORIES:-}; do
        [[ $entry == /* ]] || perror "REQUIRED_DIRECTORIES: $entry does not start with '/'"
        if [ -d ".$entry" ]; then
            echo ".$entry" >>"$list"
        elif ! grep -qx "$entry" <<<"$provided"; then
            [ -d "$entry" ] || perror "REQUIRED_DIRECTORIES: $entry is neither in the build tree, in" \
                "REQUIRED_CONTENT_PACKAGES nor on this system"
            echo "$entry" >>"$system"
        fi
    done
    for entry in ${REQUIRED_FILES:-}; do
        optional=${entry:0:1}
        entry=${entry#@}
        entry=${entry#/}
        if [ -e "./$entry" ] || [ -L "./$entry" ]; then
            echo "./$entry" >>"$list"
        elif [ -e "/$entry" ] && ! grep -qx "/$entry" <<<"$provided"; then
            echo "/$entry" >>"$system"
        elif ! grep -qx "/$entry" <<<"$provided" && [ "$optional" != "@" ]; then
            perror "REQUIRED_FILES: /$entry is neither in the build tree, in REQUIRED_CONTENT_PACKAGES nor on" \
                "this system"
        fi
    done
    # A symlink is taken with its target (when the target is in the build tree as well).
    while IFS= read -r file; do
        [ -L "$file" ] || continue
        target=$(readlink -f "$file")
        [[ $target == "$MODULE_BUILD_DIR"/* ]] && echo ".${target#"$MODULE_BUILD_DIR"}" >>"$list"
    done <"$list"
    if [ -s "$list" ]; then
        tar -cpf - --no-recursion -T <(sort -u "$list" | while IFS= read -r f; do
            if [ -d "$f" ] && [ ! -L "$f" ]; then find "$f"; else echo "$f"; fi
        done) | tar -xpf - -C "$dest" || perror "copying the collected files failed"
        pinfo "collected $(sort -u "$list" | wc -l) entries"
    fi
    # From this system (the dev layer), each with the links it leads through, folders with what they
    # hold: REQUIRED_SYSTEM_FILES as mltk takes them, and REQUIRED_FILES and _DIRECTORIES found neither in
    # the build tree nor in a content package (mltk's install mode accepts them there, on its target).
    : >"$list"
    for entry in ${REQUIRED_SYSTEM_FILES:-}; do
        [[ $entry == /* ]] || perror "REQUIRED_SYSTEM_FILES: $entry does not start with '/'"
        [ -e "$entry" ] || [ -L "$entry" ] || perror "REQUIRED_SYSTEM_FILES: $entry is not on this system"
        echo "$entry" >>"$system"
    done
    while IFS= read -r entry; do get_link_chain "$entry" >>"$list"; done <"$system"
    rm -f "$system"
    if [ -s "$list" ]; then
        (cd / && sort -u "$list" | sed 's|^/||' | tar -cpf - -T -) | tar -xpf - -C "$dest" \
            || perror "copying REQUIRED_SYSTEM_FILES failed"
        pinfo "collected $(sort -u "$list" | wc -l) system files"
    fi
    rm -f "$list"
}

# Copy the files (not the folders: those of / stay as they are, e.g. /bin -> usr/bin) of tree $1 into /.
copy_tree() {
    [ -d "$1" ] || return 0
    (cd "$1" && find . ! -type d -print0 | tar -cpf - --null -T -) | tar -xpf - --keep-directory-symlink -C / \
        || perror "copying $1 into / failed"
}

case $action in
init)
    cde "$MODULE_DIR"
    run module_init
    ;;
build)
    mkdir -p "$MODULE_WORK_DIR" "$MODULE_BUILD_DIR"
    cde "$MODULE_DIR"
    run pre_exec
    cde "$MODULE_WORK_DIR"
    run fetch_source
    cde "$MODULE_WORK_DIR"
    run build
    pack=$MODULE_WORK_DIR/stage4-pack
    rm -rf "$pack"
    collect "$pack/files"
    STAGE4_FUNCTION=pack
    cp -a "$MODULE_DIR" "$pack/module" || perror "copying $MODULE_DIR failed"
    parts=(files module)
    # post_copy downloads too: the result carries what the layer served, for the prod layer.
    if [ -n "${STAGE4_MLTK_KEEP_DOWNLOADS:-}" ] && [ -f "${STAGE4_MLTK_DOWNLOADS:-}/index" ]; then
        cp -a "$STAGE4_MLTK_DOWNLOADS" "$pack/downloads" || perror "copying $STAGE4_MLTK_DOWNLOADS failed"
        parts+=(downloads)
    fi
    mkdir -p "$STAGE4_MLTK_OUT"
    tar -C "$pack" -cpf "$STAGE4_MLTK_OUT/$MODULE.tar" "${parts[@]}" || perror "packing failed"
    ;;
install)
    STAGE4_MLTK_DOWNLOADS=$MODULE_WORK_DIR/downloads
    STAGE4_FUNCTION=copy
    copy_tree "$MODULE_DIR/data"
    copy_tree "$MODULE_BUILD_DIR"
    cde "$MODULE_DIR"
    run post_copy
    ;;
*)
    perror "unknown action $action (init, build or install)"
    ;;
esac
