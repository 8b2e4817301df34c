# shellcheck shell=sh
# stage4 export, the store host's side of a remote export (run as `sh -s -- ACTION ARGS...` over ssh).
# Needs a POSIX sh, flock(1) and GNU coreutils. The same transaction as a local export: every file was
# uploaded under a hidden temporary name; under the store lock the revision is picked, its files are
# linked into place (the record first, the image .r<RID> LAST), and what fails after that (activation,
# SIGHUP) withdraws it again, image first. Activation renames the active entry `$boot/ipxe` (removed for a
# revision without one) and then `$boot/config` into place, the entry first; a withdrawal puts both back
# from hidden hard links in the same order. Errors: exit code and one line `ERROR=...` on stdout.
#
#   prepare STORE DIR BOOT META PIDFILE            checks, directories, `TOOLS=...`
#   commit  STORE DIR LEAF TOKEN RID PADDED BOOT META ACTIVATE PIDFILE   `RID=<n>`
#   cleanup STORE DIR LEAF TOKEN BOOT META          remove this export's temporaries and empty directories
set -eu

fail() { echo "ERROR=$2"; exit "$1"; }

# Exit codes (stage4/export/remote.py reads them).
E_TAKEN=3 E_FULL=4 E_NO_FLOCK=5 E_NO_STORE=6 E_SIZE=7 E_WRITE=8 E_WITHDRAWN=9 E_READ_ONLY=10 E_PIDFILE=11

check_pidfile() {
    if [ -z "$1" ]; then return 0; fi
    pid=$(cat -- "$1" 2>/dev/null) || fail $E_PIDFILE "pid file $1: cannot read it"
    case $pid in ''|*[!0-9]*) fail $E_PIDFILE "pid file $1: '$pid' is not a process id" ;; esac
    kill -0 "$pid" 2>/dev/null || fail $E_PIDFILE "server reload: no process $pid (from $1)"
}

action=$1
shift
case $action in
prepare)
    store=$1 dir=$2 boot=$3 meta=$4 pidfile=$5
    [ -d "$store" ] || fail $E_NO_STORE "store $store: not a directory"
    [ -w "$store" ] || fail $E_READ_ONLY "store $store: not writable (read-only file system?)"
    command -v flock >/dev/null 2>&1 || fail $E_NO_FLOCK "flock(1) is missing on the store host"
    check_pidfile "$pidfile"
    for d in "$store/$dir" "$boot" "$meta"; do
        mkdir -p -- "$d" 2>/dev/null || fail $E_WRITE "cannot create the directory $d"
        [ -w "$d" ] || fail $E_READ_ONLY "directory $d: not writable (read-only file system?)"
    done
    tools=
    # shellcheck disable=SC2043  # a list of optional tools, with one entry so far
    for tool in rsync; do
        if command -v "$tool" >/dev/null 2>&1; then tools="$tools $tool"; fi
    done
    echo "TOOLS=$tools"
    ;;

