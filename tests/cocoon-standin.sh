#!/bin/sh
# A STAND-IN for `cocoon image import NAME`, used because cocoon itself cannot
# be installed where the tests run. It behaves like cocoon's import where it
# matters here: it copies stdin to a temporary file and commits the image
# (renames it to $COCOON_STANDIN_DIR/NAME) only when stdin ends with a clean EOF.
# A killed import leaves at most its temporary file, never NAME.
#
# COCOON_STANDIN_DELAY=SECONDS sleeps before reading (to hold the pipe full);
# COCOON_STANDIN_FAIL=1 exits 3 at once without reading (a broken cocoon);
# COCOON_STANDIN_PIDFILE=FILE writes the stand-in's pid, which is also its
#   process group, to FILE first (so a test can check the group is gone);
# COCOON_STANDIN_QUIT_AFTER=BYTES reads that many bytes, then exits 0 without
#   committing (an import that gives up early);
# COCOON_STANDIN_HANG_AFTER=BYTES reads that many bytes, closes stdin and
#   lingers, then commits what it read (an import that stopped reading: only
#   killing it keeps a truncated image out of the store);
# COCOON_STANDIN_EXIT=N reads everything, then exits N without committing
#   (an import that fails at the end);
# COCOON_STANDIN_LINGER=SECONDS reads everything, then sleeps before committing
#   (an import that takes its time, or hangs, after the clean EOF);
# COCOON_STANDIN_TTY=1 first reads a line from /dev/tty (an import that asks
#   the terminal something) and exits 5 when it has no terminal;
# COCOON_STANDIN_WRAP=child runs the import as a child of this shell instead
#   of exec'ing it (a wrapper script without `exec`); COCOON_STANDIN_WRAP=setsid
#   runs it in a session of its own, holding this stdin (a helper that leaves
#   cocoon's process group). The wrapper writes its pid, which is cocoon's
#   process group, to COCOON_STANDIN_GROUPFILE.
set -u
if [ "$#" -ne 3 ] || [ "$1" != image ] || [ "$2" != import ]; then
    echo "cocoon-standin: usage: cocoon image import NAME" >&2
    exit 2
fi
name=$3
case "${COCOON_STANDIN_WRAP:-}" in
child | setsid)
    mode=$COCOON_STANDIN_WRAP
    unset COCOON_STANDIN_WRAP
    [ -n "${COCOON_STANDIN_GROUPFILE:-}" ] && echo $$ > "$COCOON_STANDIN_GROUPFILE"
    if [ "$mode" = child ]; then
        "$0" "$@"
    else
        # A background job's stdin would be /dev/null: hand it over on fd 3.
        exec 3<&0
        setsid "$0" "$@" <&3 3<&- &
        exec 3<&-
        wait
    fi
    exit $?
    ;;
esac
dir=${COCOON_STANDIN_DIR:?COCOON_STANDIN_DIR must name the image store}
[ -n "${COCOON_STANDIN_PIDFILE:-}" ] && echo $$ > "$COCOON_STANDIN_PIDFILE"
if [ -n "${COCOON_STANDIN_FAIL:-}" ]; then
    echo "cocoon-standin: refusing the import (COCOON_STANDIN_FAIL)" >&2
    exit 3
fi
if [ -n "${COCOON_STANDIN_TTY:-}" ]; then
    if ! (read -r answer < /dev/tty) 2>/dev/null; then
        echo "cocoon-standin: no terminal to ask" >&2
        exit 5
    fi
fi
[ -n "${COCOON_STANDIN_DELAY:-}" ] && sleep "$COCOON_STANDIN_DELAY"
if [ -n "${COCOON_STANDIN_QUIT_AFTER:-}" ]; then
    head -c "$COCOON_STANDIN_QUIT_AFTER" > /dev/null
    exit 0
fi
tmp=$(mktemp "$dir/.import-$name.XXXXXX") || exit 1
if [ -n "${COCOON_STANDIN_HANG_AFTER:-}" ]; then
    head -c "$COCOON_STANDIN_HANG_AFTER" > "$tmp"
    exec 0<&-
    sleep 30
    mv "$tmp" "$dir/$name"
    exit 0
fi
if cat > "$tmp"; then
    if [ -n "${COCOON_STANDIN_EXIT:-}" ]; then
        rm -f "$tmp"
        echo "cocoon-standin: import failed (COCOON_STANDIN_EXIT)" >&2
        exit "$COCOON_STANDIN_EXIT"
    fi
    [ -n "${COCOON_STANDIN_LINGER:-}" ] && sleep "$COCOON_STANDIN_LINGER"
    mv "$tmp" "$dir/$name" || exit 1
    echo "cocoon-standin: imported $name ($(wc -c < "$dir/$name") bytes)"
else
    rm -f "$tmp"
    exit 1
fi
