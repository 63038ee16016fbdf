#!/bin/sh
# A STAND-IN for `cocoon image import NAME`, used because cocoon itself cannot
# be installed where the tests run. It behaves like cocoon's import where it
# matters here: it copies stdin to a temporary file and commits the image
# (renames it to $COCOON_STANDIN_DIR/NAME) only when stdin ends with a clean EOF.
# A killed import leaves at most its temporary file, never NAME.
#
# COCOON_STANDIN_DELAY=SECONDS sleeps before reading (to hold the pipe full);
# COCOON_STANDIN_FAIL=1 exits 3 at once without reading (a broken cocoon).
set -u
if [ "$#" -ne 3 ] || [ "$1" != image ] || [ "$2" != import ]; then
    echo "cocoon-standin: usage: cocoon image import NAME" >&2
    exit 2
fi
name=$3
dir=${COCOON_STANDIN_DIR:?COCOON_STANDIN_DIR must name the image store}
if [ -n "${COCOON_STANDIN_FAIL:-}" ]; then
    echo "cocoon-standin: refusing the import (COCOON_STANDIN_FAIL)" >&2
    exit 3
fi
[ -n "${COCOON_STANDIN_DELAY:-}" ] && sleep "$COCOON_STANDIN_DELAY"
tmp=$(mktemp "$dir/.import-$name.XXXXXX") || exit 1
if cat > "$tmp"; then
    mv "$tmp" "$dir/$name" || exit 1
    echo "cocoon-standin: imported $name ($(wc -c < "$dir/$name") bytes)"
else
    rm -f "$tmp"
    exit 1
fi
