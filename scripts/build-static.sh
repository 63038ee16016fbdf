#!/usr/bin/env bash
# The rescue-shell build: cloudimg linked statically against glibc (a
# static-pie), so it runs where there are no shared libraries, no environment
# and no /etc/ssl (the CA roots are bundled). Checks that the result is static
# and stripped, and at most 4 MiB.
#
#   scripts/build-static.sh        # -> target/static/cloudimg
set -euo pipefail
cd "$(dirname "$0")/.."

target=x86_64-unknown-linux-gnu
limit=$((4 << 20))
out=target/static/cloudimg
log=target/static/build.log
fail() { echo "build-static: $*" >&2; exit 1; }

mkdir -p target/static
# +crt-static: glibc linked in, a static-pie. GNU ld instead of the bundled
# lld, with linker messages shown, because only GNU ld reports glibc's
# "Using 'F' in statically linked applications requires ..." warnings.
# An explicit --target keeps these flags away from the normal build's cache.
export RUSTFLAGS="-C target-feature=+crt-static -C linker-features=-lld -W linker-messages"
cargo build --release --target "$target" 2>&1 | tee "$log"
cp "target/$target/release/cloudimg" "$out"

echo "== checks on $out"
if command -v file >/dev/null; then file "$out"; fi
ldd "$out" 2>&1 | sed 's/^[[:space:]]*/ldd: /' || true
headers=$(readelf -lW "$out")
dynamic=$(readelf -dW "$out")
grep -q 'INTERP' <<<"$headers" && fail "$out has a PT_INTERP (needs a dynamic loader)"
grep -q '(NEEDED)' <<<"$dynamic" && fail "$out needs shared libraries: $(grep '(NEEDED)' <<<"$dynamic")"
echo "static: no PT_INTERP, no NEEDED entries"
readelf -SW "$out" | grep -qE '\.symtab|\.debug_' && fail "$out is not stripped"
echo "stripped: no .symtab, no .debug_*"

# glibc's own warnings about functions that load NSS modules at run time. The
# hosts lookup (getaddrinfo) is expected: glibc builds its "files" and "dns"
# services into the static library, so /etc/hosts and /etc/resolv.conf work
# with no shared library present.
grep -o "Using '[a-z_0-9]*' in statically linked applications.*" "$log" | sort -u |
    sed 's/^/glibc warning: /' || echo "glibc warnings: none"

size=$(stat -c %s "$out")
printf 'size: %d bytes (%d.%02d MiB), limit %d bytes (4 MiB)\n' "$size" \
    $((size >> 20)) $(((size & 0xfffff) * 100 >> 20)) "$limit"
((size <= limit)) || fail "$out is larger than 4 MiB"

env -i "$out" --help >/dev/null || fail "$out does not run with an empty environment"
echo "runs with an empty environment: ok"
