#!/usr/bin/env bash
# The rescue-shell test: boot Debian's kernel under qemu into a busybox
# initramfs that holds only busybox and the static cloudimg
# (scripts/build-static.sh), and write a disk onto a block device from there.
#
# Disk 1 (/dev/vda, read-only) is an ext4 file system holding an OCI layout of
# a raw disk (random data split into parts); disk 2 (/dev/vdb) is empty. The
# guest runs `env -i cloudimg get oci:/mnt/LAYOUT:TAG -o /dev/vdb`, prints its
# exit status and powers off; the host then compares disk 2 with the original.
# Exits 0 only when the guest's cloudimg exited 0 and the bytes are identical.
#
#   scripts/initramfs-test.sh
#   TEST_MIB=32 TEST_PART=5M QEMU_ACCEL=kvm KEEP=1 scripts/initramfs-test.sh
#
# Needs busybox-static, qemu-system-x86 and e2fsprogs (installed when run as
# root). The kernel is not installed: the current linux-image-amd64 package is
# downloaded and its vmlinuz and the few modules needed are kept under
# target/initramfs-test/kernel/.
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH=$PATH:/usr/sbin:/sbin

mib=${TEST_MIB:-24}
part=${TEST_PART:-7M}
accel=${QEMU_ACCEL:-tcg}
qemu_timeout=${QEMU_TIMEOUT:-180}
base=$PWD/target/initramfs-test
run=$base/run
tag=v1
# Modules to load in the guest, with their dependencies: Debian builds virtio,
# virtio-blk and ext4 as modules. crc32c is loaded up front because ext4 asks
# the crypto API for it, not the module loader.
want_modules="virtio_pci virtio_blk crc32c_generic ext4"

say() { printf '== %s\n' "$*" >&2; }
fail() { echo "initramfs-test: $*" >&2; exit 1; }
now() { echo "$EPOCHREALTIME"; }
since() { awk -v a="$1" -v b="$EPOCHREALTIME" 'BEGIN { printf "%.1f s", b - a }'; }
t0=$(now)

