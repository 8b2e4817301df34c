#!/bin/sh
# The components' artifacts into a layer, with the kernel's module index (what depmod writes) made once, in
# the dev layer, and reused in the prod layer when its module tree is the one the index was made for:
# depmod reads every module of the kernel, about 400 MB, which through a layer's export costs seconds.
#   place KVER INDEX ROOT [MODE SRC DEST]...
#       (dev layer) each SRC at ROOT/DEST with MODE; then, if INDEX is not empty, depmod and the index
#       saved into INDEX
#   unpack KVER [ROOT]
#       (prod layer) the archive stage4 appended to this script, after the line __STAGE4_ARCHIVE__: files/
#       holds each artifact at its destination, modules-index.tar the dev layer's index. When modules
#       came in, the index is restored (below). One script with its data: one transfer into the layer
#       and no Python started there (a copy task costs two module runs, about 0.6 s).
#   save KVER TAR [ROOT]
#       depmod, then the index files and the tree's listing into the archive TAR
#   restore KVER TAR [ROOT]
#       the index from TAR if its listing is this tree's, else depmod; prints which, and removes TAR
# ROOT: the system the artifacts go into (default /; the tests give another).
set -eu
action=$1 kver=$2
shift 2
case $action in
    place) tar=$1 root=$2 && shift 2 ;;
    unpack) tar="" root=${1:-} ;;
    *) tar=$1 root=${2:-} ;;
esac
root=${root%/}
modules=$root/lib/modules/$kver
index="modules.dep modules.dep.bin modules.alias modules.alias.bin modules.softdep modules.symbols
modules.symbols.bin modules.builtin.bin modules.builtin.alias.bin modules.devname modules.weakdep"

# What depmod reads: the modules, the kernel's lists of built-in and ordered modules, depmod's own
# configuration; by path and size. The kernel package is held and the extra modules are the dev run's own
# files: what can differ is what the layers' packages add or remove, which shows in names and sizes.
tree() {
    {
        cd "$modules" && find . -type f \( -name '*.ko' -o -name '*.ko.*' -o -name modules.builtin \
            -o -name modules.builtin.modinfo -o -name modules.order \) -printf '%P %s\n'
        find "$root/etc/depmod.d" "$root/lib/depmod.d" "$root/usr/lib/depmod.d" -type f -printf '%p %s\n' \
            2> /dev/null || true
    } | LC_ALL=C sort
}

save() {
    depmod -b "${root:-/}" -a "$kver"
    mkdir -p "$(dirname "$1")"
    tree > "$modules/.stage4-tree"
    names=.stage4-tree
    for name in $index; do
        if [ -e "$modules/$name" ]; then names="$names $name"; fi
    done
    # shellcheck disable=SC2086  # the names are words
    tar -C "$modules" -cf "$1" $names
    rm -f "$modules/.stage4-tree"
}

restore() {
    listed=$(mktemp -d)
    if [ -f "$1" ] && tar -C "$listed" -xf "$1" && tree | cmp -s - "$listed/.stage4-tree"; then
        for name in $index; do
            rm -f "$modules/$name"
            if [ -e "$listed/$name" ]; then cp "$listed/$name" "$modules/"; fi
        done
        echo "module index: the dev layer's"
    else
        depmod -b "${root:-/}" -a "$kver"
        echo "module index: depmod"
    fi
    rm -rf "$listed" "$1"
}

case $action in
    place)
        while [ $# -ge 3 ]; do
            install -D -m "$1" "$2" "$root$3"
            shift 3
        done
        if [ -n "$tar" ]; then save "$tar"; fi
        ;;
    unpack)
        work=$(mktemp -d)
        line=$(grep -a -n -m 1 '^__STAGE4_ARCHIVE__$' "$0" | cut -d: -f1)
        tail -n "+$((line + 1))" "$0" > "$work/artifacts.tar"
        # The archive has no folder entries: folders that exist keep their modes, missing ones are made.
        tar -C "${root:-/}" -xpf "$work/artifacts.tar" --strip-components=1 files
        members=$(tar -tf "$work/artifacts.tar")
        if printf '%s\n' "$members" | grep -q "^files/lib/modules/$kver/"; then
            if printf '%s\n' "$members" | grep -qx modules-index.tar; then
                tar -C "$work" -xf "$work/artifacts.tar" modules-index.tar
            fi
            restore "$work/modules-index.tar"
        fi
        rm -rf "$work"
        ;;
    save) save "$tar" ;;
    restore) restore "$tar" ;;
    *)
        echo "artifacts.sh: unknown action $action" >&2
        exit 2
        ;;
esac
# stage4 may append an archive below: the shell must not read on.
exit 0
