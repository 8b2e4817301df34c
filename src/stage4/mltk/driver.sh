#!/bin/bash
# driver.sh build|install: run one mltk module's functions inside a stage4 layer, the way mltk's
# setup_target runs them, with the variables and helper functions module.build files use.
#
#   build    (dev layer)  fetch_source, build, then collect what REQUIRED_BINARIES, _LIBRARIES,
#                         _DIRECTORIES and _FILES name from $MODULE_BUILD_DIR; packs the collected
#                         files and the module folder (module.*, data/) into $STAGE4_MLTK_OUT/$MODULE.tar
#   install  (prod layer) copies data/ and the collected files into / and runs post_copy
#
# Set by the role: MODULE, MODULE_DIR, MODULE_WORK_DIR, MODULE_BUILD_DIR, ROOT_DIR, SYS_VERSIONS,
# SYS_DISTRIBUTION, SYS_VERSION, SYS_CODENAME (the image's release, as mltk's lsb_release gives them),
# STAGE4_MLTK_GIT (build: the host-fetched REQUIRED_GIT trees), STAGE4_MLTK_OUT (build), KVER.
# No `set -u` or `set -e`: module files are written for mltk's plain bash. mltk's own rule: a module
# fails by calling perror (a function's return status is only reported).
# On failure the last line on stderr names the module and the function, followed by its last lines.
action=$1
: "${MODULE:?}" "${MODULE_DIR:?}" "${MODULE_WORK_DIR:?}" "${MODULE_BUILD_DIR:?}"
export TARGET_BUILD_DIR=/
export TOOL_STR="[$MODULE]"
export TARGET_KERNEL_LONG="${KVER:-}" KERNEL_CURRENT_VERSION="${KVER:-}"
export KERNEL_HEADERS_DIR="/lib/modules/${KVER:-}/build"
export MLTK_INSTALL=1 DEBIAN_FRONTEND=noninteractive
# What mltk derives from the release and the running system (its distribution.inc, system.inc, paths.inc).
export SYS_DISTRIBUTION="${SYS_DISTRIBUTION:-}" SYS_VERSION="${SYS_VERSION:-}" SYS_CODENAME="${SYS_CODENAME:-}"
export SYS_VERSIONS="${SYS_VERSIONS:-}"
case $SYS_DISTRIBUTION in
debian | ubuntu) export PACKET_MANAGER=apt PACKET_HANDLER=dpkg LIB64=lib ;;
opensuse) export PACKET_MANAGER=zypper PACKET_HANDLER=rpm LIB64=lib64 ;;
*) export PACKET_MANAGER=yum PACKET_HANDLER=rpm LIB64=lib64 ;;
esac
export X86_64_I386=x86_64 PLATFORM_DPKG=amd64 ARCHREGEX='(amd64|x86[_-]64)'
export ARCH_LIB_DIR=/lib64 ARCH_TRIPLET=
for dir in /lib/x86_64-linux-gnu /usr/lib/x86_64-linux-gnu; do
    if [ -e "$dir/libc.so.6" ]; then
        export ARCH_LIB_DIR=${dir#/usr} ARCH_TRIPLET=x86_64-linux-gnu
        break
    fi
done
if [ -L /bin ] && [ -L /lib ]; then export USR_SPLIT=no; else export USR_SPLIT=yes; fi
export CPU_CORES
CPU_CORES=$(nproc 2>/dev/null || echo 1)
export MAKEFLAGS="-j$CPU_CORES"
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

download() {
    local url=$1 file=${2:-}
    [ -n "$file" ] || { file=${url%%\?*}; file=${file##*/}; }
    pinfo "Downloading '$file' from '$url'"
    if command -v curl >/dev/null; then
        curl -fL --retry 3 -o "$file" "$url" || perror "downloading $url failed"
    else
        wget -O "$file" "$url" || perror "downloading $url failed"
    fi
}
download_untar() {
    local tmp=${3:-dltmp.${1##*/}}
    download "$1" "$tmp"
    mkdir -p "$2"
    tar xf "$tmp" -C "$2/" || perror "could not untar $tmp to $2"
    rm -f "$tmp"
}

# -- reading the module --------------------------------------------------------------------------------
for name in ${!REQUIRED_*}; do unset "$name"; done
# shellcheck source=/dev/null  # the module's own files, known only at run time
. "$MODULE_DIR/module.conf" || perror "sourcing module.conf failed"
for version in $SYS_VERSIONS; do
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
    local dest=$1 entry optional found file list
    STAGE4_FUNCTION=collect
    list=$(mktemp)
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
            perror "REQUIRED_DIRECTORIES: $entry is neither in the build tree nor in REQUIRED_CONTENT_PACKAGES"
        fi
    done
    for entry in ${REQUIRED_FILES:-}; do
        optional=${entry:0:1}
        entry=${entry#@}
        entry=${entry#/}
        if [ -e "./$entry" ] || [ -L "./$entry" ]; then
            echo "./$entry" >>"$list"
        elif ! grep -qx "/$entry" <<<"$provided" && [ "$optional" != "@" ]; then
            perror "REQUIRED_FILES: /$entry is neither in the build tree nor in REQUIRED_CONTENT_PACKAGES"
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
    rm -f "$list"
}

# Copy the files (not the folders: those of / stay as they are, e.g. /bin -> usr/bin) of tree $1 into /.
copy_tree() {
    [ -d "$1" ] || return 0
    (cd "$1" && find . ! -type d -print0 | tar -cpf - --null -T -) | tar -xpf - --keep-directory-symlink -C / \
        || perror "copying $1 into / failed"
}

case $action in
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
    mkdir -p "$STAGE4_MLTK_OUT"
    tar -C "$pack" -cpf "$STAGE4_MLTK_OUT/$MODULE.tar" files module || perror "packing failed"
    ;;
install)
    STAGE4_FUNCTION=copy
    copy_tree "$MODULE_DIR/data"
    copy_tree "$MODULE_BUILD_DIR"
    cde "$MODULE_DIR"
    run post_copy
    ;;
*)
    perror "unknown action $action (build or install)"
    ;;
esac
