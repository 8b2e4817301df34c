#!/bin/sh
# dracut pre-pivot hook (sourced): put stage 3's results for stage 4 into the new root.
/sbin/stage4-handover "${NEWROOT:-/sysroot}"
