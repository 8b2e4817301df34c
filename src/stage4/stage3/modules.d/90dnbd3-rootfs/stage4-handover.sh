#!/bin/bash
# dnbd3-rootfs, pre-pivot: hand stage 3's results to stage 4 in the new root (NEWROOT, /sysroot): the
# site's config.tgz unpacked into / (dnbd3root fetched and checked it), then /opt/openslx/config with
# every effective SLX_* key (config file and command line; it wins over a copy in config.tgz). Sourcing
# that file only assigns: each value is in single quotes. Does nothing on a boot that is not a Stage4
# client's (no /run/stage4/config).
# shellcheck source=/dev/null  # dracut's library, only in the initramfs
command -v getarg > /dev/null || . /lib/dracut-lib.sh
# shellcheck source-path=SCRIPTDIR source=stage4-lib.sh  # installed as /lib/stage4-lib.sh
. "${STAGE4_LIB:-/lib}/stage4-lib.sh"

STATE=${STAGE4_STATE:-/run/stage4}  # (both settable for the tests, which run this on the host)
root=${1:-/sysroot}
[ -e "$STATE/config" ] || exit 0

slx_parse_config < "$STATE/config"  # our own file; for SLX_REBOOT_TIMEOUT
fail() {
    slx_stop_boot "$(slx_fail_line "$1")"
}

if [ -e "$STATE/config.tgz" ]; then
    busybox tar -xzf "$STATE/config.tgz" -C "$root" > "$STATE/tar.log" 2>&1 \
        || fail "could not unpack config.tgz into the new root: $(tail -n 1 "$STATE/tar.log")"
fi
{ mkdir -p "$root/opt/openslx" && cat "$STATE/config" > "$root/opt/openslx/config"; } 2> "$STATE/handover.log" \
    || fail "could not write /opt/openslx/config in the new root: $(tail -n 1 "$STATE/handover.log")"
chmod 0644 "$root/opt/openslx/config"
exit 0
