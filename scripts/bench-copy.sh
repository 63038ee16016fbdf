#!/usr/bin/env bash
# Benchmarks of `cloudimg copy` and `--cache` against a local docker-registry:
#
#   A. registry -> layout: `cloudimg copy` against `skopeo copy docker://… oci:…`
#      (Debian's skopeo), a fresh layout each run; wall time and peak RSS.
#   B. registry -> pipe through `--cache`: the first run (empty cache, the blobs
#      written into it while they stream) against the second (read from it).
#      `get` into the benchmark consumer stands for `pull`: the same stream
#      without cocoon.
#
#   scripts/bench-copy.sh            # 4 GiB disk (BENCH_GIB), 3 runs (BENCH_RUNS)
#   scripts/bench-copy.sh --quick    # 512 MiB, 1 run (a smoke test)
#   scripts/bench-copy.sh --report   # the report again, from the last results
#
# Raw rows go to target/bench-copy/results.tsv; the report (medians, ratios)
# to docs/bench/copy.md, which scripts/bench.sh appends to docs/BENCHMARKS.md
# (--quick: to target/bench-copy/copy.md). Needs docker-registry, skopeo, curl,
# gcc, time.
set -euo pipefail
cd "$(dirname "$0")/.."

mib=$(( ${BENCH_GIB:-4} * 1024 )) runs=${BENCH_RUNS:-3}
report=docs/bench/copy.md
if [ "${1:-}" = --quick ]; then mib=512 runs=1 report=target/bench-copy/copy.md; fi
part_mib=$(( mib / 4 ))
work=target/bench-copy
mkdir -p "$work"
work=$(cd "$work" && pwd)
results=$work/results.tsv
say() { echo "bench-copy: $*" >&2; }

write_report() {
python3 - "$results" "$(cat "$work/meta" 2>/dev/null)" <<'PY'
import statistics, sys
rows = [l.rstrip("\n").split("\t") for l in open(sys.argv[1])]
meta = dict(kv.split("=", 1) for kv in sys.argv[2].split())
size, runs = int(meta["bytes"]), meta["runs"]
by = {}
for name, wall, user, sys_, rss in rows:
    by.setdefault(name, []).append((float(wall), float(user) + float(sys_), int(rss)))
med = lambda name, i: statistics.median(v[i] for v in by[name])
r_copy = med("copy-skopeo", 0) / med("copy-cloudimg", 0)
r_cache = med("cache-first", 0) / med("cache-second", 0)
r_plain = med("registry-plain", 0) / med("cache-second", 0)
print("## Copy and the cache (`scripts/bench-copy.sh`)\n")
print(f"A {size / 2**30:.2f} GiB random raw disk in four parts, in a local `docker-registry`; "
      f"median of {runs} interleaved run(s); load {meta.get('load_start', '?')} at the start, "
      f"{meta.get('load_end', '?')} at the end. `skopeo` is Debian's ({meta.get('skopeo', '?')}). "
      "A: registry → a fresh layout. B: registry → pipe with `--cache`, the first run into an empty "
      "cache and the second from it (`get` into the consumer stands for `pull`), beside the same "
      "`get` without a cache.\n")
print("| run | wall s | GiB/s | CPU s (user+sys) | peak RSS MiB |")
print("|---|---|---|---|---|")
for name in by:
    w = med(name, 0)
    print(f"| {name} | {w:.2f} | {size / 2**30 / w:.2f} | {med(name, 1):.2f} | {med(name, 2) / 1024:.1f} |")
print()
print(f"- `copy` against `skopeo copy docker://… oci:…`: **{r_copy:.2f}×** (target ≥ 2×"
      + (", met" if r_copy >= 2 else ", missed") + f"); peak RSS {med('copy-cloudimg', 2) / 1024:.1f} "
      f"against {med('copy-skopeo', 2) / 1024:.1f} MiB.")
print(f"- `--cache`, the second run against the first: **{r_cache:.2f}×** (target ≥ 3×"
      + (", met" if r_cache >= 3 else ", missed") + f"); against the same `get` without a cache: "
      f"{r_plain:.2f}×.")
PY
}

if [ "${1:-}" = --report ]; then write_report > "$report"; cat "$report"; exit 0; fi
: > "$results"

