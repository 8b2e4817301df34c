#!/bin/sh
# The kernel's module index (what depmod writes) made once, in the dev layer, and reused in the prod layer
# when its module tree is the one the index was made for: depmod reads every module of the kernel, about
# 400 MB, which through a layer's export costs seconds.
#   save KVER TAR [ROOT]     depmod, then the index files and the tree's listing into the archive TAR
#                            (dev layer; one file, as the prod layer gets it in one transfer)
#   restore KVER TAR [ROOT]  the index from TAR if its listing is this tree's, else depmod; prints which,
#                            and removes TAR
# ROOT: the system whose modules these are (default /; the tests give another).
set -eu
action=$1 kver=$2 tar=$3 root=${4:-}
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

case $action in
    save)
        depmod -b "${root:-/}" -a "$kver"
        mkdir -p "$(dirname "$tar")"
        tree > "$modules/.stage4-tree"
        names=.stage4-tree
        for name in $index; do
            if [ -e "$modules/$name" ]; then names="$names $name"; fi
        done
        # shellcheck disable=SC2086  # the names are words
        tar -C "$modules" -cf "$tar" $names
        rm -f "$modules/.stage4-tree"
        ;;
    restore)
        work=$(mktemp -d)
        trap 'rm -rf "$work"' EXIT
        if [ -f "$tar" ] && tar -C "$work" -xf "$tar" && tree | cmp -s - "$work/.stage4-tree"; then
            for name in $index; do
                rm -f "$modules/$name"
                if [ -e "$work/$name" ]; then cp "$work/$name" "$modules/"; fi
            done
            echo "module index: the dev layer's"
        else
            depmod -b "${root:-/}" -a "$kver"
            echo "module index: depmod"
        fi
        rm -f "$tar"
        ;;
    *)
        echo "module-index.sh: unknown action $action" >&2
        exit 2
        ;;
esac