commit)
    store=$1 dir=$2 leaf=$3 token=$4 rid=$5 padded=$6 boot=$7 meta=$8 activate=$9
    shift 9
    pidfile=${1:-}
    cd -- "$store/$dir"
    tmp=".$leaf.stage4-$token.part"
    crctmp=".$leaf.stage4-$token.crc.part"
    truncate -s "$padded" -- "$tmp" 2>/dev/null || fail $E_WRITE "cannot pad the image in $store/$dir"
    [ "$(stat -c %s -- "$tmp")" = "$padded" ] || fail $E_SIZE "uploaded image has the wrong size"
    for kind in kernel initrd config.tgz; do
        if [ -e "$boot/.$kind.stage4-$token.part" ]; then chmod 644 -- "$boot/.$kind.stage4-$token.part"; fi
    done
    chmod 644 -- "$tmp" "$crctmp"
    sync -- "$tmp" "$crctmp" 2>/dev/null || sync
    command -v flock >/dev/null 2>&1 || fail $E_NO_FLOCK "flock(1) is missing on the store host"
    exec 9>>"$store/.stage4.lock"
    flock 9
    for d in . "$boot" "$meta"; do
        find "$d" -maxdepth 1 -name ".*.stage4-*.part" -mmin +1440 -exec rm -f -- {} + 2>/dev/null || true
    done
    # Every trace of a revision takes its number: images, .crc files, records, boot files.
    taken=" " max=0
    for f in ./"$leaf".r* "$boot"/kernel.r* "$boot"/initrd.r* "$boot"/config.r* "$boot"/config.tgz.r* "$boot"/ipxe.r* \
             "$meta"/publication.r*.json "$meta"/kernel.r* "$meta"/initrd.r* "$meta"/config.r* "$meta"/ipxe.r*; do
        [ -e "$f" ] || continue
        r=${f##*.r}
        r=${r%.crc}
        r=${r%.json}
        case $r in ''|*[!0-9]*) continue ;; esac
        # Leading zeros off by hand: sh arithmetic reads them as octal (r08), and `expr 0 + 0` exits 1.
        while [ "$r" != 0 ] && [ "${r#0}" != "$r" ]; do r=${r#0}; done
        taken="$taken$r "
        if [ "$r" -gt "$max" ]; then max=$r; fi
    done
    if [ "$rid" = 0 ]; then
        rid=$((max + 1))
        [ "$rid" -le 65535 ] || fail $E_FULL "no revision above $max left"
    else
        case $taken in *" $rid "*) fail $E_TAKEN "revision $rid exists" ;; esac
    fi
    # The text files get their revision number now.
    for t in "$boot/.config.stage4-$token" "$boot/.ipxe.stage4-$token" "$boot/.active-ipxe.stage4-$token" \
             "$meta/.publication.stage4-$token"; do
        [ -e "$t.part" ] || continue
        sed "s/@RID@/$rid/g" "$t.part" > "$t.rid.part" 2>/dev/null || fail $E_WRITE "cannot write ${t%/*}"
        chmod 644 -- "$t.rid.part"
    done
    # The active files, the entry first: `new` (a new one), `gone` (removed: an entry for another kernel).
    active=
    if [ "$activate" = 1 ]; then
        cp -- "$boot/.config.stage4-$token.rid.part" "$boot/.config.stage4-$token.new.part" 2>/dev/null \
            || fail $E_WRITE "cannot write the active config to $boot"
        if [ -e "$boot/.active-ipxe.stage4-$token.rid.part" ]; then
            mv -f -- "$boot/.active-ipxe.stage4-$token.rid.part" "$boot/.ipxe.stage4-$token.new.part"
            active="ipxe:new"
        elif [ -e "$boot/ipxe" ] || [ -L "$boot/ipxe" ]; then
            active="ipxe:gone"
        fi
        active="$active config:new"
        for a in $active; do
            f=${a%%:*}
            if [ -f "$boot/$f" ]; then
                ln -- "$boot/$f" "$boot/.$f.stage4-$token.old.part" 2>/dev/null \
                    || fail $E_WRITE "cannot write a copy of the active $f to $boot"
            fi
        done
    fi
    sync
    linked=
    activated=
    withdraw() {
        for f in $linked; do rm -f -- "$f"; done  # newest first: the image first
        for f in $activated; do  # the entry first
            if [ -e "$boot/.$f.stage4-$token.old.part" ]; then
                mv -f -- "$boot/.$f.stage4-$token.old.part" "$boot/$f"
            else
                rm -f -- "$boot/$f"
            fi
        done
        sync
    }
    link() {
        if [ -e "$2" ] || ! ln -- "$1" "$2" 2>/dev/null; then
            withdraw
            if [ -e "$2" ]; then fail $E_TAKEN "$2 exists"; fi
            fail $E_WRITE "cannot link $2"
        fi
        linked="$2 $linked"
    }
    link "$meta/.publication.stage4-$token.rid.part" "$meta/publication.r$rid.json"
    for kind in kernel initrd config.tgz; do
        t="$boot/.$kind.stage4-$token.part"
        if [ -e "$t" ]; then link "$t" "$boot/$kind.r$rid"; fi
    done
    link "$boot/.config.stage4-$token.rid.part" "$boot/config.r$rid"
    if [ -e "$boot/.ipxe.stage4-$token.rid.part" ]; then link "$boot/.ipxe.stage4-$token.rid.part" "$boot/ipxe.r$rid"; fi
    link "$crctmp" "$leaf.r$rid.crc"
    link "$tmp" "$leaf.r$rid"
    sync
    # The revision is visible now; whatever fails from here on withdraws it.
    for a in $active; do
        f=${a%%:*}
        activated="$activated $f"
        if [ "${a#*:}" = new ]; then
            mv -f -- "$boot/.$f.stage4-$token.new.part" "$boot/$f" \
                || { withdraw; fail $E_WITHDRAWN "cannot replace $boot/$f"; }
        else
            rm -f -- "$boot/$f" || { withdraw; fail $E_WITHDRAWN "cannot remove $boot/$f"; }
        fi
    done
    if [ -n "$pidfile" ]; then
        pid=$(cat -- "$pidfile" 2>/dev/null) || pid=
        kill -HUP "$pid" 2>/dev/null || { withdraw; fail $E_WITHDRAWN "server reload: no process '$pid' (from $pidfile)"; }
    fi
    rm -f -- "$boot/.config.stage4-$token.old.part" "$boot/.ipxe.stage4-$token.old.part"
    for d in . "$boot" "$meta"; do
        find "$d" -maxdepth 1 -name ".*.stage4-$token*.part" -exec rm -f -- {} + 2>/dev/null || true
    done
    sync
    echo "RID=$rid"
    ;;

cleanup)
    store=$1 dir=$2 leaf=$3 token=$4 boot=$5 meta=$6
    for d in "$store/$dir" "$boot" "$meta"; do
        find "$d" -maxdepth 1 -name ".*.stage4-$token*.part" -exec rm -f -- {} + 2>/dev/null || true
    done
    # Directories left empty, up to (not including) the store itself.
    for d in "$store/$dir" "$boot" "$meta"; do
        case $d in "$store"/*) ;; *) continue ;; esac
        while [ "$d" != "$store" ] && rmdir -- "$d" 2>/dev/null; do d=${d%/*}; done
    done
    ;;
esac
