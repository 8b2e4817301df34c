#!/bin/bash
# run-build.sh NAME COMMAND...: a component's build commands in order, in the current directory.
# Stops at the first failing command and reports that command and its own last output lines on
# stderr, so the error shown is the cause and not a follow-on failure of the next command.
set -u
name=$1
shift
output=$(mktemp)
trap 'rm -f "$output"' EXIT
for command in "$@"; do
    echo "+ $command"
    bash -e -o pipefail -c "$command" >"$output" 2>&1
    status=$?
    cat "$output"
    if [ "$status" -ne 0 ]; then
        echo "component $name: '$command' failed with exit code $status; its last lines:" >&2
        grep -v '^[[:space:]]*$' "$output" | tail -n 15 | sed 's/^/    /' >&2
        exit 1
    fi
done
