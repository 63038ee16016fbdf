#!/usr/bin/env bash
# Build the benchmark peers (goref, ratecap, dlserve, rangeload, consumer,
# splice_ceiling) into OUT_DIR (default: target/bench-bin of the repository).
#
#   benches/peers/build.sh [OUT_DIR]
#
# Needs go (1.19 or later; standard library only, nothing is fetched) and gcc.
# Run as root, it installs what is missing (Debian: golang-go, gcc). The Go
# caches live under OUT_DIR, so no HOME is needed.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/../.." && pwd)
out=${1:-$repo/target/bench-bin}
mkdir -p "$out"
out=$(cd "$out" && pwd)

missing=()
command -v go >/dev/null || missing+=(golang-go)
command -v gcc >/dev/null || missing+=(gcc)
if ((${#missing[@]})); then
    if [ "$(id -u)" != 0 ]; then
        echo "build.sh: missing ${missing[*]}; install them (or run as root)" >&2
        exit 1
    fi
    export DEBIAN_FRONTEND=noninteractive
    apt-get install -y -qq "${missing[@]}" >/dev/null ||
        { apt-get update -qq && apt-get install -y -qq "${missing[@]}" >/dev/null; }
fi

# Single-file programs, GOPATH mode, no module or toolchain downloads.
export GO111MODULE=off GOFLAGS= GOPROXY=off GOTOOLCHAIN=local CGO_ENABLED=0
export GOCACHE=$out/.go/cache GOPATH=$out/.go/path
for prog in goref ratecap dlserve rangeload; do
    go build -trimpath -o "$out/$prog" "$here/$prog.go"
done
for prog in consumer splice_ceiling; do
    gcc -O2 -Wall -Wextra -Werror -o "$out/$prog" "$here/$prog.c"
done
echo "build.sh: goref ratecap dlserve rangeload consumer splice_ceiling in $out" >&2
