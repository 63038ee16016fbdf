#!/usr/bin/env bash
# Push the manifest tagged TAG of an OCI image layout, with its blobs, into a
# registry through the distribution upload API (POST, then PUT with the digest),
# using curl. For the demo and the benchmarks; `oras copy` does the same.
#
#   scripts/registry-push.sh LAYOUT_DIR TAG http://127.0.0.1:5000 REPO
set -euo pipefail
layout=$1 tag=$2 registry=${3%/} repo=$4

manifest_digest=$(python3 - "$layout" "$tag" <<'PY'
import json, sys
index = json.load(open(sys.argv[1] + "/index.json"))
for m in index["manifests"]:
    if m.get("annotations", {}).get("org.opencontainers.image.ref.name") == sys.argv[2]:
        print(m["digest"]); break
else:
    sys.exit("no tag " + sys.argv[2])
PY
)
manifest=$layout/blobs/${manifest_digest/://}

push_blob() { # DIGEST
    local digest=$1 file=$layout/blobs/${1/://} location
    if curl -fsS -o /dev/null -I "$registry/v2/$repo/blobs/$digest" 2>/dev/null; then
        return
    fi
    location=$(curl -fsS -D - -o /dev/null -X POST "$registry/v2/$repo/blobs/uploads/" |
        tr -d '\r' | sed -n 's/^[Ll]ocation: //p')
    case $location in http*) ;; *) location=$registry$location ;; esac
    case $location in *\?*) sep='&' ;; *) sep='?' ;; esac
    curl -fsS -o /dev/null -X PUT -H 'Content-Type: application/octet-stream' \
        --upload-file "$file" "$location${sep}digest=$digest"
}

for digest in $(python3 -c '
import json, sys
m = json.load(open(sys.argv[1]))
print(m["config"]["digest"])
for l in m["layers"]: print(l["digest"])' "$manifest"); do
    push_blob "$digest"
done
media=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["mediaType"])' "$manifest")
curl -fsS -o /dev/null -X PUT -H "Content-Type: $media" --data-binary "@$manifest" \
    "$registry/v2/$repo/manifests/$tag"
echo "pushed $repo:$tag ($manifest_digest) to $registry" >&2
