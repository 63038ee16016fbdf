#!/usr/bin/env bash
# Write an OCI image layout the way `oras copy --to-oci-layout` writes a cloud
# image that was pushed with `oras push`: every FILE becomes a layer titled with
# its file name (disk parts with DISK_MEDIA_TYPE, a file named SHA256SUMS as
# text/plain), the empty config, the os-image artifactType, tagged TAG.
#
#   scripts/make-layout.sh LAYOUT_DIR TAG DISK_MEDIA_TYPE FILE...
# e.g.
#   scripts/make-layout.sh target/x/win11 25h2 application/vnd.cocoonstack.disk.qcow2.part \
#       parts/win11.qcow2.*.qcow2.part parts/SHA256SUMS
set -euo pipefail
layout=$1 tag=$2 disk_type=$3
shift 3

mkdir -p "$layout/blobs/sha256"
printf '{"imageLayoutVersion":"1.0.0"}' > "$layout/oci-layout"
put_blob() { # FILE -> prints its digest; hard-links when it can (no second copy)
    local hex
    hex=$(sha256sum "$1" | cut -d' ' -f1)
    ln -f "$1" "$layout/blobs/sha256/$hex" 2>/dev/null || cp "$1" "$layout/blobs/sha256/$hex"
    printf 'sha256:%s' "$hex"
}
config=$(mktemp)
printf '{}' > "$config"
config_digest=$(put_blob "$config")
rm -f "$config"
format=raw
case $disk_type in *qcow2*) format=qcow2 ;; esac
layers=""
for f in "$@"; do
    name=$(basename "$f")
    type=$disk_type
    [ "$name" = SHA256SUMS ] && type=text/plain
    layers+="${layers:+,}{\"mediaType\":\"$type\",\"digest\":\"$(put_blob "$f")\",\"size\":$(stat -c %s "$f"),\"annotations\":{\"org.opencontainers.image.title\":\"$name\"}}"
done
manifest=$(mktemp)
printf '%s' "{\"schemaVersion\":2,\"mediaType\":\"application/vnd.oci.image.manifest.v1+json\",\"artifactType\":\"application/vnd.cocoonstack.os-image.v1+json\",\"config\":{\"mediaType\":\"application/vnd.oci.empty.v1+json\",\"digest\":\"$config_digest\",\"size\":2},\"layers\":[$layers],\"annotations\":{\"cocoonstack.disk.format\":\"$format\"}}" > "$manifest"
manifest_size=$(stat -c %s "$manifest")
manifest_digest=$(put_blob "$manifest")
rm -f "$manifest"
printf '%s' "{\"schemaVersion\":2,\"mediaType\":\"application/vnd.oci.image.index.v1+json\",\"manifests\":[{\"mediaType\":\"application/vnd.oci.image.manifest.v1+json\",\"digest\":\"$manifest_digest\",\"size\":$manifest_size,\"annotations\":{\"org.opencontainers.image.ref.name\":\"$tag\"}}]}" > "$layout/index.json"
echo "$manifest_digest"
