#!/usr/bin/env bash
# The demo: build a sample cloud image the way the publisher builds one, as an
# OCI image layout under target/demo/, then inspect it, get it (checking the
# reassembled qcow2 with qemu-img and cmp) and pull it into the cocoon
# stand-in (tests/cocoon-standin.sh; cocoon itself is not needed).
#
#   scripts/demo.sh            # 96 MiB of data in a qcow2, split into 7 MiB parts
#   DEMO_MIB=2048 scripts/demo.sh
set -euo pipefail
cd "$(dirname "$0")/.."

mib=${DEMO_MIB:-96}
part=${DEMO_PART:-7M}
work=target/demo
say() { printf '\n== %s\n' "$*" >&2; }

for tool in qemu-img qemu-io split sha256sum cmp; do
    command -v "$tool" >/dev/null || { echo "demo: $tool is missing (Debian: qemu-utils, coreutils, diffutils)" >&2; exit 1; }
done

say "building cloudimg (release)"
cargo build --release --quiet
bin=$PWD/target/release/cloudimg

rm -rf "$work"
mkdir -p "$work/parts" "$work/store"

say "a ${mib} MiB-data qcow2 disk, made with qemu-img and filled with qemu-io"
qemu-img create -q -f qcow2 "$work/win11.qcow2" "$((mib * 2))M"
# Incompressible data in 16 MiB runs with holes between them, like a real disk.
for ((off = 0; off < mib; off += 16)); do
    n=$(( mib - off < 16 ? mib - off : 16 ))
    head -c "$((n << 20))" /dev/urandom > "$work/chunk"
    qemu-io -f qcow2 -c "write -s $work/chunk $((off * 2))M ${n}M" "$work/win11.qcow2" >/dev/null
done
rm -f "$work/chunk"
qemu-img check -q "$work/win11.qcow2"

say "split the publisher's way and sum the parts"
(
    cd "$work/parts"
    split -b "$part" -d --additional-suffix=.qcow2.part ../win11.qcow2 win11.qcow2.
    sha256sum win11.qcow2.* > SHA256SUMS
    ls -l >&2
)

say "an OCI image layout, as oras copy --to-oci-layout writes it"
layout=$work/win11
scripts/make-layout.sh "$layout" 25h2 application/vnd.cocoonstack.disk.qcow2.part \
    "$work"/parts/win11.qcow2.*.qcow2.part "$work/parts/SHA256SUMS" >/dev/null
source="oci:$layout:25h2"

say "cloudimg inspect $source"
"$bin" inspect "$source"

say "cloudimg get $source -o $work/out.qcow2"
"$bin" get "$source" -o "$work/out.qcow2"
qemu-img check "$work/out.qcow2"
cmp "$work/out.qcow2" "$work/win11.qcow2"
echo "reassembled disk is byte-identical to the original" >&2

say "cloudimg get $source | sha256sum   (stdout is a pipe: splice)"
"$bin" get "$source" | sha256sum
sha256sum < "$work/win11.qcow2"

say "cloudimg pull $source   (into the cocoon stand-in)"
EPOCH_COCOON_BINARY=$PWD/tests/cocoon-standin.sh COCOON_STANDIN_DIR=$work/store "$bin" pull "$source"
cmp "$work/store/win11" "$work/win11.qcow2"
echo "imported image is byte-identical to the original" >&2

say "demo complete"