# --- packages ---------------------------------------------------------------
missing=()
dpkg-query -W -f='${Status}\n' busybox-static 2>/dev/null | grep -q 'ok installed' || missing+=(busybox-static)
command -v qemu-system-x86_64 >/dev/null || missing+=(qemu-system-x86)
command -v mkfs.ext4 >/dev/null || missing+=(e2fsprogs)
if ((${#missing[@]})); then
    if ((EUID == 0)); then
        say "installing ${missing[*]}"
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
    else
        fail "missing Debian packages: ${missing[*]} (apt-get install --no-install-recommends ${missing[*]})"
    fi
fi
busybox=/bin/busybox

# --- the static binary ------------------------------------------------------
t=$(now)
say "static build"
scripts/build-static.sh >/dev/null
bin=$PWD/target/static/cloudimg
say "static build: $(since "$t")"

# --- the kernel: vmlinuz and the modules the guest needs --------------------
t=$(now)
kpkg=$(apt-cache depends linux-image-amd64 2>/dev/null | awk '/Depends: linux-image-[0-9]/ { print $2; exit }')
if [[ -z $kpkg && $EUID == 0 ]]; then
    apt-get update -qq
    kpkg=$(apt-cache depends linux-image-amd64 | awk '/Depends: linux-image-[0-9]/ { print $2; exit }')
fi
[[ -n $kpkg ]] || fail "no linux-image-amd64 in the apt lists (run apt-get update)"
kdir=$base/kernel/$kpkg
if [[ ! -f $kdir/vmlinuz ]]; then
    say "fetching $kpkg"
    rm -rf "$base/kernel" && mkdir -p "$base/kernel/deb"
    (cd "$base/kernel/deb" && apt-get download -qq "$kpkg" 2>/dev/null)
    dpkg-deb -x "$base/kernel/deb/$kpkg"_*.deb "$base/kernel/root"
    kver=${kpkg#linux-image-}
    mods=$base/kernel/root/lib/modules/$kver/kernel
    mkdir -p "$kdir.tmp/modules"
    # Load order: each module after the modules in its `depends=` field.
    declare -A done_
    order=()
    add() {
        local name=$1 file dep
        [[ -n ${done_[$name]:-} ]] && return
        done_[$name]=1
        file=$(find "$mods" \( -name "$name.ko" -o -name "${name//_/-}.ko" \) -print -quit)
        [[ -n $file ]] || fail "module $name is not in $kpkg"
        for dep in $(tr '\0' '\n' <"$file" | sed -n 's/^depends=//p' | tr ',' ' '); do add "$dep"; done
        cp "$file" "$kdir.tmp/modules/$name.ko"
        order+=("$name")
    }
    for m in $want_modules; do add "$m"; done
    printf '%s\n' "${order[@]}" >"$kdir.tmp/modules/order"
    cp "$base/kernel/root/boot/vmlinuz-$kver" "$kdir.tmp/vmlinuz"
    rm -rf "$base/kernel/root" "$base/kernel/deb"
    mv "$kdir.tmp" "$kdir"
fi
say "kernel $kpkg, modules: $(tr '\n' ' ' <"$kdir/modules/order")($(since "$t"))"

# --- the disks and the initramfs ---------------------------------------------
t=$(now)
rm -rf "$run"
mkdir -p "$run/fs/layout/blobs/sha256" "$run/parts" "$run/initramfs"
cleanup() { [[ -n ${KEEP:-} ]] || rm -rf "$run"; }
trap cleanup EXIT

say "a ${mib} MiB raw disk of random data, split into $part parts, as an OCI layout"
head -c "$((mib << 20))" /dev/urandom >"$run/disk.raw"
(cd "$run/parts" && split -b "$part" -d --additional-suffix=.raw.part ../disk.raw disk.raw.)
layout=$run/fs/layout
printf '{"imageLayoutVersion":"1.0.0"}' >"$layout/oci-layout"
put_blob() { # FILE -> prints its digest
    local hex
    hex=$(sha256sum "$1" | cut -d' ' -f1)
    cp "$1" "$layout/blobs/sha256/$hex"
    printf 'sha256:%s' "$hex"
}
printf '{}' >"$run/config.json"
config_digest=$(put_blob "$run/config.json")
layers=""
for f in "$run"/parts/*.raw.part; do
    layers+="${layers:+,}{\"mediaType\":\"application/vnd.cocoonstack.disk.raw.part\",\"digest\":\"$(put_blob "$f")\",\"size\":$(stat -c %s "$f"),\"annotations\":{\"org.opencontainers.image.title\":\"$(basename "$f")\"}}"
done
cat >"$run/manifest.json" <<JSON
{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","artifactType":"application/vnd.cocoonstack.os-image.v1+json","config":{"mediaType":"application/vnd.oci.empty.v1+json","digest":"$config_digest","size":2},"layers":[$layers],"annotations":{"cocoonstack.disk.format":"raw"}}
JSON
manifest_digest=$(put_blob "$run/manifest.json")
cat >"$layout/index.json" <<JSON
{"schemaVersion":2,"mediaType":"application/vnd.oci.image.index.v1+json","manifests":[{"mediaType":"application/vnd.oci.image.manifest.v1+json","digest":"$manifest_digest","size":$(stat -c %s "$run/manifest.json"),"annotations":{"org.opencontainers.image.ref.name":"$tag"}}]}
JSON
# Disk 1: ext4 with the layout (room for the blobs and the file system's own
# metadata). Disk 2: empty, exactly the disk's size.
mkfs.ext4 -q -F -L layout -d "$run/fs" "$run/layout.img" "$((mib * 5 / 4 + 16))M" >/dev/null
truncate -s "$((mib << 20))" "$run/target.img"

ird=$run/initramfs
mkdir -p "$ird/bin" "$ird/lib/modules"
cp "$busybox" "$ird/bin/busybox"
cp "$bin" "$ird/bin/cloudimg"
cp "$kdir"/modules/* "$ird/lib/modules/"
cat >"$ird/init" <<INIT
#!/bin/busybox sh
/bin/busybox mkdir -p /dev /proc /sys /mnt /sbin /usr/bin /usr/sbin
/bin/busybox --install -s
mount -t devtmpfs devtmpfs /dev
exec </dev/console >/dev/console 2>&1
mount -t proc proc /proc
mount -t sysfs sysfs /sys
for m in \$(cat /lib/modules/order); do insmod /lib/modules/\$m.ko || echo "insmod \$m failed"; done
n=0
while [ ! -b /dev/vdb ] && [ \$n -lt 100 ]; do sleep 0.1; n=\$((n + 1)); done
mount -t ext4 -o ro /dev/vda /mnt
env -i /bin/cloudimg inspect oci:/mnt/layout:$tag
env -i /bin/cloudimg get oci:/mnt/layout:$tag -o /dev/vdb
echo "initramfs-test: cloudimg get exit status \$?"
umount /mnt
sync
poweroff -f
INIT
chmod +x "$ird/init"
(cd "$ird" && find . | "$busybox" cpio -o -H newc 2>/dev/null | gzip -1) >"$run/initramfs.cpio.gz"
say "disks and initramfs ($(($(stat -c %s "$run/initramfs.cpio.gz") >> 10)) KiB): $(since "$t")"

# --- boot ---------------------------------------------------------------------
t=$(now)
say "booting under qemu (accel $accel, timeout ${qemu_timeout} s)"
status=0
timeout "$qemu_timeout" qemu-system-x86_64 \
    -machine accel="$accel" -m 512 -smp 2 \
    -nodefaults -nographic -serial stdio -no-reboot \
    -kernel "$kdir/vmlinuz" -initrd "$run/initramfs.cpio.gz" \
    -append "console=ttyS0 panic=-1 quiet" \
    -drive file="$run/layout.img",format=raw,if=virtio,readonly=on \
    -drive file="$run/target.img",format=raw,if=virtio \
    </dev/null 2>&1 | tr -d '\r' | tee "$run/console.log" || status=$?
say "qemu: $(since "$t")"
((status == 0)) || fail "qemu failed or timed out (status $status)"

grep -q '^initramfs-test: cloudimg get exit status 0$' "$run/console.log" ||
    fail "cloudimg get did not exit 0 in the guest"
cmp "$run/target.img" "$run/disk.raw" || fail "the written block device differs from the disk"
say "the block device holds the disk, byte for byte; total $(since "$t0")"
