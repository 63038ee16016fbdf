#!/usr/bin/env bash
# Run every cargo-fuzz target (fuzz/fuzz_targets/) for SECONDS each, one after
# another, and report per target the executions and whether it crashed.
#
#   scripts/fuzz.sh 60                 # all targets, 60 s each
#   scripts/fuzz.sh 600 manifest       # only the named targets
#
# Needs a nightly toolchain (rustup toolchain install nightly; without one,
# RUSTC_BOOTSTRAP=1 lets a stable compiler take the sanitizer flags) and
# cargo-fuzz, which is installed when missing. The committed seeds in
# fuzz/corpus/TARGET are read, never written: what the fuzzer grows goes to
# fuzz/target/corpus/TARGET, crash inputs to fuzz/artifacts/TARGET, logs to
# fuzz/target/logs/TARGET.log. Exits 1 when any target crashed.
#
# The targets are built as cargo-fuzz builds them (release, with debug
# assertions and overflow checks) but without AddressSanitizer: the code under
# test is safe Rust, and ASan costs about six times the executions.
# FUZZ_SANITIZER=address brings it back; FUZZ_RUNS=N also stops a target after
# N executions.
set -uo pipefail
cd "$(dirname "$0")/.."

secs=${1:-}
[[ $secs =~ ^[1-9][0-9]*$ ]] || { echo "usage: scripts/fuzz.sh SECONDS [TARGET...]" >&2; exit 2; }
shift

if ! cargo fuzz --version >/dev/null 2>&1; then
    echo "fuzz: installing cargo-fuzz" >&2
    cargo install cargo-fuzz || exit 1
fi
toolchain=()
if command -v rustup >/dev/null && rustup run nightly rustc --version >/dev/null 2>&1; then
    toolchain=(+nightly)
else
    echo "fuzz: no nightly toolchain; using RUSTC_BOOTSTRAP=1 with the default one" >&2
    export RUSTC_BOOTSTRAP=1
fi

sanitizer=${FUZZ_SANITIZER:-none}
extra=()
[[ -n ${FUZZ_RUNS:-} ]] && extra+=(-runs="$FUZZ_RUNS")

mkdir -p fuzz/target/logs
targets=("$@")
if ((${#targets[@]} == 0)); then
    mapfile -t targets < <(cargo "${toolchain[@]}" fuzz list)
fi
for t in "${targets[@]}"; do
    cargo "${toolchain[@]}" fuzz build -s "$sanitizer" "$t" 2>fuzz/target/logs/build.log ||
        { cat fuzz/target/logs/build.log >&2; exit 1; }
done

failed=0
printf '%-14s %14s %8s  %s\n' target executions seconds result
for t in "${targets[@]}"; do
    mkdir -p "fuzz/target/corpus/$t"
    log=fuzz/target/logs/$t.log
    start=$(date +%s)
    cargo "${toolchain[@]}" fuzz run -s "$sanitizer" "$t" "fuzz/target/corpus/$t" "fuzz/corpus/$t" -- \
        -max_total_time="$secs" -print_final_stats=1 "${extra[@]}" >"$log" 2>&1
    rc=$?
    took=$(($(date +%s) - start))
    execs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -n1)
    if [[ -z $execs ]]; then # no final stats (e.g. a crash): the last status line
        execs=$(grep -oE '^#[0-9]+' "$log" | tail -n1 | tr -d '#')
    fi
    if ((rc == 0)); then
        result="ok"
    else
        failed=1
        artifact=$(grep -oE 'fuzz/artifacts/[^ ]+' "$log" | tail -n1)
        result="CRASHED (exit $rc${artifact:+, input $artifact}; see $log)"
    fi
    printf '%-14s %14s %8s  %s\n' "$t" "${execs:-?}" "$took" "$result"
done
exit "$failed"