for t in docker-registry skopeo curl gcc /usr/bin/time; do
    command -v "$t" >/dev/null || { echo "bench-copy.sh: $t is missing" >&2; exit 1; }
done
cargo build --release -q
bin=$PWD/target/release/cloudimg
consumer=$work/consumer
[ -x "$consumer" ] || gcc -O2 -o "$consumer" benches/peers/consumer.c

cleanup() { [ -n "${reg_pid:-}" ] && kill "$reg_pid" 2>/dev/null || true; }
trap cleanup EXIT

img=$work/img-$mib
if [ ! -f "$img/.done" ]; then
    say "a ${mib} MiB random raw disk in ${part_mib} MiB parts"
    rm -rf "$img" && mkdir -p "$img/parts"
    head -c "${mib}M" /dev/urandom > "$img/disk"
    (cd "$img/parts" && split -b "${part_mib}M" -d --additional-suffix=.part ../disk disk. &&
        sha256sum disk.* > SHA256SUMS)
    rm "$img/disk"
    scripts/make-layout.sh "$img/layout" v1 application/vnd.cocoonstack.disk.raw.part \
        "$img"/parts/disk.*.part "$img/parts/SHA256SUMS" >/dev/null
    touch "$img/.done"
fi

say "a local docker-registry holding it"
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
rm -rf "$work/registry" && mkdir -p "$work/registry"
cat > "$work/registry/config.yml" <<EOF
version: 0.1
log: {level: error, accesslog: {disabled: true}}
storage: {filesystem: {rootdirectory: $work/registry/data}}
http: {addr: 127.0.0.1:$port}
EOF
docker-registry serve "$work/registry/config.yml" > "$work/registry/log" 2>&1 &
reg_pid=$!
for _ in $(seq 50); do curl -fs "http://127.0.0.1:$port/v2/" >/dev/null && break; sleep 0.1; done
scripts/registry-push.sh "$img/layout" v1 "http://127.0.0.1:$port" bench/disk 2>/dev/null
ref=127.0.0.1:$port/bench/disk:v1
bytes=$(cat "$img"/parts/* | wc -c)

# run NAME CMD: wall time of CMD, user+sys CPU and peak RSS of what `$T` wraps.
run() {
    local name=$1 cmd=$2 t0 t1
    rm -f "$work/time.out"
    sync
    t0=$(date +%s.%N)
    T="/usr/bin/time -f %U\t%S\t%M -o $work/time.out" bash -c "$cmd" >/dev/null || {
        echo "bench-copy.sh: $name failed: $cmd" >&2
        exit 1
    }
    t1=$(date +%s.%N)
    printf '%s\t%s\t%s\n' "$name" "$(echo "$t1 - $t0" | bc)" "$(tail -n 1 "$work/time.out")" >> "$results"
}

load_start=$(cut -d' ' -f1 /proc/loadavg)
for ((r = 1; r <= runs; r++)); do
    say "round $r of $runs"
    rm -rf "$work/copy-c" "$work/copy-s"
    run copy-cloudimg "\$T $bin copy -q $ref oci:$work/copy-c:v1"
    run copy-skopeo "\$T skopeo --insecure-policy copy -q --src-tls-verify=false docker://$ref oci:$work/copy-s:v1"
    # The copies are the same image.
    [ "$(skopeo inspect --raw "oci:$work/copy-c:v1" | sha256sum)" = \
      "$(skopeo inspect --raw "oci:$work/copy-s:v1" | sha256sum)" ] ||
        { echo "bench-copy.sh: the copies differ" >&2; exit 1; }
    rm -rf "$work/copy-c" "$work/copy-s" "$work/cache"
    sync
    run cache-first "\$T $bin get -q --cache $work/cache $ref | $consumer"
    run cache-second "\$T $bin get -q --cache $work/cache $ref | $consumer"
    run registry-plain "\$T $bin get -q $ref | $consumer"
done

printf 'bytes=%s runs=%s load_start=%s load_end=%s skopeo=%s\n' "$bytes" "$runs" \
    "$load_start" "$(cut -d' ' -f1 /proc/loadavg)" "$(skopeo --version | awk '{print $3}')" > "$work/meta"
mkdir -p "$(dirname "$report")"
write_report > "$report"
cat "$report"
