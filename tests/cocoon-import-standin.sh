#!/bin/sh
# A STAND-IN for `cocoon image import NAME` reading its stdin, used because
# cocoon itself cannot be built where the tests run. Unlike
# tests/cocoon-standin.sh (which commits any bytes), it does with the stream
# what cocoon's import does (../shared/docs/FORMAT.md, "cocoon"):
# - stdin is copied to a temporary file; the image is committed only when
#   stdin ends with a clean EOF (a killed import leaves at most its temporary
#   file, never NAME);
# - a stream that starts with 1f 8b is gunzipped first;
# - a stream that starts with the qcow2 magic QFI\xfb is a cloud image, named
#   by the sha256 of the whole stream: `qemu-img info --output=json` decides
#   whether it is kept as it is (a qcow2 with compat 1.1 and no backing file:
#   renamed into the blob store, $COCOON_STANDIN_DIR/.blobs/HEX, where a blob
#   with that digest already there is reused) or converted with qemu-img to a
#   compat 1.1 qcow2 first; NAME ($COCOON_STANDIN_DIR/NAME) is then a
#   symbolic link to the blob;
# - anything else is read as a tar (a container image), so a raw disk fails
#   there, with nothing committed.
#
# It takes the knobs of tests/cocoon-standin.sh, so it can replace it:
# COCOON_STANDIN_DELAY=SECONDS sleeps before reading;
# COCOON_STANDIN_FAIL=1 exits 3 at once without reading;
# COCOON_STANDIN_PIDFILE=FILE writes the stand-in's pid (its process group)
#   to FILE first;
# COCOON_STANDIN_QUIT_AFTER=BYTES reads that many bytes, then exits 0 without
#   committing;
# COCOON_STANDIN_HANG_AFTER=BYTES reads that many bytes, closes stdin and
#   lingers, then commits what it read;
# COCOON_STANDIN_EXIT=N reads everything, then exits N without committing.
set -u
me=cocoon-import-standin
if [ "$#" -ne 3 ] || [ "$1" != image ] || [ "$2" != import ]; then
    echo "$me: usage: cocoon image import NAME" >&2
    exit 2
fi
name=$3
dir=${COCOON_STANDIN_DIR:?COCOON_STANDIN_DIR must name the image store}
[ -n "${COCOON_STANDIN_PIDFILE:-}" ] && echo $$ > "$COCOON_STANDIN_PIDFILE"
if [ -n "${COCOON_STANDIN_FAIL:-}" ]; then
    echo "$me: refusing the import (COCOON_STANDIN_FAIL)" >&2
    exit 3
fi
[ -n "${COCOON_STANDIN_DELAY:-}" ] && sleep "$COCOON_STANDIN_DELAY"
if [ -n "${COCOON_STANDIN_QUIT_AFTER:-}" ]; then
    head -c "$COCOON_STANDIN_QUIT_AFTER" > /dev/null
    exit 0
fi

# first_bytes FILE N: the first N bytes of FILE as lowercase hex.
first_bytes() { head -c "$2" "$1" | od -An -tx1 | tr -d ' \n'; }

# commit TMP: what cocoon does with a stream that ended cleanly.
commit() {
    tmp=$1
    if [ "$(first_bytes "$tmp" 2)" = 1f8b ]; then
        if ! gzip -dc < "$tmp" > "$tmp.gunzip"; then
            rm -f "$tmp" "$tmp.gunzip"
            echo "$me: gunzip failed" >&2
            exit 1
        fi
        mv "$tmp.gunzip" "$tmp"
    fi
    if [ "$(first_bytes "$tmp" 4)" != 514649fb ]; then
        # cocoon's tar path: a container image. A raw disk is no tar.
        if ! list=$(tar -tf "$tmp" 2>&1); then
            why=$(printf '%s\n' "$list" | head -n 1)
        elif printf '%s\n' "$list" | grep -qx 'manifest.json'; then
            why="a container image tarball, which this stand-in does not import"
        else
            why="it holds no container image (no manifest.json)"
        fi
        rm -f "$tmp"
        echo "$me: not a qcow2 image (no QFI\\xfb magic); read as a tar it fails: $why" >&2
        exit 1
    fi
    hex=$(sha256sum < "$tmp" | cut -d' ' -f1)
    if ! info=$(qemu-img info --output=json -f qcow2 "$tmp" 2>&1); then
        rm -f "$tmp"
        echo "$me: qemu-img info: $info" >&2
        exit 1
    fi
    keep=yes
    case $info in *'"compat": "1.1"'*) ;; *) keep=no ;; esac
    case $info in *'"backing-filename"'*) keep=no ;; esac
    mkdir -p "$dir/.blobs"
    blob=$dir/.blobs/$hex
    if [ -e "$blob" ]; then
        rm -f "$tmp"
    elif [ "$keep" = yes ]; then
        mv "$tmp" "$blob" || exit 1
    else
        if ! out=$(qemu-img convert -f qcow2 -O qcow2 -o compat=1.1 "$tmp" "$tmp.conv" 2>&1); then
            rm -f "$tmp" "$tmp.conv"
            echo "$me: qemu-img convert: $out" >&2
            exit 1
        fi
        rm -f "$tmp"
        mv "$tmp.conv" "$blob" || exit 1
    fi
    ln -s ".blobs/$hex" "$dir/.link-$name.$$" && mv -f "$dir/.link-$name.$$" "$dir/$name" || exit 1
    echo "$me: imported $name (sha256:$hex, $(wc -c < "$blob") bytes, kept as is: $keep)"
}

tmp=$(mktemp "$dir/.import-$name.XXXXXX") || exit 1
if [ -n "${COCOON_STANDIN_HANG_AFTER:-}" ]; then
    head -c "$COCOON_STANDIN_HANG_AFTER" > "$tmp"
    exec 0<&-
    sleep 30
    commit "$tmp"
    exit 0
fi
if cat > "$tmp"; then
    if [ -n "${COCOON_STANDIN_EXIT:-}" ]; then
        rm -f "$tmp"
        echo "$me: import failed (COCOON_STANDIN_EXIT)" >&2
        exit "$COCOON_STANDIN_EXIT"
    fi
    commit "$tmp"
else
    rm -f "$tmp"
    exit 1
fi
